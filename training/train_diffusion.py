"""Train the semantic diffusion model on noisy semantic maps (the paper's recipe, section 3.3).

Each example's label map goes through the real link the receiver will see: semantic codec ->
AWGN at a PSNR drawn from {1, 5, 10, 15, 20, 30, 100} dB (100 dB weighted higher), with noise
drawn independently for every symbol of the present-class maps only -> inverse codec -> FDS ->
resize to the model's resolution. Condition dropout makes classifier-free guidance possible, and
the hybrid loss trains the learned variances.

    python -m training.train_diffusion --data-root ../shared/data/camvid --minutes 60

Resumes from <out_dir>/state.pt when it exists (model, EMA, optimiser, step, RNG states), or
warm-starts from shipped weights with --init-from. The EMA weights are exported (fp16) to
--export-path whenever the validation loss improves.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from shared.semantic.channels import ChannelConfig, SnrDefinition
from shared.semantic.checkpoints import load_checkpoint, save_checkpoint
from shared.semantic.codec import CodecConfig
from shared.semantic.data import CAMVID_INFO, camvid, colorize
from shared.semantic.device import select_device
from shared.semantic.diffusion.gaussian_diffusion import DiffusionConfig, GaussianDiffusion
from shared.semantic.diffusion.generator import CHECKPOINT_KIND, SemanticDiffusionConfig
from shared.semantic.diffusion.samplers import DDIMSampler, GuidedModel
from shared.semantic.diffusion.unet import SemanticUNet, UNetConfig
from shared.semantic.link import resize_maps, simulate_link


@dataclass
class TrainConfig:
    data_root: str = "../shared/data/camvid"
    out_dir: str = "runs/diffusion"
    export_path: str = "models/diffusion-camvid.pt"
    init_from: str = ""  # a shipped checkpoint to warm-start from when out_dir has no state
    model_name: str = "gesco-camvid-48x64"
    # resolutions: the model's, and the one the sender transmits its maps at
    image_height: int = 48
    image_width: int = 64
    link_height: int = 96
    link_width: int = 128
    # network
    model_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 1
    attention_downsample: tuple[int, ...] = (4, 8)
    spade_hidden: int = 32
    dropout: float = 0.0
    schedule: str = "linear"
    prediction: str = "velocity"  # the mean's parametrisation: "velocity" or "epsilon"
    # optimisation
    batch_size: int = 8
    lr: float = 2e-4
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    condition_dropout: float = 0.15
    # the channel seen in training
    noisy_training: bool = True
    snr_values_db: tuple[float, ...] = (1, 5, 10, 15, 20, 30, 100)
    snr_weights: tuple[float, ...] = (1, 1, 1, 1, 1, 1, 3)
    snr_definition: str = "paper_psnr"
    downsample_factor: int = 1
    use_fds: bool = True
    # budget and bookkeeping
    max_steps: int = 1_000_000
    minutes: float = 60.0
    log_every: int = 25
    eval_every: int = 250
    sample_every: int = 1000
    seed: int = 0
    threads: int = 0
    device: str = "auto"


def parse_config() -> TrainConfig:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        default = getattr(TrainConfig, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=default)
        elif isinstance(default, tuple):
            parser.add_argument(flag, type=lambda s: tuple(float(v) if "." in v else int(v) for v in s.split(",")), default=default)
        else:
            parser.add_argument(flag, type=type(default), default=default)
    return TrainConfig(**vars(parser.parse_args()))


def model_config(cfg: TrainConfig) -> SemanticDiffusionConfig:
    unet = UNetConfig(
        num_classes=CAMVID_INFO.num_classes, image_height=cfg.image_height, image_width=cfg.image_width,
        model_channels=cfg.model_channels, channel_mult=tuple(cfg.channel_mult), num_res_blocks=cfg.num_res_blocks,
        attention_downsample=tuple(cfg.attention_downsample), spade_hidden=cfg.spade_hidden, dropout=cfg.dropout,
    )
    return SemanticDiffusionConfig(unet=unet, diffusion=DiffusionConfig(schedule=cfg.schedule, prediction=cfg.prediction))


def channel_conditions(labels: torch.Tensor, cfg: TrainConfig, rng: np.random.Generator) -> torch.Tensor:
    """Send each label map through codec, channel, inverse codec and FDS, as the receiver sees it."""
    codec = CodecConfig(num_classes=CAMVID_INFO.num_classes, downsample_factor=cfg.downsample_factor)
    probs = np.asarray(cfg.snr_weights, dtype=np.float64)
    probs /= probs.sum()
    conditions = []
    for label_map in labels.numpy():
        snr_db = float(rng.choice(cfg.snr_values_db, p=probs)) if cfg.noisy_training else 100.0
        channel = ChannelConfig(snr_db=snr_db, snr_definition=SnrDefinition(cfg.snr_definition))
        link = simulate_link(label_map, codec, channel, seed=int(rng.integers(2**63)),
                             out_size=(cfg.image_height, cfg.image_width), use_fds=cfg.use_fds)
        conditions.append(torch.from_numpy(link.condition))
    return torch.stack(conditions)


def clean_conditions(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """One-hot maps resized to the model's resolution: the 100 dB condition, for evaluation."""
    one_hot = F.one_hot(labels.long(), CAMVID_INFO.num_classes).permute(0, 3, 1, 2).float()
    return torch.stack([torch.from_numpy(resize_maps(m.numpy(), size)) for m in one_hot])


def to_model_images(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return images if images.shape[-2:] == size else F.interpolate(images, size=size, mode="area")


class Trainer:
    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.out_dir = Path(cfg.out_dir)
        (self.out_dir / "samples").mkdir(parents=True, exist_ok=True)
        self.device = select_device(cfg.device)
        self.model_cfg = model_config(cfg)
        self.size = (cfg.image_height, cfg.image_width)
        self.model = SemanticUNet(self.model_cfg.unet).to(self.device)
        self.ema = SemanticUNet(self.model_cfg.unet).to(self.device).eval()
        self.ema.load_state_dict(self.model.state_dict())
        self.ema.requires_grad_(False)
        self.diffusion = GaussianDiffusion.from_config(self.model_cfg.diffusion)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.device.type == "cuda")
        self.step = 0
        self.best_val = float("inf")
        self.wall_seconds = 0.0
        self.rng = np.random.default_rng(cfg.seed)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        link_size = (cfg.link_height, cfg.link_width)
        self.train_set = camvid(cfg.data_root, "train", size=link_size, flip=True)
        self.val_set = camvid(cfg.data_root, "val", size=link_size, flip=False)
        self.val_batch = self._fixed_val_batch()

    def _fixed_val_batch(self) -> dict[str, torch.Tensor]:
        """A fixed set of val images, timesteps and noise, so val losses are comparable over time."""
        g = torch.Generator().manual_seed(1234)
        idx = torch.randperm(len(self.val_set), generator=g)[:32]
        images, labels = zip(*(self.val_set[int(i)] for i in idx))
        images, labels = torch.stack(images), torch.stack(labels)
        x0 = to_model_images(images, self.size)
        return {
            "x0": x0, "labels": labels, "cond": clean_conditions(labels, self.size),
            "t": torch.randint(0, self.diffusion.num_timesteps, (len(idx),), generator=g),
            "noise": torch.randn(x0.shape, generator=g),
        }

    # --- state -----------------------------------------------------------------------------------
    def save_state(self) -> None:
        state = {
            "model": self.model.state_dict(), "ema": self.ema.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(), "step": self.step, "best_val": self.best_val, "wall_seconds": self.wall_seconds,
            "config": dataclasses.asdict(self.cfg),
            "rng": {"torch": torch.get_rng_state(), "numpy": self.rng.bit_generator.state, "python": random.getstate()},
        }
        tmp = self.out_dir / "state.pt.tmp"
        torch.save(state, tmp)
        tmp.replace(self.out_dir / "state.pt")

    def warm_start(self, path: Path) -> None:
        """Continue from shipped EMA weights (no optimiser state ships), e.g. on a new machine.

        The network must match; the noise process may differ, which fine-tunes a model to another
        schedule or parametrisation (the features carry over, the output head relearns).
        """
        payload = load_checkpoint(path, CHECKPOINT_KIND)
        if SemanticDiffusionConfig.from_dict(payload["config"]).unet != self.model_cfg.unet:
            raise ValueError(f"{path} was trained with another network configuration")
        self.model.load_state_dict(payload["state_dict"])
        self.ema.load_state_dict(payload["state_dict"])
        self.step = int(payload["meta"].get("step", 0))
        self.wall_seconds = float(payload["meta"].get("wall_seconds", 0.0))

    def load_state(self) -> bool:
        path = self.out_dir / "state.pt"
        if not path.exists():
            if self.cfg.init_from:
                self.warm_start(Path(self.cfg.init_from))
            return False
        state = torch.load(path, map_location=self.device, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.best_val, self.wall_seconds = state["step"], state["best_val"], state["wall_seconds"]
        torch.set_rng_state(state["rng"]["torch"])
        self.rng.bit_generator.state = state["rng"]["numpy"]
        random.setstate(state["rng"]["python"])
        return True

    def export(self, val_loss: float) -> None:
        meta = {
            "name": self.cfg.model_name, "step": self.step, "val_loss": val_loss, "wall_seconds": round(self.wall_seconds),
            "noisy_training": self.cfg.noisy_training, "data": "CamVid train split (367 images)",
            "command": "python -m training.train_diffusion " + " ".join(sys.argv[1:]),
        }
        save_checkpoint(self.cfg.export_path, CHECKPOINT_KIND, self.model_cfg, self.ema.state_dict(), meta)

    # --- steps -----------------------------------------------------------------------------------
    def next_batch(self, order: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = [order.pop() for _ in range(self.cfg.batch_size)]
        images, labels = zip(*(self.train_set[i] for i in idx))
        return to_model_images(torch.stack(images), self.size), torch.stack(labels)

    def train_step(self, x0: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        cond = channel_conditions(labels, self.cfg, self.rng)
        drop = torch.rand(cond.shape[0]) < self.cfg.condition_dropout
        cond[drop] = 0.0  # the null label of classifier-free guidance
        x0, cond = x0.to(self.device), cond.to(self.device)
        t = torch.randint(0, self.diffusion.num_timesteps, (x0.shape[0],), device=self.device)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.device.type == "cuda"):
            losses = self.diffusion.training_losses(lambda x, ts: self.model(x, ts, cond), x0, t)
        loss = losses["loss"].mean()
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.update_ema()
        return {k: float(v.detach().mean()) for k, v in losses.items()}

    @torch.no_grad()
    def update_ema(self) -> None:
        decay = min(self.cfg.ema_decay, (1 + self.step) / (10 + self.step))
        for ema_p, p in zip(self.ema.parameters(), self.model.parameters()):
            ema_p.lerp_(p, 1 - decay)

    @torch.inference_mode()
    def validate(self) -> dict[str, float]:
        vb = self.val_batch
        losses = self.diffusion.training_losses(
            lambda x, ts: self.ema(x, ts, vb["cond"].to(self.device)), vb["x0"].to(self.device),
            vb["t"].to(self.device), vb["noise"].to(self.device))
        return {k: float(v.mean()) for k, v in losses.items()}

    @torch.inference_mode()
    def sample_grid(self) -> Path:
        """Rows: label map, real image, generated image (DDIM 25 steps, guidance 2) for 6 val scenes."""
        vb = self.val_batch
        cond = vb["cond"][:6].to(self.device)
        gens = [torch.Generator().manual_seed(i) for i in range(6)]
        images = DDIMSampler().sample(self.diffusion, GuidedModel(self.ema, cond, 2.0), (6, 3, *self.size), gens, 25)

        def to_uint8(x: torch.Tensor) -> np.ndarray:
            return ((x.cpu() + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()

        labels = F.interpolate(vb["labels"][:6, None].float(), size=self.size, mode="nearest")[:, 0].long().numpy()
        rows = [np.concatenate([colorize(lab) for lab in labels], axis=1),
                np.concatenate(list(to_uint8(vb["x0"][:6])), axis=1),
                np.concatenate(list(to_uint8(images)), axis=1)]
        path = self.out_dir / "samples" / f"step_{self.step:07d}.png"
        cv2.imwrite(str(path), cv2.cvtColor(np.concatenate(rows, axis=0), cv2.COLOR_RGB2BGR))
        return path

    def log(self, record: dict) -> None:
        line = json.dumps({"step": self.step, "wall_s": round(self.wall_seconds, 1), **record})
        print(line, flush=True)
        with open(self.out_dir / "log.jsonl", "a") as f:
            f.write(line + "\n")

    def run(self) -> None:
        cfg = self.cfg
        resumed = self.load_state()
        self.log({"event": "start", "resumed": resumed, "device": str(self.device), "config": dataclasses.asdict(cfg),
                  "parameters": sum(p.numel() for p in self.model.parameters())})
        stop = {"now": False}
        signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
        deadline = time.monotonic() + cfg.minutes * 60
        order: list[int] = []
        running: dict[str, float] = {}
        while self.step < cfg.max_steps and time.monotonic() < deadline and not stop["now"]:
            if len(order) < cfg.batch_size:
                order = torch.randperm(len(self.train_set)).tolist()
            started = time.monotonic()
            losses = self.train_step(*self.next_batch(order))
            self.step += 1
            self.wall_seconds += time.monotonic() - started
            for k, v in losses.items():
                running[k] = running.get(k, 0.0) + v
            if self.step % cfg.log_every == 0:
                self.log({k: round(v / cfg.log_every, 5) for k, v in running.items()})
                running = {}
            if self.step % cfg.eval_every == 0:
                val = self.validate()
                improved = val["loss"] < self.best_val
                if improved:
                    self.best_val = val["loss"]
                    self.export(val["loss"])
                self.save_state()
                self.log({"event": "eval", **{f"val_{k}": round(v, 5) for k, v in val.items()}, "exported": improved})
            if self.step % cfg.sample_every == 0:
                self.log({"event": "samples", "path": str(self.sample_grid())})
        self.save_state()
        self.log({"event": "stop", "reason": "signal" if stop["now"] else "budget"})


def main() -> None:
    cfg = parse_config()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    Trainer(cfg).run()


if __name__ == "__main__":
    main()
