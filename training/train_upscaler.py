"""Train the x4 upscaling stage (shared/semantic/upscaler.py) on CamVid train at 192x256.

Each example is a real 192x256 image, the 48x64 input made from it the way the base generator's
outputs differ from real images, and the noisy received map the base trains on:

* colour: a per-channel gain and offset on the image, before the downsampling, so input and target
  share it (the base's colour casts are content the stage must keep, not undo);
* area downsampling to 48x64, then with probability `blur_p` a Gaussian blur of sigma drawn from
  [0, blur_sigma_max], and Gaussian noise of a std drawn from [0, noise_max] 8-bit levels, which the
  stage learns to remove; `clean_p` of the examples skip both. The ranges are the measured gap
  (scripts/models/measure_base_gap.py, models/upscaler-camvid.md);
* the condition: label map at the sender's size -> codec -> AWGN at a PSNR drawn as the base's
  training draws it -> inverse codec -> FDS (shared/semantic/batched_link.py), at the map size.

Random crops (`crop_height` x `crop_width` of the target, a quarter of that at the input, the
matching window of the map) cut the cost; the network is fully convolutional. Loss: L1 plus an L1
between features of the project's segmenter (frozen, eval mode) of output and target, plus, after
`adv_start` steps, a hinge-loss patch discriminator that sees the image and the map.

    python -m training.train_upscaler --data-root ../shared/data/camvid --minutes 100 --threads 1

Resumes from <out_dir>/state.pt (networks, EMA, optimisers, step, RNG). Logs JSON lines to
<out_dir>/log.jsonl. Every `eval_every` steps the EMA is scored on the val images (real 48x64 ->
192x256: PSNR, Frechet segmenter distance and mIoU beside bicubic's, evaluation/upscaling.py) and
exported (fp16 EMA weights only) to --export-path when it beats bicubic on PSNR and distance and has
the lowest distance so far.
"""
from __future__ import annotations

import dataclasses
import math
import random
import signal
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from evaluation.upscaling import UpscalingScorer, UpscalingSet, bicubic_stage, camvid_set
from shared.semantic.batched_link import batched_conditions, draw_snr_db
from shared.semantic.checkpoints import save_checkpoint
from shared.semantic.codec import CodecConfig
from shared.semantic.data import CAMVID_INFO, camvid
from shared.semantic.segmenter import Segmenter, SegmenterNet
from shared.semantic.upscaler import CHECKPOINT_KIND, UpscalerConfig, UpscalerNet, count_parameters
from training.config_cli import config_parser
from training.run_state import log_record, save_atomically


@dataclass
class TrainConfig:
    data_root: str = "../shared/data/camvid"
    out_dir: str = "runs/upscaler"
    export_path: str = "models/upscaler-camvid.pt"
    segmenter: str = "models/segmenter-camvid.pt"
    model_name: str = "gesco-upscaler-camvid-x4"
    # network (UpscalerConfig)
    channels: int = 32
    blocks: int = 4
    mid_channels: int = 24
    mid_blocks: int = 2
    out_channels: int = 12
    spade_hidden: int = 32
    out_spade_hidden: int = 8
    # data: target crops, the sender's map size and the channel the base trains on
    crop_height: int = 96  # of the 192x256 target; 0: whole images
    crop_width: int = 128
    map_height: int = 96
    map_width: int = 128
    snr_values_db: tuple[float, ...] = (1, 5, 10, 15, 20, 30, 100)
    snr_weights: tuple[float, ...] = (1, 1, 1, 1, 1, 1, 3)
    snr_definition: str = "paper_psnr"
    # degradation (the measured gap between base outputs and real 48x64 images)
    clean_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma_max: float = 0.5  # in 48x64 pixels
    noise_max: float = 8.0  # 8-bit levels
    colour_offset_max: float = 12.0  # 8-bit levels, per channel
    colour_gain_max: float = 0.08  # per channel, around the image mean
    # losses
    feature_weight: float = 0.1
    feature_layers: tuple[int, ...] = (0, 1)  # of the segmenter's stem (0), 1/2 (1) and 1/4 (2) stages
    adv_weight: float = 0.005
    adv_start: int = 1000
    disc_channels: int = 32
    # optimisation
    batch_size: int = 8
    lr: float = 4e-4
    disc_lr: float = 2e-4
    warmup_steps: int = 100
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    # budget and bookkeeping
    max_steps: int = 1_000_000
    minutes: float = 60.0
    log_every: int = 25
    eval_every: int = 250
    val_count: int = 0  # val images scored (0: all 101)
    seed: int = 0
    threads: int = 0


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    return TrainConfig(**vars(config_parser(TrainConfig, __doc__).parse_args(argv)))


def network_config(cfg: TrainConfig) -> UpscalerConfig:
    names = {f.name for f in dataclasses.fields(UpscalerConfig)}
    return UpscalerConfig(num_classes=CAMVID_INFO.num_classes,
                          **{k: v for k, v in dataclasses.asdict(cfg).items() if k in names and k != "num_classes"})


# --- degradation -------------------------------------------------------------------------------
def gaussian_kernels(sigmas: torch.Tensor, radius: int = 2) -> torch.Tensor:
    """(B,) sigmas -> (B, 2r+1) normalised 1-D kernels; sigma 0 gives the identity."""
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32, device=sigmas.device)
    safe = sigmas.clamp_min(1e-3)[:, None]
    weights = torch.exp(-offsets[None] ** 2 / (2 * safe**2))
    return weights / weights.sum(1, keepdim=True)


def blur(images: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of each image with its own sigma, reflected borders."""
    b, c, h, w = images.shape
    k = gaussian_kernels(sigmas)
    r = k.shape[1] // 2
    kernel = k.repeat_interleave(c, 0)  # (B*C, 2r+1)
    x = F.pad(images.reshape(1, b * c, h, w), (r, r, r, r), mode="reflect")
    x = F.conv2d(x, kernel[:, None, None, :], groups=b * c)
    x = F.conv2d(x, kernel[:, None, :, None], groups=b * c)
    return x.reshape(b, c, h, w)


def colour_jitter(images: torch.Tensor, cfg: TrainConfig, gen: torch.Generator) -> torch.Tensor:
    """A per-image, per-channel gain around the channel mean and an offset (images in [-1, 1])."""
    b, c = images.shape[:2]
    gain = 1 + (2 * torch.rand(b, c, 1, 1, generator=gen) - 1) * cfg.colour_gain_max
    offset = (2 * torch.rand(b, c, 1, 1, generator=gen) - 1) * cfg.colour_offset_max / 127.5
    mean = images.mean(dim=(2, 3), keepdim=True)
    return ((images - mean) * gain + mean + offset).clamp(-1, 1)


def degrade(targets: torch.Tensor, cfg: TrainConfig, gen: torch.Generator) -> torch.Tensor:
    """(B, 3, H, W) targets in [-1, 1] -> (B, 3, H/4, W/4) inputs: area, then blur and noise."""
    small = F.interpolate(targets, scale_factor=0.25, mode="area")
    b = small.shape[0]
    degraded = torch.rand(b, generator=gen) >= cfg.clean_p
    sigmas = torch.rand(b, generator=gen) * cfg.blur_sigma_max
    sigmas = torch.where(degraded & (torch.rand(b, generator=gen) < cfg.blur_p), sigmas, torch.zeros(b))
    small = blur(small, sigmas)
    noise_std = torch.rand(b, generator=gen) * cfg.noise_max / 127.5 * degraded
    small = small + noise_std[:, None, None, None] * torch.randn(small.shape, generator=gen)
    return small.clamp(-1, 1)


# --- losses ------------------------------------------------------------------------------------
class SegmenterFeatures(nn.Module):
    """The frozen segmenter's stem, 1/2 and 1/4 stage activations (`layers` picks among them)."""

    def __init__(self, net: SegmenterNet, layers: tuple[int, ...]) -> None:
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.layers = layers

    def train(self, mode: bool = True) -> "SegmenterFeatures":
        return super().train(False)  # BatchNorm statistics stay the trained ones

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        s0 = self.net.stem(x)
        s1 = self.net.enc1(s0)
        s2 = self.net.enc2(s1) if 2 in self.layers else None
        return [f for i, f in enumerate((s0, s1, s2)) if i in self.layers]


class PatchDiscriminator(nn.Module):
    """A small conditional PatchGAN: image and map in, a realness score per ~22x22 patch out."""

    def __init__(self, num_classes: int, channels: int) -> None:
        super().__init__()
        c = channels
        self.net = nn.Sequential(
            nn.Conv2d(3 + num_classes, c, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(c, 2 * c, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * c, 2 * c, 3, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * c, 1, 3, padding=1),
        )

    def forward(self, images: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        maps = F.interpolate(maps, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return self.net(torch.cat([images, maps], dim=1))


class Trainer:
    def __init__(self, cfg: TrainConfig, train: tuple[np.ndarray, np.ndarray] | None = None,
                 val: UpscalingSet | None = None, segmenter: Segmenter | None = None) -> None:
        """`train` (images (N, 192, 256, 3) uint8, map labels (N, h, w)), `val` and `segmenter` default to
        CamVid under data_root and the shipped segmenter; tests pass small ones."""
        self.cfg = cfg
        self.started = time.monotonic()
        self.out_dir = Path(cfg.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        self.net_cfg = network_config(cfg)
        self.model = UpscalerNet(self.net_cfg)
        self.ema = UpscalerNet(self.net_cfg).eval().requires_grad_(False)
        self.ema.load_state_dict(self.model.state_dict())
        self.disc = PatchDiscriminator(self.net_cfg.num_classes, cfg.disc_channels)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=0.0)
        self.disc_optimizer = torch.optim.AdamW(self.disc.parameters(), lr=cfg.disc_lr, betas=(0.5, 0.999), weight_decay=0.0)
        self.segmenter = segmenter or Segmenter.from_checkpoint(cfg.segmenter, "cpu")
        self.features = SegmenterFeatures(self.segmenter.net, tuple(cfg.feature_layers))
        if train is None:
            images = camvid(cfg.data_root, "train", size=(192, 256)).images
            map_labels = camvid(cfg.data_root, "train", size=(cfg.map_height, cfg.map_width)).labels
            train = (images, map_labels)
        self.images = torch.from_numpy(train[0]).permute(0, 3, 1, 2).contiguous()  # uint8
        self.map_labels = torch.from_numpy(train[1]).long()
        self.val = val if val is not None else _val_set(cfg)
        self.codec = CodecConfig(num_classes=self.net_cfg.num_classes)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.step = 0
        self.best_fd = math.inf
        self.wall_seconds = 0.0
        self.save_seconds = 2.0
        self.scorer: UpscalingScorer | None = None
        self.bicubic_scores: dict[str, float] = {}

    # --- state -----------------------------------------------------------------------------------
    def save_state(self) -> None:
        started = time.monotonic()
        state = {"model": self.model.state_dict(), "ema": self.ema.state_dict(), "disc": self.disc.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "disc_optimizer": self.disc_optimizer.state_dict(),
                 "step": self.step, "best_fd": self.best_fd, "wall_seconds": self.wall_seconds,
                 "config": dataclasses.asdict(self.cfg),
                 "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "gen": self.gen.get_state()}}
        save_atomically(state, self.out_dir / "state.pt")
        self.save_seconds = time.monotonic() - started

    def load_state(self) -> bool:
        path = self.out_dir / "state.pt"
        if not path.exists():
            return False
        state = torch.load(path, map_location="cpu", weights_only=False)
        for name in ("model", "ema", "disc", "optimizer", "disc_optimizer"):
            getattr(self, name).load_state_dict(state[name])
        self.step, self.best_fd, self.wall_seconds = state["step"], state["best_fd"], state["wall_seconds"]
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        self.gen.set_state(state["rng"]["gen"])
        return True

    def export(self, scores: dict[str, float]) -> None:
        meta = {"name": self.cfg.model_name, "step": self.step, "wall_seconds": round(self.wall_seconds),
                "val": scores, "val_bicubic": self.bicubic_scores, "data": "CamVid train split (367 images)",
                "parameters": count_parameters(self.model),
                "command": "python -m training.train_upscaler " + " ".join(sys.argv[1:])}
        save_checkpoint(self.cfg.export_path, CHECKPOINT_KIND, self.net_cfg, self.ema.state_dict(), meta)

    # --- data --------------------------------------------------------------------------------------
    def next_batch(self, order: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Targets (B, 3, ch, cw), inputs (B, 3, ch/4, cw/4) and the matching windows of the received maps."""
        cfg = self.cfg
        idx = torch.tensor([order.pop() for _ in range(cfg.batch_size)])
        targets = self.images[idx].float().div_(127.5).sub_(1.0)
        labels = self.map_labels[idx]
        flip = torch.rand(len(idx), generator=self.gen) < 0.5
        targets = torch.where(flip[:, None, None, None], targets.flip(-1), targets)
        labels = torch.where(flip[:, None, None], labels.flip(-1), labels)
        snr = draw_snr_db(len(idx), cfg.snr_values_db, cfg.snr_weights, self.gen)
        maps = batched_conditions(labels, self.codec, snr, tuple(labels.shape[-2:]),
                                  snr_definition=cfg.snr_definition, generator=self.gen)
        targets = colour_jitter(targets, cfg, self.gen)
        inputs = degrade(targets, cfg, self.gen)
        if cfg.crop_height and cfg.crop_width:
            targets, inputs, maps = self.crop(targets, inputs, maps)
        return targets, inputs, maps

    def crop(self, targets: torch.Tensor, inputs: torch.Tensor, maps: torch.Tensor):
        """One window for the batch, at a multiple of 4 target pixels, cut from all three at their scales."""
        cfg = self.cfg
        th, tw = targets.shape[-2:]
        top = 4 * int(torch.randint(0, (th - cfg.crop_height) // 4 + 1, (1,), generator=self.gen))
        left = 4 * int(torch.randint(0, (tw - cfg.crop_width) // 4 + 1, (1,), generator=self.gen))
        mh, mw = maps.shape[-2] / th, maps.shape[-1] / tw  # the map's scale relative to the target

        def window(x: torch.Tensor, s_h: float, s_w: float) -> torch.Tensor:
            t, l = round(top * s_h), round(left * s_w)
            return x[..., t:t + round(cfg.crop_height * s_h), l:l + round(cfg.crop_width * s_w)]

        return window(targets, 1, 1), window(inputs, 0.25, 0.25), window(maps, mh, mw)

    # --- steps -----------------------------------------------------------------------------------
    def lr_scale(self) -> float:
        return min(1.0, (self.step + 1) / self.cfg.warmup_steps) if self.cfg.warmup_steps else 1.0

    def train_step(self, order: list[int]) -> dict[str, float]:
        cfg = self.cfg
        targets, inputs, maps = self.next_batch(order)
        for g in self.optimizer.param_groups:
            g["lr"] = cfg.lr * self.lr_scale()
        out = self.model(inputs, maps)
        l1 = (out - targets).abs().mean()
        feature = torch.zeros(())
        if cfg.feature_weight > 0:
            with torch.no_grad():
                target_features = self.features(targets)
            feature = sum((a - b).abs().mean() for a, b in zip(self.features(out), target_features))
        adversarial = self.step >= cfg.adv_start and cfg.adv_weight > 0
        gen_adv = -self.disc(out, maps).mean() if adversarial else torch.zeros(())
        loss = l1 + cfg.feature_weight * feature + cfg.adv_weight * gen_adv
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.update_ema()
        record = {k: float(v.detach()) for k, v in (("loss", loss), ("l1", l1), ("feature", feature), ("gen_adv", gen_adv))}
        if adversarial:
            real, fake = self.disc(targets, maps), self.disc(out.detach(), maps)
            disc_loss = F.relu(1 - real).mean() + F.relu(1 + fake).mean()
            self.disc_optimizer.zero_grad(set_to_none=True)
            disc_loss.backward()
            self.disc_optimizer.step()
            record["disc"] = float(disc_loss.detach())
        return record

    @torch.no_grad()
    def update_ema(self) -> None:
        decay = min(self.cfg.ema_decay, (1 + self.step) / (10 + self.step))
        torch._foreach_lerp_(list(self.ema.parameters()), list(self.model.parameters()), 1 - decay)

    def validate(self) -> dict[str, float]:
        if self.scorer is None:
            self.scorer = UpscalingScorer(self.val, self.segmenter)
            self.bicubic_scores = {"real_miou": self.scorer.real_miou, **self.scorer.score(bicubic_stage)}
            self.log({"event": "bicubic", **_rounded(self.bicubic_scores)})
        return self.scorer.score(lambda x, m: self.ema(x, m))

    def beats_bicubic(self, scores: dict[str, float]) -> bool:
        b = self.bicubic_scores
        return scores["psnr"] > b["psnr"] and scores["frechet_segmenter_distance"] < b["frechet_segmenter_distance"]

    def log(self, record: dict) -> None:
        log_record(self.out_dir, {"step": self.step, "wall_s": round(self.wall_seconds, 1), **record})

    def run(self) -> str:
        """Train until max_steps, the time budget or SIGTERM; save; return why it stopped."""
        cfg = self.cfg
        resumed = self.load_state()
        self.log({"event": "start", "resumed": resumed, "config": dataclasses.asdict(cfg),
                  "parameters": count_parameters(self.model)})
        stop = {"now": False}
        signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
        deadline = time.monotonic() + cfg.minutes * 60
        order: list[int] = []
        running: dict[str, float] = {}
        step_times: list[float] = []
        eval_seconds = 0.0
        reason = "max_steps"
        while self.step < cfg.max_steps:
            reserve = 3 * (statistics.median(step_times[-20:]) if step_times else 1.0) + 2 * self.save_seconds
            if stop["now"] or time.monotonic() + reserve > deadline:
                reason = "signal" if stop["now"] else "budget"
                break
            if len(order) < cfg.batch_size:
                order = torch.randperm(len(self.images), generator=self.gen).tolist()
            started = time.monotonic()
            for k, v in self.train_step(order).items():
                running[k] = running.get(k, 0.0) + v
            self.step += 1
            elapsed = time.monotonic() - started
            self.wall_seconds += elapsed
            step_times.append(elapsed)
            if self.step % cfg.log_every == 0:
                self.log({k: round(v / cfg.log_every, 5) for k, v in running.items()}
                         | {"s_per_step": round(statistics.median(step_times[-cfg.log_every:]), 3)})
                running = {}
            if self.step % cfg.eval_every == 0 and time.monotonic() + eval_seconds + reserve < deadline:
                t0 = time.monotonic()
                scores = self.validate()
                improved = self.beats_bicubic(scores) and scores["frechet_segmenter_distance"] < self.best_fd
                if improved:
                    self.best_fd = scores["frechet_segmenter_distance"]
                    self.export(scores)
                self.save_state()
                eval_seconds = time.monotonic() - t0
                self.log({"event": "eval", **_rounded(scores), "exported": improved, "eval_s": round(eval_seconds, 1)})
        self.save_state()
        self.log({"event": "stop", "reason": reason, "call_seconds": round(time.monotonic() - self.started, 1)})
        return reason


def _rounded(scores: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 4) for k, v in scores.items()}


def _val_set(cfg: TrainConfig) -> UpscalingSet:
    return camvid_set(cfg.data_root, "val", (cfg.map_height, cfg.map_width), cfg.val_count)


def main(argv: list[str] | None = None) -> str:
    cfg = parse_config(argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return Trainer(cfg).run()


if __name__ == "__main__":
    main()
