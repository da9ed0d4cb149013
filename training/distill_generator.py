"""Distil the semantic generator into a student that samples in one or two network calls.

    python -m training.distill_generator --data-root ../shared/data/camvid --minutes 100

Read top to bottom: config -> teacher trajectories -> the student's loss -> Trainer -> main.
shared/semantic/diffusion/distilled.py says what a student is; models/diffusion-camvid-distilled.md
has the numbers.

The recipe, one command, bounded by --minutes and resumable (run it again with the same
--out-dir), on the CPU or a GPU unchanged:

1. Trajectories. Train label maps (randomly mirrored) go through the noisy link the base trains on
   (codec, AWGN at a PSNR drawn from the base's list, inverse codec, FDS); the teacher samples each
   with DDIM over gesco.options.DISTILLATION_TEACHER's steps, guided at --guidance, from its own
   noise, and every state on the way plus the final image are kept (fp16 chunks in
   <out_dir>/trajectories, so generation resumes chunk by chunk). A fixed set from the val label
   maps, at 1, 10 and 100 dB, is the validation set. A call spends at most --generation-share of
   its minutes generating, then trains on what there is.
2. The student starts as a copy of the teacher. From a state x_t at one of the teacher's
   timesteps it learns to predict the trajectory's final image: the MSE between that image and the
   x_0 its velocity output implies at (x_t, t), unclipped. The states the samplers start from
   (t = T-1 for one and two steps, the middle timestep for the second of two) are drawn most, and a
   share of the middle states are the student's own landing points (its DDIM jump from the
   trajectory's noise), which is what its second step sees when it samples.
3. EMA weights. Validation runs the `distilled` sampler itself, 1 and 2 steps from the stored
   noise, against the teacher's images (MSE in [-1, 1]); whenever their mean improves, the EMA is
   exported (fp16) with its distillation record, beside the teacher by default.

--downsample-factor F distils for maps sent at factor F: the link codes the maps at that factor, the
teacher is the base with its factor-F condition adapter where one lies beside it, and the student
is written as <stem>.fF.distilled.pt. --init-from starts the student from another student of the
same network (the full-resolution one: it has learned the jump already) instead of the teacher.

The trajectories and the state are tied to the teacher's weights (their fingerprint): a new
teacher needs a new --out-dir.
"""
from __future__ import annotations

import copy
import dataclasses
import random
import signal
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gesco.options import DEFAULT_GUIDANCE, DISTILLATION_TEACHER
from shared.semantic.batched_link import batched_conditions, draw_snr_db
from shared.semantic.checkpoints import save_checkpoint
from shared.semantic.codec import CodecConfig
from shared.semantic.data import CAMVID_INFO, camvid
from shared.semantic.device import select_device
from shared.semantic.diffusion.adapters import adapter_paths, with_adapter
from shared.semantic.diffusion.distilled import student_path, teacher_fingerprint
from shared.semantic.diffusion.gaussian_diffusion import GaussianDiffusion
from shared.semantic.diffusion.generator import CHECKPOINT_KIND, SemanticImageGenerator
from shared.semantic.diffusion.samplers import SAMPLERS, Chain, DistilledSampler, GuidedModel, student_timesteps
from training.config_cli import config_parser
from training.run_state import log_record, save_atomically
from training.train_diffusion import TrainConfig

VAL_SNRS_DB = (1.0, 10.0, 100.0)


@dataclass
class DistillConfig:
    data_root: str = "../shared/data/camvid"
    teacher: str = "models/diffusion-camvid.pt"
    out_dir: str = "runs/distill"
    export_path: str = ""  # "": beside the teacher (distilled.student_path)
    downsample_factor: int = 1  # the link's factor the student serves (its teacher: the base with that adapter)
    init_from: str = ""  # a student checkpoint to start from ("": a copy of the teacher)
    guidance: float = DEFAULT_GUIDANCE  # the teacher's guidance, built into the student
    student_steps: tuple[int, ...] = (1, 2)  # the step counts validated (and trained for)
    # trajectories
    train_trajectories: int = 1024
    val_trajectories: int = 48
    chunk_size: int = 32
    generation_share: float = 0.4  # of a call's minutes, at most, spent generating
    link_height: int = TrainConfig.link_height
    link_width: int = TrainConfig.link_width
    snr_values_db: tuple[float, ...] = TrainConfig.snr_values_db
    snr_weights: tuple[float, ...] = TrainConfig.snr_weights
    snr_definition: str = TrainConfig.snr_definition
    # which states a batch starts from: t = T-1, the teacher's middle, the student's own landing
    # there; the rest come from the other timesteps of the teacher's trajectory
    start_share: float = 0.4
    middle_share: float = 0.25
    own_middle_share: float = 0.25
    # optimisation
    batch_size: int = 8
    lr: float = 5e-5
    warmup_steps: int = 50
    ema_decay: float = 0.995
    grad_clip: float = 1.0
    # budget and bookkeeping
    minutes: float = 100.0
    max_steps: int = 1_000_000
    eval_every: int = 100
    log_every: int = 25
    seed: int = 0
    threads: int = 0
    device: str = "auto"


def parse_config(argv: list[str] | None = None) -> DistillConfig:
    parser = config_parser(DistillConfig, __doc__)
    cfg = DistillConfig(**vars(parser.parse_args(argv)))
    shares = (cfg.start_share, cfg.middle_share, cfg.own_middle_share)
    if min(shares) < 0 or sum(shares) > 1:
        parser.error(f"the start, middle and own-middle shares must be >= 0 with a sum <= 1, got {shares}")
    for steps in cfg.student_steps:
        try:
            student_timesteps(1000, steps)
        except ValueError as error:
            parser.error(f"--student-steps: {error}")
    return cfg


# --- teacher trajectories ----------------------------------------------------------------------

@torch.inference_mode()
def teacher_trajectories(teacher: SemanticImageGenerator, conditions: torch.Tensor, seeds: list[int],
                         guidance: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's guided chain for each condition: (B, S, 3, H, W) states, noisiest first (the
    first is the noise), and (B, 3, H, W) final images in [-1, 1]."""
    name, steps = DISTILLATION_TEACHER
    sampler = SAMPLERS[name]()
    cfg = teacher.config.unet
    chain = sampler.start(sampler.process(teacher.diffusion, steps), (len(seeds), cfg.in_channels, cfg.image_height,
                          cfg.image_width), teacher.generators(seeds), teacher.device)
    model_fn = GuidedModel(teacher.forward, teacher.device_condition(conditions), guidance)
    states = []
    for _ in range(chain.total):
        states.append(chain.x.clone())
        sampler.step(chain, model_fn(chain.x, chain.model_timesteps()))
    return torch.stack(states, dim=1), chain.x


def teacher_timesteps(diffusion: GaussianDiffusion) -> np.ndarray:
    """The teacher's timesteps, noisiest first: state k of a trajectory is at teacher_timesteps[k]."""
    name, steps = DISTILLATION_TEACHER
    return SAMPLERS[name]().process(diffusion, steps).timestep_map[::-1].copy()


class TrajectoryStore:
    """Chunks of trajectories on disk (fp16), tied to the teacher's fingerprint, loaded into memory."""

    def __init__(self, folder: Path, fingerprint: str) -> None:
        self.folder = folder
        self.fingerprint = fingerprint
        folder.mkdir(parents=True, exist_ok=True)

    def chunks(self, split: str) -> list[Path]:
        return sorted(self.folder.glob(f"{split}-*.pt"))

    def count(self, split: str) -> int:
        """Trajectories of a split on disk (memory-mapped: only the shapes are read)."""
        return sum(int(torch.load(p, weights_only=True, mmap=True)["final"].shape[0]) for p in self.chunks(split))

    def write(self, split: str, chunk: dict[str, torch.Tensor]) -> None:
        path = self.folder / f"{split}-{len(self.chunks(split)):05d}.pt"
        save_atomically({**chunk, "teacher_fingerprint": self.fingerprint}, path)

    def load(self, split: str) -> dict[str, torch.Tensor]:
        """Every chunk of a split, concatenated; ValueError for chunks of another teacher."""
        chunks = [torch.load(p, weights_only=True) for p in self.chunks(split)]
        if any(c["teacher_fingerprint"] != self.fingerprint for c in chunks):
            raise ValueError(f"{self.folder} holds trajectories of another teacher: use a new --out-dir")
        if not chunks:
            return {}
        return {key: torch.cat([c[key] for c in chunks]) for key in ("conditions", "states", "final")}


# --- the trainer -------------------------------------------------------------------------------

class Trainer:
    def __init__(self, cfg: DistillConfig, started: float) -> None:
        self.cfg = cfg
        self.started = started
        self.out_dir = Path(cfg.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.device = select_device(cfg.device)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        self.teacher = SemanticImageGenerator.load(cfg.teacher, device=str(self.device))
        if not self.teacher.info.trained or self.teacher.is_student:
            raise ValueError(f"{cfg.teacher} is not a trained teacher checkpoint")
        self.adapter = adapter_paths(cfg.teacher).get(cfg.downsample_factor)
        if self.adapter is not None:
            self.teacher = with_adapter(self.teacher, self.adapter)
        self.fingerprint = teacher_fingerprint(cfg.teacher, self.adapter)
        self.export_path = Path(cfg.export_path) if cfg.export_path else student_path(cfg.teacher, cfg.downsample_factor)
        self.diffusion = self.teacher.diffusion
        self.timesteps = teacher_timesteps(self.diffusion)
        self.middle = int(np.flatnonzero(self.timesteps == student_timesteps(self.diffusion.num_timesteps, 2)[0])[0])
        start = self.teacher.network
        if cfg.init_from:
            initial = SemanticImageGenerator.load(cfg.init_from, device=str(self.device))
            if not initial.is_student or initial.config != self.teacher.config:
                raise ValueError(f"--init-from {cfg.init_from}: not a student of this network")
            start = initial.network
        self.model = copy.deepcopy(start).train()
        self.ema = copy.deepcopy(start).eval()
        self.ema.requires_grad_(False)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=0.0)
        self.store = TrajectoryStore(self.out_dir / "trajectories", self.fingerprint)
        self.codec = CodecConfig(num_classes=CAMVID_INFO.num_classes, downsample_factor=cfg.downsample_factor)
        self.link_size = (cfg.link_height, cfg.link_width)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.step, self.best, self.wall_seconds = 0, float("inf"), 0.0
        self.save_seconds = 2.0

    # --- trajectories ----------------------------------------------------------------------------
    def labels(self, split: str) -> torch.Tensor:
        return torch.from_numpy(camvid(self.cfg.data_root, split, size=self.link_size).labels).long()

    def generate(self, deadline: float) -> None:
        """Fill the val set, then add train chunks until there are enough or the deadline passes."""
        cfg = self.cfg
        size = (self.teacher.info.image_height, self.teacher.info.image_width)
        val_labels = self.labels("val")
        while (done := self.store.count("val")) < cfg.val_trajectories:
            rows = torch.arange(done, min(done + cfg.chunk_size, cfg.val_trajectories))
            labels = val_labels[rows % len(val_labels)]
            snr = torch.tensor([VAL_SNRS_DB[int(r) % len(VAL_SNRS_DB)] for r in rows])
            g = torch.Generator().manual_seed(10_000 + done)
            self.write_chunk("val", labels, snr, size, g, seeds=[1_000_000 + int(r) for r in rows])
        train_labels = self.labels("train")
        while (done := self.store.count("train")) < cfg.train_trajectories:
            chunk_started = time.monotonic()
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + done)
            picks = torch.randint(len(train_labels), (min(cfg.chunk_size, cfg.train_trajectories - done),), generator=g)
            labels = train_labels[picks]
            mirrored = torch.rand(len(picks), generator=g) < 0.5
            labels = torch.where(mirrored[:, None, None], labels.flip(-1), labels)
            snr = draw_snr_db(len(picks), cfg.snr_values_db, cfg.snr_weights, generator=g)
            self.write_chunk("train", labels, snr, size, g, seeds=[done + i for i in range(len(picks))])
            self.log({"event": "trajectories", "train": done + len(picks), "chunk_s": round(time.monotonic() - chunk_started, 1)})
            if time.monotonic() + (time.monotonic() - chunk_started) > deadline:
                break

    def write_chunk(self, split: str, labels: torch.Tensor, snr: torch.Tensor, size: tuple[int, int],
                    g: torch.Generator, seeds: list[int]) -> None:
        conditions = batched_conditions(labels, self.codec, snr, size, snr_definition=self.cfg.snr_definition,
                                        use_fds=True, generator=g)
        states, final = teacher_trajectories(self.teacher, conditions, seeds, self.cfg.guidance)
        self.store.write(split, {"conditions": conditions.half().cpu(), "states": states.half().cpu(),
                                 "final": final.half().cpu(), "snr_db": snr, "seeds": torch.tensor(seeds)})

    # --- the student's loss ----------------------------------------------------------------------
    def x_start(self, network: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
        """The x_0 a network's output implies at (x, t), unclipped."""
        prediction = network(x, t, conditions)[:, : x.shape[1]]
        return self.diffusion.start_and_eps(prediction, x, t)[0]

    @torch.no_grad()
    def own_landing(self, noise: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
        """Where the student's first of two steps lands: DDIM from the noise at t = T-1 to the middle."""
        first, middle = int(self.timesteps[0]), int(self.timesteps[self.middle])
        t = torch.full((len(noise),), first, device=self.device)
        x0 = self.x_start(self.model, noise, t, conditions).clamp(-1, 1)
        abar = self.diffusion.alphas_cumprod
        eps = (noise - np.sqrt(abar[first]) * x0) / np.sqrt(1 - abar[first])
        return float(np.sqrt(abar[middle])) * x0 + float(np.sqrt(1 - abar[middle])) * eps

    def pick_states(self) -> int:
        """Which state of the trajectories a batch starts from (-1: the student's own landing)."""
        cfg, u = self.cfg, random.random()
        if u < cfg.start_share:
            return 0
        if u < cfg.start_share + cfg.middle_share:
            return self.middle
        if u < cfg.start_share + cfg.middle_share + cfg.own_middle_share:
            return -1
        return random.choice([k for k in range(1, len(self.timesteps)) if k != self.middle])

    def train_step(self, data: dict[str, torch.Tensor]) -> float:
        cfg = self.cfg
        rows = torch.randint(len(data["final"]), (cfg.batch_size,), generator=self.gen)
        conditions = data["conditions"][rows].float().to(self.device)
        final = data["final"][rows].float().to(self.device)
        k = self.pick_states()
        if k < 0:
            x = self.own_landing(data["states"][rows, 0].float().to(self.device), conditions)
            k = self.middle
        else:
            x = data["states"][rows, k].float().to(self.device)
        t = torch.full((cfg.batch_size,), int(self.timesteps[k]), device=self.device)
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr * min(1.0, (self.step + 1) / max(cfg.warmup_steps, 1))
        loss = F.mse_loss(self.x_start(self.model, x, t, conditions), final)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        decay = min(cfg.ema_decay, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            torch._foreach_lerp_(list(self.ema.parameters()), list(self.model.parameters()), 1 - decay)
        return float(loss.detach())

    @torch.inference_mode()
    def validate(self, data: dict[str, torch.Tensor]) -> dict[str, float]:
        """MSE to the teacher's images of the distilled sampler run by the EMA from the stored noise."""
        sampler = DistilledSampler()
        result = {}
        for steps in self.cfg.student_steps:
            errors = []
            for first in range(0, len(data["final"]), self.cfg.chunk_size):
                rows = slice(first, first + self.cfg.chunk_size)
                noise = data["states"][rows, 0].float().to(self.device)
                model_fn = GuidedModel(self.ema, data["conditions"][rows].float().to(self.device), 0.0)
                process = sampler.process(self.diffusion, steps)
                chain = Chain(process, noise, np.full(len(noise), process.num_timesteps - 1), [], {})
                while not chain.finished.all():
                    sampler.step(chain, model_fn(chain.x, chain.model_timesteps()))
                errors.append(((chain.x - data["final"][rows].float().to(self.device)) ** 2).flatten(1).mean(1))
            result[f"val_mse_{steps}"] = float(torch.cat(errors).mean())
        result["val_mse"] = float(np.mean([result[f"val_mse_{s}"] for s in self.cfg.student_steps]))
        return result

    # --- state and export ------------------------------------------------------------------------
    def save_state(self) -> None:
        started = time.monotonic()
        state = {"model": self.model.state_dict(), "ema": self.ema.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "step": self.step, "best": self.best, "wall_seconds": self.wall_seconds,
                 "teacher_fingerprint": self.fingerprint, "config": dataclasses.asdict(self.cfg),
                 "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "gen": self.gen.get_state()}}
        save_atomically(state, self.out_dir / "state.pt")
        self.save_seconds = time.monotonic() - started

    def load_state(self) -> bool:
        path = self.out_dir / "state.pt"
        if not path.exists():
            return False
        state = torch.load(path, map_location=self.device, weights_only=False)
        if state["teacher_fingerprint"] != self.fingerprint:
            raise ValueError(f"{path} distils another teacher than {self.cfg.teacher}: use a new --out-dir")
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.best, self.wall_seconds = state["step"], state["best"], state["wall_seconds"]
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        self.gen.set_state(state["rng"]["gen"])
        return True

    def export(self, val: dict[str, float], trajectories: int) -> None:
        cfg, info = self.cfg, self.teacher.info
        meta = {"name": f"{info.name}-distilled", "step": self.step, "wall_seconds": round(self.wall_seconds),
                "data": "CamVid train split (367 images)", "train_config": dataclasses.asdict(cfg),
                "distillation": {"teacher": Path(cfg.teacher).name, "teacher_fingerprint": self.fingerprint,
                                 "downsample_factor": cfg.downsample_factor,
                                 "adapter": self.adapter.name if self.adapter else None,
                                 "teacher_sampler": DISTILLATION_TEACHER[0], "teacher_steps": DISTILLATION_TEACHER[1],
                                 "guidance": cfg.guidance, "steps": list(cfg.student_steps),
                                 "trajectories": trajectories, **{k: round(v, 6) for k, v in val.items()}}}
        save_checkpoint(self.export_path, CHECKPOINT_KIND, self.teacher.config, self.ema.state_dict(), meta)

    def log(self, record: dict) -> None:
        log_record(self.out_dir, {"step": self.step, "wall_s": round(self.wall_seconds, 1), **record})

    def run(self) -> str:
        cfg = self.cfg
        resumed = self.load_state()
        self.log({"event": "start", "resumed": resumed, "device": str(self.device), "config": dataclasses.asdict(cfg),
                  "teacher_timesteps": self.timesteps.tolist()})
        stop = {"now": False}
        signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
        deadline = self.started + cfg.minutes * 60
        self.generate(self.started + cfg.generation_share * cfg.minutes * 60)
        data, val_data = self.store.load("train"), self.store.load("val")
        if not data:
            raise RuntimeError("no train trajectories: give the call more minutes")
        self.log({"event": "data", "train": len(data["final"]), "val": len(val_data["final"])})
        step_times: list[float] = []
        running, reason = [], "max_steps"
        while self.step < cfg.max_steps:
            reserve = 3 * (statistics.median(step_times[-20:]) if step_times else 1.0) + 2 * self.save_seconds
            if stop["now"] or time.monotonic() + reserve > deadline:
                reason = "signal" if stop["now"] else "budget"
                break
            started = time.monotonic()
            running.append(self.train_step(data))
            self.step += 1
            if self.step % cfg.log_every == 0:
                self.log({"loss": round(float(np.mean(running)), 6), "lr": self.optimizer.param_groups[0]["lr"]})
                running = []
            if self.step % cfg.eval_every == 0:
                val = self.validate(val_data)
                improved = val["val_mse"] < self.best
                if improved:
                    self.best = val["val_mse"]
                    self.export(val, len(data["final"]))
                self.save_state()
                self.log({"event": "eval", **{k: round(v, 6) for k, v in val.items()}, "exported": improved})
            elapsed = time.monotonic() - started
            self.wall_seconds += elapsed
            step_times.append(elapsed)
        self.save_state()
        self.log({"event": "stop", "reason": reason, "call_seconds": round(time.monotonic() - self.started, 1)})
        return reason


def main(argv: list[str] | None = None) -> str:
    started = time.monotonic()
    cfg = parse_config(argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return Trainer(cfg, started).run()


if __name__ == "__main__":
    main()
