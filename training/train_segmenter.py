"""Train the CamVid segmenter (shared/semantic/segmenter.py) within a wall-clock budget.

    python -m training.train_segmenter --data-root ../shared/data/camvid --minutes 110

Read top to bottom: config -> class weights -> augmentation -> schedule -> Trainer (model, EMA,
optimiser, resume, steps, validation, export) -> main. models/segmenter-camvid.md has the numbers.

Choices:

* The network (`architecture`, default "fast", the two-branch `FastSegmenterNet`) reads
  `input_height` x `input_width` (default 192x256, the data's resolution); crops are taken from
  the 192x256 source. The older "unet" at 96x128 is still trainable with its flags.
* Loss: cross-entropy with class weights w_c = (median_f / f_c) ** weight_power from the train
  label frequencies of the 11 real classes (0.5: the square root of median-frequency balancing,
  which lifts pole, sign, pedestrian, bicyclist and fence without the over-prediction of full
  balancing). Void gets the small fixed `void_weight` (0 ignores it).
* `iou_loss_weight` adds the Lovasz-softmax loss (Berman et al., 2018), a convex surrogate of
  1 - IoU per class averaged over the classes present in the batch: cross-entropy counts pixels,
  so a two-pixel-wide pole barely moves it, while the IoU surrogate weighs each class alike.
* Augmentation: random scale and crop (a window of 1/s of the frame, s in [scale_min, scale_max];
  s < 1 zooms out and pads the border, whose pixels the loss ignores), horizontal flips (done
  by the dataset), brightness/contrast/saturation/hue jitter, time-of-day colour casts (warm
  dusk, cool overcast, dark night with lifted blacks), Gaussian blur, JPEG artefacts, and a
  down-up resample with mild noise, so the segmenter copes with users' photos and with the soft
  low-resolution images the diffusion model draws.
* AdamW, linear warm-up then cosine decay over a step budget fitted to the wall budget from the
  measured step time (re-estimated after each epoch, kept in the state for resuming).
* An exponential moving average of the weights (`ema_decay`, 0 = off) is what is validated and
  exported: it smooths the noisy epoch-to-epoch val curve of a small data set.
* Validation: mIoU over the 11 real classes with void target pixels ignored (the CamVid
  convention), the selection metric, plus per-class IoU (`shared.semantic.segmenter.score_segmentation`).
* The EMA takes its BatchNorm statistics from the live model, which lag its averaged weights
  while the learning rate is high. `--recalibrate-bn` recomputes them for a finished file's
  weights over the train images (no augmentation, each also mirrored) and writes
  <out_dir>/bn-recalibrated.pt with the val scores before and after.
* Resumable: <out_dir>/state.pt (model, EMA, optimiser, step, epoch, RNG states, elapsed time) is
  written after every epoch and on SIGTERM; rerunning the same command continues from it.
  `--init-from` warm-starts a new run from a shipped file (same network configuration).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
import shlex
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shared.semantic.checkpoints import load_checkpoint, save_checkpoint
from shared.semantic.data import CAMVID_CLASSES, CAMVID_INFO, camvid
from shared.semantic.device import select_device
from shared.semantic.segmenter import (
    CHECKPOINT_KIND,
    Segmenter,
    SegmentationScores,
    SegmenterConfig,
    build_net,
    count_parameters,
    score_segmentation,
)
from training.config_cli import config_parser
from training.run_state import save_atomically

SOURCE_SIZE = (192, 256)  # training crops are cut from the data at this resolution


@dataclass
class TrainConfig:
    data_root: str = "../shared/data/camvid"
    out_dir: str = "runs/segmenter"
    model_path: str = "models/segmenter-camvid.pt"
    init_from: str = ""  # a shipped segmenter to warm-start from when out_dir has no state
    device: str = "auto"
    threads: int = 1
    seed: int = 0
    # model
    architecture: str = "fast"
    base_channels: int = 32
    input_height: int = 192
    input_width: int = 256
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
    ema_decay: float = 0.0  # 0: validate and export the raw weights
    # loss
    void_weight: float = 0.1  # 0 -> void ignored
    weight_power: float = 0.5  # 1 = median-frequency balancing, 0.5 = its square root, 0 = unweighted
    iou_loss_weight: float = 0.0  # weight of the Lovasz-softmax term added to cross-entropy (0 = off)
    # augmentation
    scale_min: float = 1.0  # crop window = frame / s, s drawn in [scale_min, scale_max] (1 = whole frame)
    scale_max: float = 1.75
    scale_prob: float = 0.8
    jitter_prob: float = 0.8
    hue_max: float = 0.0  # largest hue rotation, in turns
    daylight_prob: float = 0.0  # a time-of-day colour cast (dusk, overcast, night)
    blur_prob: float = 0.0  # Gaussian blur, sigma in [0.3, 1.5] pixels
    jpeg_prob: float = 0.0  # a JPEG round trip at quality 15..75
    downup_prob: float = 0.35
    noise_prob: float = 0.2
    # bookkeeping
    eval_every_epochs: int = 1
    log_every: int = 10
    resume: bool = True
    eval_only: bool = False  # score the file at model_path on val (several input resolutions) and exit
    recalibrate_bn: bool = False  # recompute the BatchNorm statistics of the file at model_path (see below) and exit


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    parser = config_parser(TrainConfig, __doc__)
    cfg = TrainConfig(**vars(parser.parse_args(argv)))
    if not 0 < cfg.scale_min <= cfg.scale_max:
        parser.error(f"--scale-min must be positive and at most --scale-max, not {cfg.scale_min} / {cfg.scale_max}")
    return cfg


# ----------------------------------------------------------------------------- loss and data


def class_weights(freq: np.ndarray, void_id: int, void_weight: float, power: float) -> torch.Tensor:
    """w_c = (median_f / f_c) ** power over the real classes; void gets `void_weight`."""
    real = [c for c in range(len(freq)) if c != void_id]
    f = np.maximum(freq[real], 1e-6)
    w = np.ones(len(freq))
    w[real] = (np.median(f) / f) ** power
    w[void_id] = void_weight
    return torch.tensor(w, dtype=torch.float32)


def lovasz_softmax(logits: torch.Tensor, labels: torch.Tensor, ignore: list[int]) -> torch.Tensor:
    """Lovasz-softmax loss over the batch's pixels, averaged over the classes present.

    For each class the pixels' errors |[y = c] - p_c| are sorted in decreasing order and weighted
    by the increments of the Jaccard loss along that order (the Lovasz extension), which makes the
    sum a tight convex surrogate of 1 - IoU_c. Pixels whose label is in `ignore` do not count,
    and neither do the ignored classes themselves.
    """
    probs = logits.softmax(dim=1).permute(0, 2, 3, 1).reshape(-1, logits.shape[1])
    flat = labels.reshape(-1)
    keep = torch.ones_like(flat, dtype=torch.bool)
    for value in ignore:
        keep &= flat != value
    probs, flat = probs[keep], flat[keep]
    losses = []
    for c in range(probs.shape[1]):
        if c in ignore:
            continue
        fg = (flat == c).float()
        if fg.sum() == 0:
            continue
        errors = (fg - probs[:, c]).abs()
        errors_sorted, order = errors.sort(descending=True)
        fg_sorted = fg[order]
        total = fg_sorted.sum()
        intersection = total - fg_sorted.cumsum(0)
        union = total + (1.0 - fg_sorted).cumsum(0)
        jaccard = 1.0 - intersection / union
        jaccard = torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])
        losses.append(torch.dot(errors_sorted, jaccard))
    return torch.stack(losses).mean() if losses else logits.sum() * 0.0


def scale_crop(image: torch.Tensor, labels: torch.Tensor, out_hw: tuple[int, int], scale: float,
               pad_label: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut a random window of 1/scale of the frame and resize it to `out_hw`.

    (1, 3, H, W) image and (1, 1, H, W) float labels. With scale < 1 the window is larger than the
    frame: the image is padded with mid-grey and the labels with `pad_label` (ignored by the loss).
    """
    H, W = image.shape[-2:]
    ch, cw = max(1, round(H / scale)), max(1, round(W / scale))
    top = int(torch.randint(min(0, H - ch), max(0, H - ch) + 1, ()))
    left = int(torch.randint(min(0, W - cw), max(0, W - cw) + 1, ()))
    pad = (max(0, -left), max(0, left + cw - W), max(0, -top), max(0, top + ch - H))
    if any(pad):
        image = F.pad(image, pad, value=0.0)
        labels = F.pad(labels, pad, value=float(pad_label))
        top, left = top + pad[2], left + pad[0]
    image = image[..., top : top + ch, left : left + cw]
    labels = labels[..., top : top + ch, left : left + cw]
    shrink = ch >= out_hw[0]
    image = F.interpolate(image, size=out_hw, mode="bilinear", align_corners=False, antialias=shrink)
    return image, F.interpolate(labels, size=out_hw, mode="nearest")


def colour_jitter(image: torch.Tensor, hue_max: float) -> torch.Tensor:
    """Random brightness, contrast, saturation and (when hue_max > 0) a hue rotation of a [-1, 1] image."""
    u = (image + 1) / 2
    u = u * (0.75 + 0.5 * torch.rand(()))
    mean = u.mean()
    u = (u - mean) * (0.75 + 0.5 * torch.rand(())) + mean
    gray = u.mean(1, keepdim=True)
    u = (u - gray) * (0.6 + 0.8 * torch.rand(())) + gray
    if hue_max > 0:  # rotate RGB about the grey axis (1, 1, 1): greys stay, hues turn
        angle = (2 * float(torch.rand(())) - 1) * hue_max * 2 * math.pi
        c, s = math.cos(angle), math.sin(angle)
        k = 1.0 / 3.0
        sq = math.sqrt(k)
        rot = torch.tensor([
            [c + (1 - c) * k, k * (1 - c) - sq * s, k * (1 - c) + sq * s],
            [k * (1 - c) + sq * s, c + k * (1 - c), k * (1 - c) - sq * s],
            [k * (1 - c) - sq * s, k * (1 - c) + sq * s, c + k * (1 - c)],
        ])  # fmt: skip
        u = torch.einsum("ij,bjhw->bihw", rot, u)
    return u.clamp(0, 1) * 2 - 1


def daylight_shift(image: torch.Tensor) -> torch.Tensor:
    """A time-of-day colour cast of a [-1, 1] image: warm dusk light, cool overcast light, or a
    dark blue night with lifted blacks (per-channel gains, a gamma, an offset)."""
    u = (image + 1) / 2
    kind = int(torch.randint(0, 3, ()))
    r = float(torch.rand(()))
    if kind == 0:  # dusk: warm, a little darker
        gain, gamma, lift = torch.tensor([1.0 + 0.15 * r, 0.95, 0.8 - 0.15 * r]), 1.0 + 0.3 * r, 0.0
    elif kind == 1:  # overcast / shade: cool, flat
        gain, gamma, lift = torch.tensor([0.9 - 0.1 * r, 0.97, 1.05 + 0.1 * r]), 0.85 + 0.15 * r, 0.05 * r
    else:  # night: dark, blue, blacks lifted by sensor noise and street lights
        gain, gamma, lift = torch.tensor([0.7, 0.75, 0.9]) * (0.7 + 0.3 * r), 1.2 + 0.3 * r, 0.03
    u = u.clamp(0, 1) ** gamma * gain.view(1, 3, 1, 1) + lift
    return u.clamp(0, 1) * 2 - 1


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of a (1, 3, H, W) image, reflect-padded."""
    radius = max(1, math.ceil(2.5 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=image.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).to(image.device)
    x = F.pad(image, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)


def jpeg_round_trip(image: torch.Tensor, quality: int) -> torch.Tensor:
    """Encode a (1, 3, H, W) [-1, 1] image as JPEG at `quality` and decode it: blocking and ringing."""
    rgb = ((image[0].permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().byte().cpu().numpy()
    ok, buf = cv2.imencode(".jpg", rgb[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        return image
    out = cv2.imdecode(buf, cv2.IMREAD_COLOR)[:, :, ::-1]
    return torch.from_numpy(np.ascontiguousarray(out)).permute(2, 0, 1)[None].to(image).div(127.5).sub(1.0)


def augment(images: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig, pad_label: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, H0, W0) [-1, 1] source batch (already flipped by the dataset) -> augmented batch at
    the input size; labels (B, h, w) int64. All randomness comes from torch's global RNG."""
    out_hw = (cfg.input_height, cfg.input_width)
    xs, ys = [], []
    for i in range(images.shape[0]):
        scale = 1.0
        if torch.rand(()) < cfg.scale_prob:
            scale = cfg.scale_min + float(torch.rand(())) * (cfg.scale_max - cfg.scale_min)
        x, y = scale_crop(images[i : i + 1], labels[i : i + 1, None].float(), out_hw, scale, pad_label)
        if torch.rand(()) < cfg.jitter_prob:
            x = colour_jitter(x, cfg.hue_max)
        if torch.rand(()) < cfg.daylight_prob:
            x = daylight_shift(x)
        if torch.rand(()) < cfg.blur_prob:
            x = gaussian_blur(x, 0.3 + 1.2 * float(torch.rand(())))
        if torch.rand(()) < cfg.downup_prob:  # the low-resolution look of generated images
            f = 2 if torch.rand(()) < 0.75 else 4
            small = F.interpolate(x, size=(out_hw[0] // f, out_hw[1] // f), mode="bilinear", antialias=True, align_corners=False)
            x = F.interpolate(small, size=out_hw, mode="bilinear", align_corners=False)
        if torch.rand(()) < cfg.noise_prob:
            x = (x + torch.randn_like(x) * 0.06 * torch.rand(())).clamp(-1, 1)
        if torch.rand(()) < cfg.jpeg_prob:
            x = jpeg_round_trip(x, int(torch.randint(15, 76, ())))
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)[:, 0].long()


def lr_at(step: int, cfg: TrainConfig, total: int) -> float:
    """Linear warm-up over `warmup_steps`, then cosine decay to `min_lr_ratio` at step `total`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def net_predictor(net: nn.Module, device: torch.device):
    """(B, 3, H, W) -> (B, H, W) labels through `net` at its input size, as `Segmenter.segment_batch` does."""
    size = (net.config.input_height, net.config.input_width)

    @torch.no_grad()
    def predict(images: torch.Tensor) -> torch.Tensor:
        x = images.to(device)
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        pred = net(x).argmax(1)
        if tuple(pred.shape[-2:]) != tuple(images.shape[-2:]):
            pred = F.interpolate(pred[:, None].float(), size=images.shape[-2:], mode="nearest")[:, 0].long()
        return pred

    return predict


def evaluate_shipped(cfg: TrainConfig) -> dict:
    """Val scores of the fp16 file at `model_path`, loaded through `Segmenter` as the services do:
    at the model input size, at the 192x256 label resolution (predict at the input size, nearest
    upsample), on inputs degraded by a 48x64 down-up resample (a stand-in for soft generated
    images), and as label maps at the sender's map sizes: the 192x256 photo segmented, its label
    map shrunk (nearest) to 96x128 and 48x64 and scored against the labels at that size."""
    seg = Segmenter.from_checkpoint(cfg.model_path, cfg.device)
    size = (seg.config.input_height, seg.config.input_width)

    def degraded(images: torch.Tensor) -> torch.Tensor:
        small = F.interpolate(images, size=(48, 64), mode="bilinear", antialias=True, align_corners=False)
        return seg.segment_batch(F.interpolate(small, size=images.shape[-2:], mode="bilinear", align_corners=False))

    results = {}
    for name, res, predict in (("input_size", size, seg.segment_batch),
                               ("full_192x256", SOURCE_SIZE, seg.segment_batch),
                               ("downup_48x64", size, degraded)):
        val = camvid(cfg.data_root, "val", res)
        results[name] = score_segmentation(predict, val, CAMVID_CLASSES, CAMVID_INFO.ignore_index).as_dict()
    photos = camvid(cfg.data_root, "val", SOURCE_SIZE)
    for map_size in ((96, 128), (48, 64)):
        maps = camvid(cfg.data_root, "val", map_size)
        pairs = [(photos[i][0], maps[i][1]) for i in range(len(maps))]

        def shrunk(images: torch.Tensor, map_size: tuple[int, int] = map_size) -> torch.Tensor:
            labels = seg.segment_batch(images)[:, None].float()
            return F.interpolate(labels, size=map_size, mode="nearest")[:, 0].long()

        name = f"map_{map_size[0]}x{map_size[1]}"
        results[name] = score_segmentation(shrunk, pairs, CAMVID_CLASSES, CAMVID_INFO.ignore_index).as_dict()
    print(json.dumps(results, indent=1))
    return results


@torch.no_grad()
def recalibrate_batchnorm(net: nn.Module, batches) -> None:
    """Replace every BatchNorm's running mean and variance by their averages over `batches`
    ((B, 3, H, W) tensors), the rest of the network in eval mode."""
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    momenta = [m.momentum for m in norms]
    net.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over all batches
        m.train()
    for x in batches:
        net(x)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    net.eval()


def recalibrate_shipped(cfg: TrainConfig) -> dict:
    """`recalibrate_batchnorm` for the file at `model_path` over the train images at its input size
    (and their mirror images); writes <out_dir>/bn-recalibrated.pt and returns the val mIoU before and after."""
    seg = Segmenter.from_checkpoint(cfg.model_path, cfg.device)
    size = (seg.config.input_height, seg.config.input_width)
    train = camvid(cfg.data_root, "train", size)
    val = camvid(cfg.data_root, "val", size)

    def batches():
        for start in range(0, len(train), cfg.batch_size):
            x = torch.stack([train[i][0] for i in range(start, min(start + cfg.batch_size, len(train)))]).to(seg.device)
            yield x
            yield x.flip(-1)

    before = score_segmentation(seg.segment_batch, val, CAMVID_CLASSES, CAMVID_INFO.ignore_index)
    recalibrate_batchnorm(seg.net, batches())
    after = score_segmentation(seg.segment_batch, val, CAMVID_CLASSES, CAMVID_INFO.ignore_index)
    meta = seg.meta | {
        "bn_recalibrated": True, "val_miou_before_bn_recalibration": before.miou_void_excluded,
        "val_miou_void_excluded": after.miou_void_excluded, "val_miou_with_void": after.miou_with_void,
        "val_pixel_acc_void_excluded": after.pixel_acc_void_excluded, "val_per_class_iou": list(after.per_class_iou.values()),
    }
    out = Path(cfg.out_dir) / "bn-recalibrated.pt"
    save_checkpoint(out, CHECKPOINT_KIND, seg.config, seg.net.state_dict(), meta, half=True)
    result = {"before": before.as_dict(), "after": after.as_dict(), "path": str(out)}
    print(json.dumps(result, indent=1))
    return result


# ----------------------------------------------------------------------------- training


class Trainer:
    def __init__(self, cfg: TrainConfig, command: str) -> None:
        self.cfg = cfg
        self.command = command
        self.out_dir = Path(cfg.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.state_path = self.out_dir / "state.pt"
        self.device = select_device(cfg.device)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.void_id = CAMVID_INFO.ignore_index
        self.train_set = camvid(cfg.data_root, "train", SOURCE_SIZE, flip=True)
        self.val_set = camvid(cfg.data_root, "val", (cfg.input_height, cfg.input_width))
        self.freq = self.train_set.class_frequencies()
        self.weights = class_weights(self.freq, self.void_id, cfg.void_weight, cfg.weight_power).to(self.device)
        self.ignore = self.void_id if cfg.void_weight == 0 else -100  # also the label of padded borders
        self.model_cfg = SegmenterConfig(
            num_classes=CAMVID_INFO.num_classes, base_channels=cfg.base_channels, architecture=cfg.architecture,
            input_height=cfg.input_height,
            input_width=cfg.input_width, dropout=cfg.dropout, ignore_index=self.void_id,
        )
        self.model = build_net(self.model_cfg).to(self.device)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False) if cfg.ema_decay > 0 else None
        decay = [p for p in self.model.parameters() if p.ndim > 1]
        no_decay = [p for p in self.model.parameters() if p.ndim <= 1]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
        )
        self.shuffle_gen = torch.Generator().manual_seed(cfg.seed)
        self.step, self.epoch, self.elapsed, self.best = 0, 0, 0.0, -1.0
        self.total_steps, self.sec_per_step = cfg.max_steps, 0.0
        self.history: list[dict] = []

    @property
    def eval_net(self) -> nn.Module:
        return self.ema if self.ema is not None else self.model

    # --- state -----------------------------------------------------------------------------------
    def save_state(self) -> None:
        state = {
            "model": self.model.state_dict(), "ema": None if self.ema is None else self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(), "step": self.step, "epoch": self.epoch, "elapsed": self.elapsed,
            "total_steps": self.total_steps, "sec_per_step": self.sec_per_step, "best": self.best,
            "history": self.history, "config": dataclasses.asdict(self.cfg),
            "torch_rng": torch.get_rng_state(), "shuffle_rng": self.shuffle_gen.get_state(),
            "py_rng": random.getstate(), "np_rng": np.random.get_state(),
        }
        save_atomically(state, self.state_path)

    def warm_start(self, path: Path) -> None:
        """Start from a shipped segmenter's weights (no optimiser state ships).

        The layers must match; the input size and dropout may differ, since a convolutional
        network trained at one size is the natural start for fine-tuning at another.
        """
        payload = load_checkpoint(path, CHECKPOINT_KIND)
        shipped = SegmenterConfig(**payload["config"])
        comparable = dataclasses.replace(shipped, dropout=self.model_cfg.dropout,
                                         input_height=self.model_cfg.input_height,
                                         input_width=self.model_cfg.input_width)
        if comparable != self.model_cfg:
            raise ValueError(f"{path} was trained with another network configuration: {shipped}")
        self.model.load_state_dict(payload["state_dict"])
        if self.ema is not None:
            self.ema.load_state_dict(payload["state_dict"])
        self.log(f"warm start from {path} (its val mIoU {payload['meta'].get('val_miou_void_excluded')})")

    def load_state(self) -> bool:
        if not (self.cfg.resume and self.state_path.is_file()):
            if self.cfg.init_from:
                self.warm_start(Path(self.cfg.init_from))
            return False
        st = torch.load(self.state_path, map_location="cpu", weights_only=False)
        self.model.load_state_dict(st["model"])
        if self.ema is not None:
            self.ema.load_state_dict(st["ema"] if st.get("ema") is not None else st["model"])
        self.optimizer.load_state_dict(st["optimizer"])
        self.step, self.epoch, self.elapsed, self.best = st["step"], st["epoch"], st["elapsed"], st["best"]
        self.total_steps, self.sec_per_step, self.history = st["total_steps"], st["sec_per_step"], st["history"]
        if self.cfg.max_steps:
            self.total_steps = self.cfg.max_steps  # an explicit step budget may be raised to continue a run
        torch.set_rng_state(st["torch_rng"])
        self.shuffle_gen.set_state(st["shuffle_rng"])
        random.setstate(st["py_rng"])
        np.random.set_state(st["np_rng"])
        return True

    def export(self, scores: SegmentationScores, train_loss: float) -> None:
        meta = {
            "dataset": "camvid",
            "class_names": list(CAMVID_CLASSES),
            "val_miou_void_excluded": scores.miou_void_excluded,
            "val_miou_with_void": scores.miou_with_void,
            "val_pixel_acc_void_excluded": scores.pixel_acc_void_excluded,
            "val_per_class_iou": list(scores.per_class_iou.values()),
            "val_resolution": [self.cfg.input_height, self.cfg.input_width],
            "epoch": self.epoch, "step": self.step, "train_loss": train_loss, "wall_time_s": round(self.elapsed, 1),
            "params": count_parameters(self.model), "command": self.command,
            "init_from": self.cfg.init_from, "train_config": dataclasses.asdict(self.cfg),
        }
        save_checkpoint(self.cfg.model_path, CHECKPOINT_KIND, self.model_cfg, self.eval_net.state_dict(), meta, half=True)
        (self.out_dir / "best_metrics.json").write_text(json.dumps(meta | {"confusion": scores.confusion.tolist()}, indent=1))

    # --- steps -----------------------------------------------------------------------------------
    def train_step(self, idx: list[int]) -> float:
        images, labels = zip(*(self.train_set[i] for i in idx))
        x, y = augment(torch.stack(images), torch.stack(labels), self.cfg, self.ignore)
        x, y = x.to(self.device), y.to(self.device)
        lr = lr_at(self.step, self.cfg, self.total_steps if self.total_steps else 10**9)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        logits = self.model(x)
        loss = F.cross_entropy(logits, y, weight=self.weights, ignore_index=self.ignore)
        if self.cfg.iou_loss_weight > 0:
            loss = loss + self.cfg.iou_loss_weight * lovasz_softmax(logits, y, [self.void_id, -100])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.update_ema()
        self.step += 1
        return float(loss.detach())

    @torch.no_grad()
    def update_ema(self) -> None:
        if self.ema is None:
            return
        decay = min(self.cfg.ema_decay, (1 + self.step) / (10 + self.step))
        for e, p in zip(self.ema.parameters(), self.model.parameters()):
            e.lerp_(p, 1 - decay)
        for e, b in zip(self.ema.buffers(), self.model.buffers()):
            e.copy_(b)  # BatchNorm statistics follow the live model

    def validate(self) -> SegmentationScores:
        net = self.eval_net
        was_training = net.training
        net.eval()
        scores = score_segmentation(net_predictor(net, self.device), self.val_set, CAMVID_CLASSES, self.void_id)
        net.train(was_training)
        return scores

    def update_schedule(self, budget: float, seconds_per_step: float) -> None:
        """Fit the cosine's length to the wall budget left, so it ends when the budget does even on
        a shared machine whose speed changes (`max_steps` 0 only)."""
        if self.cfg.max_steps:
            return
        self.sec_per_step = seconds_per_step if self.sec_per_step == 0.0 else 0.5 * (self.sec_per_step + seconds_per_step)
        remaining = budget - self.elapsed
        self.total_steps = max(self.step + 1, self.step + int(remaining / self.sec_per_step)) if remaining > 0 else self.step

    def log(self, msg: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        print(line, flush=True)
        with open(self.out_dir / "log.txt", "a") as f:
            f.write(line + "\n")

    def run_epoch(self, budget: float, session_start: float, stop: dict[str, bool]) -> float:
        """One pass over the train set (or until the step budget / a signal); the mean loss."""
        cfg = self.cfg
        perm = torch.randperm(len(self.train_set), generator=self.shuffle_gen)
        t0, step0, losses = time.time(), self.step, []
        for b in range(len(self.train_set) // cfg.batch_size):
            losses.append(self.train_step(perm[b * cfg.batch_size : (b + 1) * cfg.batch_size].tolist()))
            if self.total_steps == 0 and len(losses) == min(15, len(self.train_set) // cfg.batch_size):
                # first estimate of the schedule from the measured step time (+6% for validation)
                self.elapsed = time.time() - session_start
                self.update_schedule(budget, 1.06 * (time.time() - t0) / len(losses))
                self.log(f"measured {self.sec_per_step:.3f}s/step -> schedule of {self.total_steps} steps")
            if self.step % cfg.log_every == 0:
                self.log(f"step {self.step} epoch {self.epoch} loss {losses[-1]:.4f} "
                         f"lr {self.optimizer.param_groups[0]['lr']:.2e} elapsed {time.time() - session_start:.0f}s")
            if (self.total_steps and self.step >= self.total_steps) or stop["now"]:
                break
        self.epoch += 1
        self.elapsed = time.time() - session_start
        if self.step > step0:
            self.update_schedule(budget, (time.time() - t0) / (self.step - step0))
        return float(np.mean(losses)) if losses else float("nan")

    def run(self) -> dict:
        cfg = self.cfg
        if self.load_state():
            self.log(f"resumed from {self.state_path}: step {self.step}, epoch {self.epoch}, "
                     f"elapsed {self.elapsed:.0f}s, best {self.best:.4f}")
        else:
            self.log(f"config {json.dumps(dataclasses.asdict(cfg))}")
            self.log(f"model {count_parameters(self.model):,} params, train {len(self.train_set)} / "
                     f"val {len(self.val_set)}, device {self.device}")
            self.log("class freq " + " ".join(f"{n}={f:.4f}" for n, f in zip(CAMVID_CLASSES, self.freq)))
            self.log("class weights " + " ".join(f"{n}={w:.3f}" for n, w in zip(CAMVID_CLASSES, self.weights.tolist())))
        stop = {"now": False}
        signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
        budget = cfg.minutes * 60.0
        session_start = time.time() - self.elapsed
        self.model.train()
        while self.elapsed < budget and (self.total_steps == 0 or self.step < self.total_steps) and not stop["now"]:
            train_loss = self.run_epoch(budget, session_start, stop)
            final = self.elapsed >= budget or (self.total_steps and self.step >= self.total_steps) or stop["now"]
            if self.epoch % cfg.eval_every_epochs == 0 or final:
                scores = self.validate()
                self.history.append({"epoch": self.epoch, "step": self.step, "train_loss": train_loss,
                                     "elapsed": self.elapsed, "miou_void_excluded": scores.miou_void_excluded,
                                     "miou_with_void": scores.miou_with_void})
                self.log(f"eval epoch {self.epoch} step {self.step} train_loss {train_loss:.4f} "
                         f"val mIoU(11, void excl) {scores.miou_void_excluded:.4f} mIoU(12) {scores.miou_with_void:.4f} "
                         f"pix acc {scores.pixel_acc_void_excluded:.4f}")
                if scores.miou_void_excluded > self.best:
                    self.best = scores.miou_void_excluded
                    self.export(scores, train_loss)
                    self.log(f"new best {self.best:.4f} -> {cfg.model_path}; per class "
                             + " ".join(f"{n}={v}" for n, v in scores.per_class_iou.items()))
            self.save_state()
        self.log(f"done: step {self.step}, epoch {self.epoch}, elapsed {self.elapsed:.0f}s, best val mIoU(11) {self.best:.4f}"
                 + (" (stopped by signal)" if stop["now"] else ""))
        return {"step": self.step, "epoch": self.epoch, "best": self.best, "history": self.history}


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(argv)
    torch.set_num_threads(cfg.threads)
    if cfg.eval_only:
        return evaluate_shipped(cfg)
    if cfg.recalibrate_bn:
        return recalibrate_shipped(cfg)
    args = sys.argv[1:] if argv is None else argv
    command = "python -m training.train_segmenter " + " ".join(shlex.quote(a) for a in args)
    return Trainer(cfg, command).run()


if __name__ == "__main__":
    main()
