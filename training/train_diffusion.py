"""Train the semantic diffusion model on noisy semantic maps (the paper's recipe, section 3.3).

Each example's label map goes through the link the receiver will see: semantic codec -> AWGN at a
PSNR drawn from {1, 5, 10, 15, 20, 30, 100} dB (100 dB weighted higher), with noise drawn
independently for every symbol of the present-class maps only -> inverse codec -> FDS -> resize to
the model's resolution. By default the whole batch goes through that link as tensor operations on
the training device (shared/semantic/batched_link.py); `--batched-link false` builds every
condition with `simulate_link`, the reference. Condition dropout makes classifier-free guidance
possible, and the hybrid loss trains the learned variances.

    python -m training.train_diffusion --data-root ../shared/data/camvid --minutes 60

The data root may be a folder or an archive from scripts/gpu/make_data_archive.py. The training split
is held on the training device as uint8 tensors, so a step does no per-image work on the CPU.

Resuming, three ways, tried in this order:
* <out_dir>/state.pt (model, EMA, optimiser, step, RNG states): exact, on the same machine;
* --resume-parts DIR: the fp16 weights a previous call wrote with --save-parts (parts of at most
  16 MiB, training/weight_parts.py). The optimiser state is not in them, so the learning rate
  warms up again over --rewarm-steps;
* --init-from a shipped checkpoint: a new run from its EMA weights.
--time-budget-s N stops after N seconds from the process start, leaving time to save, so one call
of a fixed length always returns its weights. The EMA weights are exported (fp16) to
--export-path whenever the validation loss improves; --export-parts DIR exports a parts folder.
"""
from __future__ import annotations

import dataclasses
import json
import random
import signal
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from shared.semantic.batched_link import batched_conditions, draw_snr_db, resize_batch
from shared.semantic.checkpoints import load_checkpoint, save_checkpoint
from shared.semantic.codec import CodecConfig
from shared.semantic.data import CAMVID_INFO, camvid, colorize
from shared.semantic.device import select_device
from shared.semantic.diffusion.adapters import freeze_all_but_adapter, save_adapter
from shared.semantic.diffusion.gaussian_diffusion import DiffusionConfig, GaussianDiffusion
from shared.semantic.diffusion.generator import CHECKPOINT_KIND, SemanticDiffusionConfig
from shared.semantic.diffusion.samplers import DDIMSampler, GuidedModel
from shared.semantic.diffusion.unet import SemanticUNet, UNetConfig
from shared.semantic.fds import DEFAULT_FDS_VARIANT, FdsVariant
from training.config_cli import config_parser
from training.run_state import log_record, save_atomically
from training.weight_parts import has_parts, load_parts, save_parts

PARTS_KIND = "semantic-diffusion-training"
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}
TRAINABLE = ("all", "spade")


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
    prediction: str = DiffusionConfig.prediction  # the mean's parametrisation: "velocity" or "epsilon"
    # optimisation
    batch_size: int = 8
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0  # linear learning-rate warm-up of a new run
    rewarm_steps: int = 200  # warm-up again after resuming from parts (the optimiser starts empty)
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    condition_dropout: float = 0.15
    amp: str = "bf16"  # autocast on CUDA: bf16, fp16 (with loss scaling) or off; the CPU runs fp32
    # the channel seen in training
    noisy_training: bool = True
    snr_values_db: tuple[float, ...] = (1, 5, 10, 15, 20, 30, 100)
    snr_weights: tuple[float, ...] = (1, 1, 1, 1, 1, 1, 3)
    snr_definition: str = "paper_psnr"
    downsample_factor: int = 1
    use_fds: bool = True
    # the FDS variant of the training link (shared/semantic/fds.py); the shipped files up to
    # diffusion-camvid-next.pt were trained with "paper", eq. 2 as published
    fds_variant: str = DEFAULT_FDS_VARIANT.value
    # "all" trains every weight; "spade" only the SPADE layers of an --init-from base, exported as
    # a condition adapter for this downsample factor (shared/semantic/diffusion/adapters.py)
    trainable: str = "all"
    batched_link: bool = True  # false: one simulate_link call per map on the CPU (the reference)
    # budget and bookkeeping
    max_steps: int = 1_000_000
    minutes: float = 60.0  # training time of this call, after loading
    time_budget_s: float = 0.0  # > 0: the whole call's seconds from process start, saving included
    save_parts: str = ""  # folder for the fp16 weights as parts of <= 16 MiB when the call ends
    parts_include: str = "model,ema"  # "ema" alone halves the parts; resuming then starts the model from the EMA
    resume_parts: str = ""  # folder of parts to continue from when out_dir has no state.pt
    export_parts: str = ""  # export the EMA of this parts folder to export_path and exit
    benchmark_steps: int = 0  # > 0: time bare optimiser steps against whole steps, print, exit
    log_every: int = 25
    eval_every: int = 250
    sample_every: int = 1000
    seed: int = 0
    threads: int = 0
    device: str = "auto"


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    parser = config_parser(TrainConfig, __doc__)
    cfg = TrainConfig(**vars(parser.parse_args(argv)))
    if cfg.amp not in AMP_DTYPES:
        parser.error(f"--amp must be one of {sorted(AMP_DTYPES)}, not {cfg.amp!r}")
    if cfg.fds_variant not in {variant.value for variant in FdsVariant}:
        parser.error(f"--fds-variant must be one of {[variant.value for variant in FdsVariant]}, not {cfg.fds_variant!r}")
    if cfg.trainable not in TRAINABLE:
        parser.error(f"--trainable must be one of {TRAINABLE}, not {cfg.trainable!r}")
    if cfg.trainable == "spade" and not cfg.init_from:
        parser.error("--trainable spade fine-tunes a trained base: give it with --init-from")
    if not set(cfg.parts_include.split(",")) <= {"model", "ema"} or "ema" not in cfg.parts_include.split(","):
        parser.error(f"--parts-include must be 'ema' or 'model,ema', not {cfg.parts_include!r}")
    return cfg


def model_config(cfg: TrainConfig) -> SemanticDiffusionConfig:
    unet = UNetConfig(
        num_classes=CAMVID_INFO.num_classes, image_height=cfg.image_height, image_width=cfg.image_width,
        model_channels=cfg.model_channels, channel_mult=tuple(cfg.channel_mult), num_res_blocks=cfg.num_res_blocks,
        attention_downsample=tuple(cfg.attention_downsample), spade_hidden=cfg.spade_hidden, dropout=cfg.dropout,
    )
    return SemanticDiffusionConfig(unet=unet, diffusion=DiffusionConfig(schedule=cfg.schedule, prediction=cfg.prediction))


def codec_config(cfg: TrainConfig) -> CodecConfig:
    return CodecConfig(num_classes=CAMVID_INFO.num_classes, downsample_factor=cfg.downsample_factor)


def reference_conditions(labels: torch.Tensor, cfg: TrainConfig, rng: np.random.Generator) -> torch.Tensor:
    """Each label map through `simulate_link` (codec, Sionna channel, inverse codec, FDS), one at a time."""
    # Imported here: the batched path needs neither Sionna nor the channel module, and GPU
    # training machines need not have them.
    from shared.semantic.channels import ChannelConfig, SnrDefinition
    from shared.semantic.link import simulate_link

    probs = np.asarray(cfg.snr_weights, dtype=np.float64)
    probs /= probs.sum()
    conditions = []
    for label_map in labels.cpu().numpy():
        snr_db = float(rng.choice(cfg.snr_values_db, p=probs)) if cfg.noisy_training else 100.0
        channel = ChannelConfig(snr_db=snr_db, snr_definition=SnrDefinition(cfg.snr_definition))
        link = simulate_link(label_map, codec_config(cfg), channel, seed=int(rng.integers(2**63)),
                             out_size=(cfg.image_height, cfg.image_width), use_fds=cfg.use_fds,
                             fds_variant=FdsVariant(cfg.fds_variant))
        conditions.append(torch.from_numpy(link.condition))
    return torch.stack(conditions)


def clean_conditions(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """One-hot maps resized to the model's resolution: the 100 dB condition, for evaluation."""
    one_hot = F.one_hot(labels.long(), CAMVID_INFO.num_classes).permute(0, 3, 1, 2).float()
    return resize_batch(one_hot, size)


def to_images(pixels: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) or (B, 3, H, W) uint8 -> float in [-1, 1]."""
    return pixels.float().div_(127.5).sub_(1.0)


def half_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: (v.detach().half() if v.is_floating_point() else v.detach()).cpu() for k, v in module.state_dict().items()}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Trainer:
    def __init__(self, cfg: TrainConfig, started: float | None = None) -> None:
        self.cfg = cfg
        self.started = time.monotonic() if started is None else started
        self.out_dir = Path(cfg.out_dir)
        (self.out_dir / "samples").mkdir(parents=True, exist_ok=True)
        self.device = select_device(cfg.device)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True
        self.model_cfg = model_config(cfg)
        self.size = (cfg.image_height, cfg.image_width)
        self.link_size = (cfg.link_height, cfg.link_width)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        self.model = SemanticUNet(self.model_cfg.unet).to(self.device)
        self.ema = SemanticUNet(self.model_cfg.unet).to(self.device).eval()
        self.ema.load_state_dict(self.model.state_dict())
        self.ema.requires_grad_(False)
        self.diffusion = GaussianDiffusion.from_config(self.model_cfg.diffusion)
        params = freeze_all_but_adapter(self.model) if cfg.trainable == "spade" else list(self.model.parameters())
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.amp_dtype = AMP_DTYPES[cfg.amp] if self.device.type == "cuda" else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype is torch.float16)
        self.step = 0
        self.warm_from = 0  # the step the learning-rate warm-up counts from
        self.best_val = float("inf")
        self.wall_seconds = 0.0
        self.rng = np.random.default_rng(cfg.seed)  # the reference link's SNRs and seeds
        self.gen = torch.Generator(self.device).manual_seed(cfg.seed)  # flips, dropout, batched link
        self.codec = codec_config(cfg)
        self.images, self.labels = self._device_split("train")
        val_images, val_labels = self._device_split("val")
        self.val_batch = self._fixed_val_batch(val_images, val_labels)
        self.save_seconds = 2.0  # until measured

    def _device_split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, h, w) uint8 images at the model's size and (N, H, W) uint8 labels at the link's,
        on the training device (CamVid train at 96x128 is about 6 MB)."""
        labels = camvid(self.cfg.data_root, split, size=self.link_size)
        images = labels if self.link_size == self.size else camvid(self.cfg.data_root, split, size=self.size)
        return (torch.from_numpy(images.images).permute(0, 3, 1, 2).contiguous().to(self.device),
                torch.from_numpy(labels.labels).to(self.device))

    def _fixed_val_batch(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """A fixed set of val images, timesteps and noise, so val losses are comparable over time.

        Their conditions are the clean maps at factor 1, and what the link delivers at 100 dB at a
        larger factor: the blur an adapter learns is in the condition even without noise."""
        g = torch.Generator().manual_seed(1234)
        idx = torch.randperm(len(images), generator=g)[:32]
        x0 = to_images(images[idx.to(self.device)]).cpu()
        labs = labels[idx.to(self.device)].long().cpu()
        if self.codec.downsample_factor == 1:
            cond = clean_conditions(labs, self.size)
        else:
            cond = batched_conditions(labs, self.codec, torch.full((len(idx),), 100.0), self.size,
                                      snr_definition=self.cfg.snr_definition, use_fds=self.cfg.use_fds,
                                      fds_variant=FdsVariant(self.cfg.fds_variant), generator=g)
        return {
            "x0": x0, "labels": labs, "cond": cond,
            "t": torch.randint(0, self.diffusion.num_timesteps, (len(idx),), generator=g),
            "noise": torch.randn(x0.shape, generator=g),
        }

    # --- state -----------------------------------------------------------------------------------
    def save_state(self) -> None:
        started = time.monotonic()
        state = {
            "model": self.model.state_dict(), "ema": self.ema.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(), "step": self.step, "warm_from": self.warm_from,
            "best_val": self.best_val, "wall_seconds": self.wall_seconds, "config": dataclasses.asdict(self.cfg),
            "rng": {"torch": torch.get_rng_state(), "numpy": self.rng.bit_generator.state, "python": random.getstate(),
                    "device": self.gen.get_state()},
        }
        save_atomically(state, self.out_dir / "state.pt")
        self.save_seconds = time.monotonic() - started

    def parts_payload(self) -> dict:
        payload = {
            "kind": PARTS_KIND, "model_config": dataclasses.asdict(self.model_cfg), "train_config": dataclasses.asdict(self.cfg),
            "step": self.step, "best_val": self.best_val, "wall_seconds": self.wall_seconds, "ema": half_state(self.ema),
        }
        if "model" in self.cfg.parts_include.split(","):
            payload["model"] = half_state(self.model)
        return payload

    def write_parts(self, folder: Path) -> list[Path]:
        started = time.monotonic()
        parts = save_parts(self.parts_payload(), folder)
        self.save_seconds += time.monotonic() - started
        return parts

    def resume_from_parts(self, folder: Path) -> None:
        """Continue from fp16 parts: weights and counters; the optimiser starts empty, so the
        learning rate warms up again from this step."""
        payload = load_parts(folder, map_location=self.device)
        if payload.get("kind") != PARTS_KIND:
            raise ValueError(f"{folder} holds {payload.get('kind')!r} parts, not {PARTS_KIND!r}")
        if SemanticDiffusionConfig.from_dict(payload["model_config"]) != self.model_cfg:
            raise ValueError(f"the parts in {folder} were trained with another network configuration")
        self.ema.load_state_dict(payload["ema"])
        self.model.load_state_dict(payload.get("model", payload["ema"]))
        self.step = self.warm_from = int(payload["step"])
        self.best_val, self.wall_seconds = float(payload["best_val"]), float(payload["wall_seconds"])

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
        self.step = self.warm_from = int(payload["meta"].get("step", 0))  # a new optimiser: warm up again
        self.wall_seconds = float(payload["meta"].get("wall_seconds", 0.0))

    def load_state(self) -> str:
        """Resume as the module docstring says; returns how ("state", "parts", "init", "new")."""
        path = self.out_dir / "state.pt"
        if not path.exists():
            if self.cfg.resume_parts and has_parts(self.cfg.resume_parts):
                self.resume_from_parts(Path(self.cfg.resume_parts))
                return "parts"
            if self.cfg.init_from:
                self.warm_start(Path(self.cfg.init_from))
                return "init"
            return "new"
        state = torch.load(path, map_location=self.device, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.best_val, self.wall_seconds = state["step"], state["best_val"], state["wall_seconds"]
        self.warm_from = state.get("warm_from", 0)
        torch.set_rng_state(state["rng"]["torch"])
        self.rng.bit_generator.state = state["rng"]["numpy"]
        random.setstate(state["rng"]["python"])
        if "device" in state["rng"]:
            self.gen.set_state(state["rng"]["device"].cpu())
        return "state"

    def export(self, val_loss: float) -> None:
        """The EMA weights as a shipped checkpoint, or as a condition adapter with --trainable spade."""
        meta = {
            "name": self.cfg.model_name, "step": self.step, "val_loss": val_loss, "wall_seconds": round(self.wall_seconds),
            "noisy_training": self.cfg.noisy_training, "data": "CamVid train split (367 images)",
            "command": "python -m training.train_diffusion " + " ".join(sys.argv[1:]),
        }
        if self.cfg.trainable == "spade":
            save_adapter(self.cfg.export_path, self.ema, self.model_cfg,
                         {**meta, "base": self.cfg.init_from, "downsample_factor": self.cfg.downsample_factor})
        else:
            save_checkpoint(self.cfg.export_path, CHECKPOINT_KIND, self.model_cfg, self.ema.state_dict(), meta)

    # --- steps -----------------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        """Linear warm-up from `warm_from`: `warmup_steps` for a new run, `rewarm_steps` after parts."""
        span = self.cfg.warmup_steps if self.warm_from == 0 else self.cfg.rewarm_steps
        return self.cfg.lr * min(1.0, (step - self.warm_from + 1) / span) if span > 0 else self.cfg.lr

    def next_batch(self, order: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Images at the model's size and label maps at the link's, flipped together at random."""
        idx = torch.tensor([order.pop() for _ in range(self.cfg.batch_size)], device=self.device)
        images, labels = self.images[idx], self.labels[idx]
        flip = torch.rand(len(idx), generator=self.gen, device=self.device) < 0.5
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        labels = torch.where(flip[:, None, None], labels.flip(-1), labels)
        return to_images(images), labels

    def conditions(self, labels: torch.Tensor) -> torch.Tensor:
        """The noisy received maps for these label maps, with condition dropout applied."""
        cfg = self.cfg
        if cfg.batched_link:
            n = labels.shape[0]
            if cfg.noisy_training:
                snr = draw_snr_db(n, cfg.snr_values_db, cfg.snr_weights, self.gen, self.device)
            else:
                snr = torch.full((n,), 100.0, device=self.device)
            cond = batched_conditions(labels, self.codec, snr, self.size, snr_definition=cfg.snr_definition,
                                      use_fds=cfg.use_fds, fds_variant=FdsVariant(cfg.fds_variant), generator=self.gen)
        else:
            cond = reference_conditions(labels, cfg, self.rng).to(self.device)
        drop = torch.rand(cond.shape[0], generator=self.gen, device=self.device) < cfg.condition_dropout
        return cond * (~drop).to(cond.dtype)[:, None, None, None]  # zeros: the null label of guidance

    def optimise(self, x0: torch.Tensor, cond: torch.Tensor) -> dict[str, torch.Tensor]:
        """One optimiser step on a ready batch (the bare step of the benchmark)."""
        for g in self.optimizer.param_groups:
            g["lr"] = self.lr_at(self.step)
        t = torch.randint(0, self.diffusion.num_timesteps, (x0.shape[0],), device=self.device)
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            losses = self.diffusion.training_losses(lambda x, ts: self.model(x, ts, cond), x0, t)
        loss = losses["loss"].mean()
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.update_ema()
        return {k: v.detach().mean() for k, v in losses.items()}

    def train_step(self, order: list[int]) -> dict[str, torch.Tensor]:
        x0, labels = self.next_batch(order)
        return self.optimise(x0, self.conditions(labels))

    @torch.no_grad()
    def update_ema(self) -> None:
        decay = min(self.cfg.ema_decay, (1 + self.step) / (10 + self.step))
        torch._foreach_lerp_(list(self.ema.parameters()), list(self.model.parameters()), 1 - decay)

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
        log_record(self.out_dir, {"step": self.step, "wall_s": round(self.wall_seconds, 1), **record})

    def benchmark(self, steps: int) -> dict[str, float]:
        """Seconds per step: the optimiser step alone on one ready batch, the condition pipeline
        alone, and whole training steps (batch, conditions, step). Weights change; nothing is saved."""
        order = torch.randperm(len(self.images)).tolist() * (3 * steps // len(self.images) + 3)
        x0, labels = self.next_batch(order)
        cond = self.conditions(labels)

        def timed(fn) -> float:
            for _ in range(3):
                fn()
            sync(self.device)
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            sync(self.device)
            return (time.perf_counter() - t0) / steps

        result = {
            "bare_step_s": timed(lambda: self.optimise(x0, cond)),
            "conditions_s": timed(lambda: self.conditions(labels)),
            "full_step_s": timed(lambda: self.train_step(order)),
        }
        result["overhead"] = result["full_step_s"] / result["bare_step_s"] - 1
        self.log({"event": "benchmark", "batch_size": self.cfg.batch_size, "batched_link": self.cfg.batched_link,
                  **{k: round(v, 5) for k, v in result.items()}})
        return result

    def deadline(self) -> float:
        if self.cfg.time_budget_s > 0:
            return self.started + self.cfg.time_budget_s
        return time.monotonic() + self.cfg.minutes * 60

    def run(self) -> str:
        """Train until max_steps, the time budget or SIGTERM; save (and write parts); return why it stopped."""
        cfg = self.cfg
        resumed = self.load_state()
        self.log({"event": "start", "resumed": resumed, "device": str(self.device), "config": dataclasses.asdict(cfg),
                  "parameters": sum(p.numel() for p in self.model.parameters())})
        stop = {"now": False}
        signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
        deadline = self.deadline()
        order: list[int] = []
        running: dict[str, torch.Tensor] = {}
        step_times: list[float] = []
        reason = "max_steps"
        while self.step < cfg.max_steps:
            # stop while there is still time to save: a few steps' worth plus the last save's time
            reserve = 3 * (statistics.median(step_times[-20:]) if step_times else 1.0) + 2 * self.save_seconds
            if stop["now"] or time.monotonic() + reserve > deadline:
                reason = "signal" if stop["now"] else "budget"
                break
            if len(order) < cfg.batch_size:
                order = torch.randperm(len(self.images)).tolist()
            started = time.monotonic()
            losses = self.train_step(order)
            self.step += 1
            for k, v in losses.items():
                running[k] = running.get(k, 0.0) + v
            if self.step % cfg.log_every == 0:  # reading the losses waits for the device: only here
                self.log({k: round(float(v) / cfg.log_every, 5) for k, v in running.items()} | {"lr": self.lr_at(self.step - 1)})
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
            elapsed = time.monotonic() - started
            self.wall_seconds += elapsed
            step_times.append(elapsed)
        self.save_state()
        record = {"event": "stop", "reason": reason, "call_seconds": round(time.monotonic() - self.started, 1)}
        if cfg.save_parts:
            parts = self.write_parts(Path(cfg.save_parts))
            record["parts"] = [f"{p.name} {p.stat().st_size}" for p in parts]
        self.log(record)
        return reason


def export_parts(cfg: TrainConfig) -> Path:
    """Write the EMA weights of a parts folder as a shipped checkpoint (`export_path`), or as a
    condition adapter when they were trained with --trainable spade."""
    payload = load_parts(cfg.export_parts)
    if payload.get("kind") != PARTS_KIND:
        raise ValueError(f"{cfg.export_parts} holds {payload.get('kind')!r} parts, not {PARTS_KIND!r}")
    train = payload["train_config"]
    meta = {"name": train["model_name"], "step": payload["step"], "val_loss": payload["best_val"],
            "wall_seconds": round(payload["wall_seconds"]), "noisy_training": train["noisy_training"],
            "data": "CamVid train split (367 images)", "train_config": train}
    config = SemanticDiffusionConfig.from_dict(payload["model_config"])
    if train.get("trainable") == "spade":
        network = SemanticUNet(config.unet)
        network.load_state_dict({name: t.float() for name, t in payload["ema"].items()})
        save_adapter(cfg.export_path, network, config,
                     {**meta, "base": train["init_from"], "downsample_factor": train["downsample_factor"]})
    else:
        save_checkpoint(cfg.export_path, CHECKPOINT_KIND, config, payload["ema"], meta)
    return Path(cfg.export_path)


def main(argv: list[str] | None = None) -> str:
    started = time.monotonic()
    cfg = parse_config(argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.export_parts:
        return str(export_parts(cfg))
    trainer = Trainer(cfg, started)
    if cfg.benchmark_steps:
        return json.dumps(trainer.benchmark(cfg.benchmark_steps))
    return trainer.run()


if __name__ == "__main__":
    main()
