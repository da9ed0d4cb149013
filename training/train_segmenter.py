"""Train the CamVid segmenter (shared/semantic/segmenter.py) within a wall-clock budget.

    python -m training.train_segmenter --data-root ../shared/data/camvid --minutes 45

Read top to bottom: config -> data -> class weights -> augmentation -> model/optimiser ->
(resume) -> loop with periodic validation -> best model to models/segmenter-camvid.pt.

Choices (see models/segmenter-camvid.md for the numbers they gave):

* Input 96x128 (the diffusion model's resolution); crops are taken from the 192x256 source so
  zoomed-in crops keep detail.
* Loss: cross-entropy with "sqrt median-frequency" class weights w_c = sqrt(median_f / f_c)
  from the train label frequencies (f_c over the 11 real classes), which lifts the rare classes
  (pole, sign, pedestrian, bicyclist, fence) without the over-prediction that full
  median-frequency weights cause. Void (11) is trained with a small fixed weight
  (`void_weight`, default 0.1) rather than ignored, so the segmenter can still say "void" for
  clutter that belongs to no class (the diffusion model was trained on maps with void); set
  `--void-weight 0` to ignore it entirely.
* Validation reports mIoU over the 11 real classes with void target pixels ignored (the CamVid
  convention; real-class pixels predicted as void count as misses) and mIoU over all 12 ids.
  The best model is chosen by the void-excluded number.
* Augmentation: horizontal flip, random zoom-crop, colour jitter, and a down-up resample
  (96x128 -> 48x64 -> 96x128, plus mild noise) so the segmenter copes with the soft, low-resolution
  images the diffusion model generates.
* AdamW, linear warm-up then cosine decay over a step budget fixed after timing the first steps
  (stored in the state, so a resumed run follows the same schedule).
* Resumable: runs/segmenter/state.pt (model, optimiser, step, epoch, RNG states, elapsed time)
  is written at the end of every epoch; rerunning the same command continues from it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from shared.semantic.data import CAMVID_CLASSES, CAMVID_INFO, SegmentationPairs, camvid
from shared.semantic.device import select_device
from shared.semantic.segmenter import (
    CHECKPOINT_KIND,
    SegmenterConfig,
    SegmenterNet,
    confusion_matrix,
    count_parameters,
    miou,
    per_class_iou,
    pixel_accuracy,
)
from shared.semantic.checkpoints import save_checkpoint


@dataclass
class TrainConfig:
    data_root: str = "../shared/data/camvid"
    out_dir: str = "runs/segmenter"
    model_path: str = "models/segmenter-camvid.pt"
    device: str = "auto"
    threads: int = 1
    seed: int = 0
    # model
    base_channels: int = 32
    input_height: int = 96
    input_width: int = 128
    dropout: float = 0.1
    # optimisation
    minutes: float = 45.0  # wall-clock budget for the whole run (resumes included)
    max_steps: int = 0  # 0: derived from the budget after timing the first steps
    batch_size: int = 16
    lr: float = 3e-3
    weight_decay: float = 1e-2
    warmup_steps: int = 100
    min_lr_ratio: float = 0.02
    grad_clip: float = 5.0
    # loss
    void_weight: float = 0.1  # 0 -> void ignored
    weight_power: float = 0.5  # 1 = median-frequency balancing, 0.5 = its square root, 0 = unweighted
    # augmentation
    zoom_max: float = 1.75  # zoom-crop factor drawn in [1, zoom_max] (1 = whole frame)
    zoom_prob: float = 0.8
    jitter_prob: float = 0.8
    downup_prob: float = 0.35
    noise_prob: float = 0.2
    # bookkeeping
    eval_every_epochs: int = 1
    log_every: int = 10
    resume: bool = True
    eval_only: bool = False  # evaluate the shipped model_path on val (several input resolutions) and exit


# ----------------------------------------------------------------------------- helpers


def log(cfg: TrainConfig, msg: str) -> None:
    line = f"{time.strftime('%H:%M:%S')} {msg}"
    print(line, flush=True)
    with open(Path(cfg.out_dir) / "log.txt", "a") as f:
        f.write(line + "\n")


def class_weights(freq: np.ndarray, void_id: int, void_weight: float, power: float) -> torch.Tensor:
    """w_c = (median_f / f_c) ** power over the real classes; void gets `void_weight`."""
    real = [c for c in range(len(freq)) if c != void_id]
    f = np.maximum(freq[real], 1e-6)
    w = np.ones(len(freq))
    w[real] = (np.median(f) / f) ** power
    w[void_id] = void_weight
    return torch.tensor(w, dtype=torch.float32)


def augment(images: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig, void_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,3,H0,W0) [-1,1] source-resolution batch -> (B,3,h,w) augmented batch at the input size.

    Flips were already applied by the dataset. All randomness comes from torch's global RNG.
    """
    out_hw = (cfg.input_height, cfg.input_width)
    xs, ys = [], []
    b, _, H, W = images.shape
    for i in range(b):
        x, y = images[i : i + 1], labels[i : i + 1, None].float()
        zoom = 1.0
        if torch.rand(()) < cfg.zoom_prob:
            zoom = 1.0 + float(torch.rand(())) * (cfg.zoom_max - 1.0)
        ch, cw = int(round(H / zoom)), int(round(W / zoom))
        top = int(torch.randint(0, H - ch + 1, ()))
        left = int(torch.randint(0, W - cw + 1, ()))
        x = x[..., top : top + ch, left : left + cw]
        y = y[..., top : top + ch, left : left + cw]
        x = F.interpolate(x, size=out_hw, mode="bilinear", align_corners=False, antialias=True)
        y = F.interpolate(y, size=out_hw, mode="nearest")
        if torch.rand(()) < cfg.jitter_prob:  # brightness, contrast, saturation
            u = (x + 1) / 2
            u = u * (0.75 + 0.5 * torch.rand(()))
            mean = u.mean()
            u = (u - mean) * (0.75 + 0.5 * torch.rand(())) + mean
            gray = u.mean(1, keepdim=True)
            u = (u - gray) * (0.6 + 0.8 * torch.rand(())) + gray
            x = u.clamp(0, 1) * 2 - 1
        if torch.rand(()) < cfg.downup_prob:  # low-resolution look of generated images
            f = 2 if torch.rand(()) < 0.75 else 4
            small = F.interpolate(x, size=(out_hw[0] // f, out_hw[1] // f), mode="bilinear", antialias=True, align_corners=False)
            x = F.interpolate(small, size=out_hw, mode="bilinear", align_corners=False)
        if torch.rand(()) < cfg.noise_prob:
            x = (x + torch.randn_like(x) * 0.06 * torch.rand(())).clamp(-1, 1)
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)[:, 0].long()


@torch.no_grad()
def evaluate(model: SegmenterNet, val: SegmentationPairs, device: torch.device, num_classes: int, void_id: int) -> dict:
    """Val metrics at the dataset's resolution; the image is resized to the model input first."""
    model.eval()
    conf = np.zeros((num_classes, num_classes), dtype=np.int64)
    size = (model.config.input_height, model.config.input_width)
    for start in range(0, len(val), 32):
        xb, yb = zip(*(val[i] for i in range(start, min(start + 32, len(val)))))
        x, y = torch.stack(xb).to(device), torch.stack(yb)
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        pred = model(x).argmax(1)
        if tuple(pred.shape[-2:]) != tuple(y.shape[-2:]):
            pred = F.interpolate(pred[:, None].float(), size=y.shape[-2:], mode="nearest")[:, 0].long()
        conf += confusion_matrix(pred.cpu(), y, num_classes)
    conf_real = conf.copy()
    conf_real[void_id, :] = 0  # == ignore_index=void
    model.train()
    return {
        "miou_void_excluded": miou(conf_real, exclude=[void_id]),
        "miou_with_void": miou(conf),
        "pixel_acc_void_excluded": pixel_accuracy(conf_real),
        "per_class_iou": [None if math.isnan(v) else round(float(v), 4) for v in per_class_iou(conf_real)[:void_id]]
        + [None if math.isnan(v) else round(float(v), 4) for v in per_class_iou(conf)[void_id:]],
        "confusion": conf.tolist(),
    }


def evaluate_shipped(cfg: TrainConfig) -> dict:
    """Val metrics of the fp16 file at `model_path`, loaded through `Segmenter` as the services do:
    at the model input size, at the 192x256 label resolution (predict at the input size, nearest
    upsample), and on inputs degraded by a 48x64 down-up resample (a stand-in for soft generated
    images)."""
    from shared.semantic.segmenter import Segmenter

    seg = Segmenter.from_checkpoint(cfg.model_path, cfg.device)
    void_id, k = CAMVID_INFO.ignore_index, CAMVID_INFO.num_classes
    results = {}
    for name, size, degrade in (("input_size", (cfg.input_height, cfg.input_width), None),
                                ("full_192x256", (192, 256), None),
                                ("downup_48x64", (cfg.input_height, cfg.input_width), (48, 64))):
        val = camvid(cfg.data_root, "val", size)
        conf = np.zeros((k, k), dtype=np.int64)
        for i in range(len(val)):
            x, y = val[i]
            x = x[None]
            if degrade is not None:
                x = F.interpolate(x, size=degrade, mode="bilinear", antialias=True, align_corners=False)
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            conf += confusion_matrix(seg.segment_batch(x)[0], y, k)
        conf_real = conf.copy()
        conf_real[void_id] = 0
        ious = per_class_iou(conf_real)
        results[name] = {
            "miou_void_excluded": miou(conf_real, exclude=[void_id]),
            "miou_with_void": miou(conf),
            "pixel_acc_void_excluded": pixel_accuracy(conf_real),
            "per_class_iou": {n: (None if math.isnan(v) else round(float(v), 4))
                              for n, v in zip(CAMVID_CLASSES, list(ious[:void_id]) + [per_class_iou(conf)[void_id]])},
        }
    print(json.dumps(results, indent=1))
    return results


def lr_at(step: int, cfg: TrainConfig, total: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            typ = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            parser.add_argument(flag, type=typ, default=f.default)
    return TrainConfig(**vars(parser.parse_args(argv)))


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_args(argv)
    if cfg.eval_only:
        torch.set_num_threads(cfg.threads)
        return evaluate_shipped(cfg)
    command = "python -m training.train_segmenter " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    torch.set_num_threads(cfg.threads)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state_path = out_dir / "state.pt"
    device = select_device(cfg.device)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)

    # data: train at the 192x256 source resolution (crops are resized to the input size), val at
    # the input size, the resolution the evaluation of generated images works at.
    void_id = CAMVID_INFO.ignore_index
    num_classes = CAMVID_INFO.num_classes
    train = camvid(cfg.data_root, "train", (192, 256), flip=True)
    val = camvid(cfg.data_root, "val", (cfg.input_height, cfg.input_width))
    freq = train.class_frequencies()
    weights = class_weights(freq, void_id, cfg.void_weight, cfg.weight_power).to(device)
    ignore = void_id if cfg.void_weight == 0 else -100

    model_cfg = SegmenterConfig(
        num_classes=num_classes,
        base_channels=cfg.base_channels,
        input_height=cfg.input_height,
        input_width=cfg.input_width,
        dropout=cfg.dropout,
        ignore_index=void_id,
    )
    model = SegmenterNet(model_cfg).to(device)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
    )
    shuffle_gen = torch.Generator().manual_seed(cfg.seed)

    step, epoch, elapsed, total_steps, best, history = 0, 0, 0.0, cfg.max_steps, -1.0, []
    if cfg.resume and state_path.is_file():
        st = torch.load(state_path, map_location="cpu", weights_only=False)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        step, epoch, elapsed, total_steps, best = st["step"], st["epoch"], st["elapsed"], st["total_steps"], st["best"]
        history = st["history"]
        torch.set_rng_state(st["torch_rng"])
        shuffle_gen.set_state(st["shuffle_rng"])
        random.setstate(st["py_rng"])
        np.random.set_state(st["np_rng"])
        if cfg.max_steps:
            total_steps = cfg.max_steps  # an explicit step budget may be raised to continue a run
        log(cfg, f"resumed from {state_path}: step {step}, epoch {epoch}, elapsed {elapsed:.0f}s, best {best:.4f}")
    else:
        log(cfg, f"config {json.dumps(dataclasses.asdict(cfg))}")
        log(cfg, f"model {count_parameters(model):,} params, train {len(train)} / val {len(val)}, device {device}")
        log(cfg, "class freq " + " ".join(f"{n}={f:.4f}" for n, f in zip(CAMVID_CLASSES, freq)))
        log(cfg, "class weights " + " ".join(f"{n}={w:.3f}" for n, w in zip(CAMVID_CLASSES, weights.tolist())))

    budget = cfg.minutes * 60.0
    steps_per_epoch = len(train) // cfg.batch_size
    session_start = time.time() - elapsed
    timing: list[float] = []
    # With --max-steps 0 the step budget is re-estimated after every epoch from the measured time
    # per step (validation included), so the cosine reaches its end when the wall budget does even
    # on a shared machine whose speed changes; it is stored in the state for resuming.
    auto_steps = cfg.max_steps == 0
    sec_per_step = float(st["sec_per_step"]) if cfg.resume and state_path.is_file() else 0.0
    last_loss = float("nan")
    model.train()
    while elapsed < budget and (total_steps == 0 or step < total_steps):
        # (total_steps == 0 only before the first estimate)
        perm = torch.randperm(len(train), generator=shuffle_gen)
        epoch_t0, epoch_step0 = time.time(), step
        run_loss, run_n = 0.0, 0
        for b in range(steps_per_epoch):
            t0 = time.time()
            idx = perm[b * cfg.batch_size : (b + 1) * cfg.batch_size].tolist()
            xb, yb = zip(*(train[i] for i in idx))
            x, y = augment(torch.stack(xb), torch.stack(yb), cfg, void_id)
            x, y = x.to(device), y.to(device)
            sched_total = total_steps if total_steps else 10**9
            lr = lr_at(step, cfg, sched_total)
            for g in opt.param_groups:
                g["lr"] = lr
            loss = F.cross_entropy(model(x), y, weight=weights, ignore_index=ignore)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            step += 1
            run_loss += loss.item()
            run_n += 1
            last_loss = loss.item()
            timing.append(time.time() - t0)
            if auto_steps and len(timing) == 15 and sec_per_step == 0.0:
                # first estimate of the schedule length from the measured step time (+6% for validation)
                sec_per_step = 1.06 * float(np.median(timing[3:]))
                total_steps = step + int((budget - (time.time() - session_start)) / sec_per_step)
                log(cfg, f"measured {sec_per_step:.3f}s/step -> schedule of {total_steps} steps")
            if step % cfg.log_every == 0:
                log(cfg, f"step {step} epoch {epoch} loss {loss.item():.4f} lr {lr:.2e} elapsed {time.time() - session_start:.0f}s")
            if total_steps and step >= total_steps:
                break
        epoch += 1
        elapsed = time.time() - session_start
        epoch_loss = run_loss / max(run_n, 1)
        final = elapsed >= budget or (total_steps and step >= total_steps)
        if epoch % cfg.eval_every_epochs == 0 or final:
            m = evaluate(model, val, device, num_classes, void_id)
            history.append({"epoch": epoch, "step": step, "train_loss": epoch_loss, "elapsed": elapsed,
                            "miou_void_excluded": m["miou_void_excluded"], "miou_with_void": m["miou_with_void"]})
            log(cfg, f"eval epoch {epoch} step {step} train_loss {epoch_loss:.4f} "
                     f"val mIoU(11, void excl) {m['miou_void_excluded']:.4f} mIoU(12) {m['miou_with_void']:.4f} "
                     f"pix acc {m['pixel_acc_void_excluded']:.4f}")
            if m["miou_void_excluded"] > best:
                best = m["miou_void_excluded"]
                meta = {
                    "dataset": "camvid",
                    "class_names": list(CAMVID_CLASSES),
                    "val_miou_void_excluded": m["miou_void_excluded"],
                    "val_miou_with_void": m["miou_with_void"],
                    "val_pixel_acc_void_excluded": m["pixel_acc_void_excluded"],
                    "val_per_class_iou": m["per_class_iou"],
                    "val_resolution": [cfg.input_height, cfg.input_width],
                    "epoch": epoch,
                    "step": step,
                    "train_loss": epoch_loss,
                    "wall_time_s": round(elapsed, 1),
                    "params": count_parameters(model),
                    "command": command,
                    "train_config": dataclasses.asdict(cfg),
                }
                save_checkpoint(cfg.model_path, CHECKPOINT_KIND, model_cfg, model.state_dict(), meta, half=True)
                (out_dir / "best_metrics.json").write_text(json.dumps(meta | {"confusion": m["confusion"]}, indent=1))
                log(cfg, f"new best {best:.4f} -> {cfg.model_path}")
        if auto_steps and step > epoch_step0:
            measured = (time.time() - epoch_t0) / (step - epoch_step0)
            sec_per_step = measured if sec_per_step == 0.0 else 0.5 * sec_per_step + 0.5 * measured
            remaining = budget - (time.time() - session_start)
            total_steps = max(step + 1, step + int(remaining / sec_per_step)) if remaining > 0 else step
        state = {
            "sec_per_step": sec_per_step,
            "model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "epoch": epoch,
            "elapsed": elapsed, "total_steps": total_steps, "best": best, "history": history,
            "torch_rng": torch.get_rng_state(), "shuffle_rng": shuffle_gen.get_state(),
            "py_rng": random.getstate(), "np_rng": np.random.get_state(), "config": dataclasses.asdict(cfg),
        }
        torch.save(state, state_path.with_suffix(".tmp"))
        state_path.with_suffix(".tmp").replace(state_path)
    log(cfg, f"done: step {step}, epoch {epoch}, elapsed {elapsed:.0f}s, last loss {last_loss:.4f}, best val mIoU(11) {best:.4f}")
    return {"step": step, "epoch": epoch, "best": best, "history": history}


if __name__ == "__main__":
    main()
