"""Compact CNN semantic segmenters and the segmentation metrics.

`SegmenterConfig.architecture` picks the network (`build_net`):

"unet" (the default, and what older checkpoints without the field hold), `SegmenterNet`: a small
encoder-decoder (about 1.3 M parameters at `base_channels=32`) that runs at 96x128 by default:

* a full-resolution stem (C/2 channels), then three stride-2 stages at 1/2 (C), 1/4 (2C) and
  1/8 (4C) resolution built from residual 3x3 blocks; the 1/8 stage uses dilations 1, 2, 4 for a
  wide receptive field without further downsampling;
* a light pyramid pooling module (global, 2x2 and 4x4 average pools) for scene context;
* a U-Net-style decoder that upsamples back to full resolution, fusing the skip features of
  every stage, and a 1x1 classifier giving logits (B, K, H, W).

"fast", `FastSegmenterNet`: a two-branch network for 192x256 in the spirit of Fast-SCNN and
BiSeNet, which spends its compute where the feature maps are small:

* a learning-to-downsample stem: a 3x3 stride-2 conv (1/2, C), then depthwise-separable stride-2
  convs to 1/4 (3C/2) and 1/8 (2C);
* a context branch: inverted-residual bottlenecks (expansion 6) at 1/16 (2C), 1/32 (3C) and 1/32
  (4C), then the pyramid pooling module `ppm` (1, 2, 4 bins);
* a fusion at 1/8 of the upsampled context with the 1/8 detail features, and a decoder that adds
  the 1/4 and 1/2 stem features back (depthwise-separable convs), so poles and signs a few pixels
  wide keep their edges; the logits at 1/2 are upsampled bilinearly to the input size.

Both networks are fully convolutional, so they accept any input size; `Segmenter` (the inference
wrapper used by the sender service and the evaluation) always resizes inputs to the configured
input size, predicts there and resizes the label map back (nearest neighbour).

Metrics: `confusion_matrix` (rows = target, columns = prediction), `miou`, `per_class_iou`,
`pixel_accuracy`, and `score_segmentation` / `SegmentationScores`, the val report (mIoU with and
without void, per-class IoU) that training and the evaluation both print.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shared.semantic.checkpoints import load_checkpoint, save_checkpoint
from shared.semantic.device import select_device

CHECKPOINT_KIND = "segmenter"
ARCHITECTURES = ("unet", "fast")


@dataclass(frozen=True)
class SegmenterConfig:
    num_classes: int = 12
    base_channels: int = 32
    architecture: str = "unet"  # "unet" (SegmenterNet) or "fast" (FastSegmenterNet)
    input_height: int = 96
    input_width: int = 128
    dropout: float = 0.1
    ignore_index: int | None = 11  # the dataset's void/unlabelled id (metadata for evaluation)

    def __post_init__(self) -> None:
        if self.num_classes < 2 or self.num_classes > 256:
            raise ValueError(f"num_classes must be in 2..256, not {self.num_classes}")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, not {self.architecture!r}")
        if self.base_channels < 4 or self.base_channels % 2:
            raise ValueError(f"base_channels must be an even number >= 4, not {self.base_channels}")
        if self.input_height < 8 or self.input_width < 8:
            raise ValueError(f"input size must be at least 8x8, not {self.input_height}x{self.input_width}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), not {self.dropout}")


def _cbr(cin: int, cout: int, k: int = 3, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    pad = dilation * (k - 1) // 2
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride=stride, padding=pad, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class ResBlock(nn.Module):
    def __init__(self, ch: int, dilation: int = 1) -> None:
        super().__init__()
        self.conv1 = _cbr(ch, ch, dilation=dilation)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.bn2(self.conv2(self.conv1(x))))


class PyramidPool(nn.Module):
    """Average-pool to 1x1, 2x2 and 4x4 grids, project, upsample and fuse with the input."""

    def __init__(self, cin: int, branch: int, cout: int, bins: Sequence[int] = (1, 2, 4)) -> None:
        super().__init__()
        self.bins = tuple(bins)
        self.branches = nn.ModuleList(_cbr(cin, branch, k=1) for _ in self.bins)
        self.fuse = _cbr(cin + branch * len(self.bins), cout, k=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        feats = [x]
        for b, branch in zip(self.bins, self.branches):
            y = branch(F.adaptive_avg_pool2d(x, b))
            feats.append(F.interpolate(y, size=size, mode="bilinear", align_corners=False))
        return self.fuse(torch.cat(feats, dim=1))


def _up(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


class SegmenterNet(nn.Module):
    """Encoder-decoder CNN: (B, 3, H, W) in [-1, 1] -> logits (B, K, H, W)."""

    def __init__(self, config: SegmenterConfig = SegmenterConfig()) -> None:
        super().__init__()
        self.config = config
        c = config.base_channels
        h = c // 2
        self.stem = _cbr(3, h)  # 1/1
        self.enc1 = nn.Sequential(_cbr(h, c, stride=2), ResBlock(c))  # 1/2
        self.enc2 = nn.Sequential(_cbr(c, 2 * c, stride=2), ResBlock(2 * c), ResBlock(2 * c))  # 1/4
        self.enc3 = nn.Sequential(  # 1/8, dilated context
            _cbr(2 * c, 4 * c, stride=2), ResBlock(4 * c, 1), ResBlock(4 * c, 2), ResBlock(4 * c, 4)
        )
        self.ppm = PyramidPool(4 * c, c, 2 * c)
        self.dec2 = _cbr(4 * c, 2 * c)  # up(ppm) + enc2
        self.dec1 = _cbr(3 * c, c)  # up(dec2) + enc1
        self.dec0 = _cbr(c + h, h)  # up(dec1) + stem
        self.drop = nn.Dropout2d(config.dropout)
        self.head = nn.Conv2d(h, config.num_classes, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for block in self.modules():  # start residual branches near identity
            if isinstance(block, ResBlock):
                nn.init.zeros_(block.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s0 = self.stem(x)
        s1 = self.enc1(s0)
        s2 = self.enc2(s1)
        s3 = self.ppm(self.enc3(s2))
        d2 = self.dec2(torch.cat([_up(s3, s2), s2], dim=1))
        d1 = self.dec1(torch.cat([_up(d2, s1), s1], dim=1))
        d0 = self.dec0(torch.cat([_up(d1, s0), s0], dim=1))
        return self.head(self.drop(d0))


def _dsconv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    """Depthwise 3x3 (+BN, ReLU) then pointwise 1x1 (+BN, ReLU): a 3x3 conv's reach at a ninth of its cost."""
    return nn.Sequential(
        nn.Conv2d(cin, cin, 3, stride=stride, padding=1, groups=cin, bias=False),
        nn.BatchNorm2d(cin),
        nn.ReLU(inplace=True),
        _cbr(cin, cout, k=1),
    )


class InvertedResidual(nn.Module):
    """MobileNetV2 bottleneck: 1x1 expand, depthwise 3x3 (stride 1 or 2), linear 1x1 project;
    a residual connection when the shape is kept."""

    def __init__(self, cin: int, cout: int, stride: int = 1, expand: int = 6) -> None:
        super().__init__()
        hidden = cin * expand
        self.residual = stride == 1 and cin == cout
        self.block = nn.Sequential(
            _cbr(cin, hidden, k=1),
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.residual else y


def _bottlenecks(cin: int, cout: int, n: int, stride: int) -> nn.Sequential:
    return nn.Sequential(*(InvertedResidual(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(n)))


class FastSegmenterNet(nn.Module):
    """Two-branch CNN for 192x256 (see the module docstring): (B, 3, H, W) in [-1, 1] -> logits (B, K, H, W)."""

    def __init__(self, config: SegmenterConfig) -> None:
        super().__init__()
        self.config = config
        c = config.base_channels
        c2, c4, c8 = c, 3 * c // 2, 2 * c
        self.down2 = _cbr(3, c2, stride=2)  # 1/2
        self.down4 = _dsconv(c2, c4, stride=2)  # 1/4
        self.down8 = _dsconv(c4, c8, stride=2)  # 1/8: the detail branch
        self.context = nn.Sequential(  # 1/16 -> 1/32
            _bottlenecks(c8, 2 * c, 3, 2), _bottlenecks(2 * c, 3 * c, 3, 2), _bottlenecks(3 * c, 4 * c, 3, 1)
        )
        self.ppm = PyramidPool(4 * c, c, 4 * c)
        self.context_up = nn.Sequential(  # the upsampled context, refined by a depthwise conv
            nn.Conv2d(4 * c, 4 * c, 3, padding=1, groups=4 * c, bias=False), nn.BatchNorm2d(4 * c),
            nn.ReLU(inplace=True), nn.Conv2d(4 * c, 4 * c, 1, bias=False), nn.BatchNorm2d(4 * c),
        )
        self.detail8 = nn.Sequential(nn.Conv2d(c8, 4 * c, 1, bias=False), nn.BatchNorm2d(4 * c))
        self.fuse4 = _dsconv(4 * c + c4, 2 * c)  # up(fused 1/8) + 1/4 stem
        self.fuse2 = _dsconv(2 * c + c2, c)  # up(1/4) + 1/2 stem
        self.drop = nn.Dropout2d(config.dropout)
        self.head = nn.Conv2d(c, config.num_classes, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for block in self.modules():  # start residual branches near identity
            if isinstance(block, InvertedResidual) and block.residual:
                nn.init.zeros_(block.block[-1].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s2 = self.down2(x)
        s4 = self.down4(s2)
        s8 = self.down8(s4)
        ctx = self.ppm(self.context(s8))
        f8 = F.relu(self.detail8(s8) + self.context_up(_up(ctx, s8)))
        f4 = self.fuse4(torch.cat([_up(f8, s4), s4], dim=1))
        f2 = self.fuse2(torch.cat([_up(f4, s2), s2], dim=1))
        return _up(self.head(self.drop(f2)), x)


def build_net(config: SegmenterConfig = SegmenterConfig()) -> nn.Module:
    """The network `config.architecture` names."""
    return FastSegmenterNet(config) if config.architecture == "fast" else SegmenterNet(config)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _config_from_dict(d: dict[str, Any]) -> SegmenterConfig:
    names = {f.name for f in dataclasses.fields(SegmenterConfig)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"segmenter checkpoint has unknown config fields {sorted(unknown)}")
    return SegmenterConfig(**d)


class Segmenter:
    """Inference wrapper around a segmenter network (eval mode, float32, no gradients).

    The network runs in channels-last memory format: its convolutions are faster that way on CPU
    (docs/benchmarks-segmenter.md), and the class axis of its logits is then the innermost one,
    so the per-pixel argmax reads contiguous memory.
    """

    def __init__(
        self,
        net: nn.Module,
        device: str | torch.device = "auto",
        trained: bool = True,
        meta: dict[str, Any] | None = None,
    ) -> None:
        self.device = device if isinstance(device, torch.device) else select_device(device)
        self.net = net.to(self.device).float().eval().to(memory_format=torch.channels_last)
        self.config: SegmenterConfig = net.config
        self.trained = trained
        self.meta: dict[str, Any] = dict(meta or {})

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "auto") -> Segmenter:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"segmenter checkpoint not found: {path}")
        payload = load_checkpoint(path, CHECKPOINT_KIND)
        net = build_net(_config_from_dict(payload["config"]))
        net.load_state_dict(payload["state_dict"])
        return cls(net, device=device, trained=True, meta=payload.get("meta", {}))

    @classmethod
    def untrained(
        cls, config: SegmenterConfig = SegmenterConfig(), device: str | torch.device = "auto", seed: int = 0
    ) -> Segmenter:
        """Randomly initialised network (deterministic for a given `seed`), for when no checkpoint exists."""
        cpu_state = torch.random.get_rng_state()
        try:
            torch.manual_seed(seed)
            net = build_net(config)
        finally:
            torch.random.set_rng_state(cpu_state)
        return cls(net, device=device, trained=False, meta={"untrained": True, "seed": seed})

    def save(self, path: str | Path, meta: dict[str, Any] | None = None, half: bool = True) -> None:
        save_checkpoint(path, CHECKPOINT_KIND, self.config, self.net.state_dict(), {**self.meta, **(meta or {})}, half=half)

    @torch.inference_mode()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, h, w) in [-1, 1] at the network input size -> logits (B, K, h, w)."""
        return self.net(images.to(self.device, torch.float32).contiguous(memory_format=torch.channels_last))

    def segment(self, image: np.ndarray, out_size: tuple[int, int] | None = None) -> np.ndarray:
        """HxWx3 uint8 RGB image of any size -> uint8 label ids at `out_size` (height, width; default
        the image's size). The network reads the image at its own input size whatever the output's,
        so a label map wanted smaller than that is still segmented at the network's resolution."""
        if not isinstance(image, np.ndarray):
            raise ValueError(f"image must be a numpy array, not {type(image).__name__}")
        if image.dtype != np.uint8:
            raise ValueError(f"image must be uint8, not {image.dtype}")
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image must be HxWx3 RGB, got shape {image.shape}")
        h, w = image.shape[:2]
        if h == 0 or w == 0:
            raise ValueError(f"image is empty (shape {image.shape})")
        ih, iw = self.config.input_height, self.config.input_width
        if (h, w) != (ih, iw):
            shrink = h * w > ih * iw
            image = cv2.resize(image, (iw, ih), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float().div_(127.5).sub_(1.0)
        pred = self.logits(x).argmax(1)[0].to("cpu", torch.uint8).numpy()
        oh, ow = out_size or (h, w)
        if (oh, ow) != (ih, iw):
            pred = cv2.resize(pred, (ow, oh), interpolation=cv2.INTER_NEAREST)
        return pred

    def segment_batch(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float in [-1, 1], any H, W -> (B, H, W) int64 label ids on the input's device."""
        if not isinstance(images, torch.Tensor):
            raise ValueError(f"images must be a torch.Tensor, not {type(images).__name__}")
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"images must be floating point in [-1, 1], not {images.dtype}")
        if images.numel() == 0:
            raise ValueError(f"images is empty (shape {tuple(images.shape)})")
        h, w = images.shape[-2:]
        size = (self.config.input_height, self.config.input_width)
        with torch.inference_mode():
            x = images.to(self.device, torch.float32)
            if (h, w) != size:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
            pred = self.logits(x).argmax(1)
            if (h, w) != size:
                pred = F.interpolate(pred[:, None].float(), size=(h, w), mode="nearest")[:, 0].long()
        return pred.to(images.device)


def _to_numpy(a: Any) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def confusion_matrix(pred: Any, target: Any, num_classes: int, ignore_index: int | None = None) -> np.ndarray:
    """(K, K) int64 counts, rows = target class, columns = predicted class.

    `pred` and `target` are integer arrays/tensors of the same shape. Pixels whose target equals
    `ignore_index` are skipped; every other id must lie in [0, num_classes).
    """
    p = _to_numpy(pred).ravel()
    t = _to_numpy(target).ravel()
    if p.shape != t.shape:
        raise ValueError(f"pred and target sizes differ: {_to_numpy(pred).shape} vs {_to_numpy(target).shape}")
    if p.size and not (np.issubdtype(p.dtype, np.integer) and np.issubdtype(t.dtype, np.integer)):
        raise ValueError(f"pred and target must hold integer ids, not {p.dtype} / {t.dtype}")
    p = p.astype(np.int64)
    t = t.astype(np.int64)
    if ignore_index is not None:
        keep = t != ignore_index
        p, t = p[keep], t[keep]
    for name, a in (("pred", p), ("target", t)):
        if a.size and (a.min() < 0 or a.max() >= num_classes):
            raise ValueError(f"{name} ids must be in [0, {num_classes}), got [{a.min()}, {a.max()}]")
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_iou(conf: np.ndarray) -> np.ndarray:
    """IoU per class = TP / (TP + FP + FN); NaN for a class absent from both target and prediction."""
    conf = np.asarray(conf, dtype=np.float64)
    tp = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / np.where(union > 0, union, 1), np.nan)


def miou(conf: np.ndarray, exclude: Sequence[int] = ()) -> float:
    """Mean IoU over the classes present in the target or the prediction (union > 0), leaving out
    the ids in `exclude`. NaN when no class qualifies.

    CamVid convention (11 classes, void excluded): build `conf` with `ignore_index=11` (void
    target pixels skipped) and call `miou(conf, exclude=[11])`; pixels of real classes predicted as
    void still count as misses for their class.
    """
    ious = per_class_iou(conf)
    keep = np.ones(len(ious), dtype=bool)
    keep[list(exclude)] = False
    vals = ious[keep & ~np.isnan(ious)]
    return float(vals.mean()) if vals.size else float("nan")


def pixel_accuracy(conf: np.ndarray) -> float:
    """Share of counted pixels predicted correctly (trace / total); NaN for an empty matrix."""
    conf = np.asarray(conf)
    total = conf.sum()
    return float(np.trace(conf) / total) if total else float("nan")


@dataclass(frozen=True)
class SegmentationScores:
    """A segmenter's scores on one labelled split, in the CamVid convention.

    `miou_void_excluded`: void target pixels ignored, mean over the real classes (real pixels
    predicted as void still count as misses); `miou_with_void`: all ids. `per_class_iou` maps a
    class name to its IoU (void's from the all-ids matrix), None where the class is absent from
    both target and prediction.
    """

    miou_void_excluded: float
    miou_with_void: float
    pixel_acc_void_excluded: float
    per_class_iou: dict[str, float | None]
    confusion: np.ndarray  # (K, K) int64, rows = target, all pixels

    def as_dict(self) -> dict[str, Any]:
        return {
            "miou_void_excluded": self.miou_void_excluded,
            "miou_with_void": self.miou_with_void,
            "pixel_acc_void_excluded": self.pixel_acc_void_excluded,
            "per_class_iou": dict(self.per_class_iou),
        }


def scores_from_confusion(conf: np.ndarray, class_names: Sequence[str], void_id: int | None) -> SegmentationScores:
    """`SegmentationScores` of a (K, K) confusion matrix over all pixels (void targets included)."""
    conf = np.asarray(conf, dtype=np.int64)
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1] or conf.shape[0] != len(class_names):
        raise ValueError(f"confusion must be ({len(class_names)}, {len(class_names)}), not {conf.shape}")
    real = conf.copy()
    exclude: list[int] = []
    if void_id is not None:
        real[void_id, :] = 0  # == ignore_index=void
        exclude = [void_id]
    ious_real, ious_all = per_class_iou(real), per_class_iou(conf)
    ious = [ious_all[c] if c == void_id else ious_real[c] for c in range(len(class_names))]
    return SegmentationScores(
        miou_void_excluded=miou(real, exclude=exclude),
        miou_with_void=miou(conf),
        pixel_acc_void_excluded=pixel_accuracy(real),
        per_class_iou={n: (None if math.isnan(v) else round(float(v), 4)) for n, v in zip(class_names, ious)},
        confusion=conf,
    )


def score_segmentation(
    predict: Callable[[torch.Tensor], torch.Tensor],
    pairs: Any,
    class_names: Sequence[str],
    void_id: int | None,
    batch_size: int = 32,
) -> SegmentationScores:
    """Score `predict` ((B, 3, H, W) images in [-1, 1] -> (B, H, W) label ids) on every item of
    `pairs` (a dataset of (image, labels) tensors, e.g. `shared.semantic.data.camvid(..., "val")`).

    `Segmenter.segment_batch` is such a function, so the evaluation scores the shipped file exactly
    as training scored it.
    """
    k = len(class_names)
    conf = np.zeros((k, k), dtype=np.int64)
    for start in range(0, len(pairs), batch_size):
        images, labels = zip(*(pairs[i] for i in range(start, min(start + batch_size, len(pairs)))))
        pred = predict(torch.stack(images))
        conf += confusion_matrix(pred.cpu(), torch.stack(labels), k)
    return scores_from_confusion(conf, class_names, void_id)
