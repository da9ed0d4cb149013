"""How close a received image is to the original: pixels, perception, semantics and distribution.

Named for image quality so that it is never taken for the services' Prometheus metrics
(`shared.wire.monitoring`).

* SSIM (Wang et al. 2004): 11x11 Gaussian window, sigma 1.5, K1 = 0.01, K2 = 0.03, computed per
  RGB channel over the valid region (no padding) and averaged; PSNR on 8-bit RGB.
* mIoU and pixel accuracy per image, and the mIoU of the pooled confusion matrix, from
  `shared.semantic.segmenter`'s confusion matrix.
* Frechet distance between two feature sets (the FID formula), used with the project's segmenter
  features ("Frechet segmenter distance") and, when their weights are given, Inception features.
* LPIPS and Inception features come only from TorchScript files given by path (NVIDIA's
  `vgg16.pt` and `inception-2015-12-05.pt` from the StyleGAN2-ADA metrics): nothing is downloaded
  and no other network stands in for them.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg

from shared.semantic.segmenter import Segmenter, confusion_matrix, miou, pixel_accuracy

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _as_nchw(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) or (H, W, 3) uint8/float array -> float64 (N, 3, H, W) tensor."""
    array = np.asarray(images)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"images must be (N, H, W, 3) or (H, W, 3), got shape {array.shape}")
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float64)).permute(0, 3, 1, 2)


def _check_pair(a: np.ndarray, b: np.ndarray) -> None:
    if np.shape(a) != np.shape(b):
        raise ValueError(f"image shapes differ: {np.shape(a)} vs {np.shape(b)}")


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """Normalised 1-D Gaussian weights of odd length `size`."""
    offsets = np.arange(size, dtype=np.float64) - (size - 1) / 2
    weights = np.exp(-(offsets**2) / (2 * sigma**2))
    return weights / weights.sum()


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> np.ndarray:
    """SSIM per image, shape (N,), of RGB images (N, H, W, 3); both sides at least 11 pixels."""
    _check_pair(a, b)
    x, y = _as_nchw(a), _as_nchw(b)
    height, width = x.shape[-2:]
    if min(height, width) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {height}x{width}")
    g = torch.from_numpy(gaussian_window())
    channels = x.shape[1]
    kernel_h = g.view(1, 1, -1, 1).repeat(channels, 1, 1, 1)
    kernel_w = g.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(t, kernel_h, groups=channels), kernel_w, groups=channels)

    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.mean(dim=(1, 2, 3)).numpy()


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> np.ndarray:
    """PSNR in dB per image, shape (N,); identical images give +inf."""
    _check_pair(a, b)
    x, y = _as_nchw(a), _as_nchw(b)
    mse = ((x - y) ** 2).mean(dim=(1, 2, 3)).numpy()
    with np.errstate(divide="ignore"):
        return np.where(mse > 0, 10.0 * np.log10(data_range**2 / np.maximum(mse, 1e-300)), np.inf)


def segmentation_scores(
    predictions: np.ndarray, targets: np.ndarray, num_classes: int, ignore_index: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-image mIoU and pixel accuracy (ignore class excluded), and the pooled confusion matrix."""
    if np.shape(predictions) != np.shape(targets):
        raise ValueError(f"predictions {np.shape(predictions)} and targets {np.shape(targets)} differ")
    exclude = [] if ignore_index is None else [ignore_index]
    ious, accuracies = [], []
    pooled = np.zeros((num_classes, num_classes), dtype=np.int64)
    for pred, target in zip(predictions, targets):
        conf = confusion_matrix(pred, target, num_classes, ignore_index=ignore_index)
        pooled += conf
        ious.append(miou(conf, exclude=exclude))
        accuracies.append(pixel_accuracy(conf))
    return np.asarray(ious, dtype=np.float64), np.asarray(accuracies, dtype=np.float64), pooled


def pooled_miou(conf: np.ndarray, ignore_index: int | None) -> float:
    """mIoU of a confusion matrix pooled over images (ignore class excluded), as the paper's tables report it."""
    return miou(conf, exclude=[] if ignore_index is None else [ignore_index])


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between two (N, D) feature sets."""
    a = np.asarray(features_a, dtype=np.float64)
    b = np.asarray(features_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be (N, D) with the same D, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError("the Frechet distance needs at least two samples per set")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # Fewer samples than dimensions make the covariances singular; sqrtm copes but warns.
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore")
        covmean = linalg.sqrtm(cov_a @ cov_b)
        if not np.isfinite(covmean).all():
            offset = np.eye(a.shape[1]) * 1e-6  # as pytorch-fid does
            covmean = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    covmean = np.real(covmean)
    distance = float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean))
    return max(distance, 0.0)


def to_model_range(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [-1, 1], the segmenter's input range."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


class SegmenterProbe:
    """Label maps and pooled scene features of the project's segmenter in one forward pass.

    The features are the pyramid-pooling output averaged over space (the widest context the
    network has); their Frechet distance is reported as the "Frechet segmenter distance", not as
    FID.
    """

    def __init__(self, segmenter: Segmenter) -> None:
        self.segmenter = segmenter
        self._captured: list[torch.Tensor] = []
        segmenter.net.ppm.register_forward_hook(lambda _m, _i, out: self._captured.append(out.mean(dim=(2, 3))))

    def __call__(self, images: np.ndarray, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
        """(N, H, W, 3) uint8 -> label maps (N, H, W) int64 and features (N, D) float64."""
        labels, features = [], []
        for start in range(0, len(images), batch_size):
            self._captured.clear()
            labels.append(self.segmenter.segment_batch(to_model_range(images[start:start + batch_size])).cpu().numpy())
            features.append(torch.cat(self._captured).cpu().double().numpy())
        return np.concatenate(labels), np.concatenate(features)


def _load_torchscript(path: str | Path, device: torch.device) -> torch.jit.ScriptModule:
    """The published metric networks are TorchScript files; torch warns that TorchScript is deprecated."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(str(path), map_location=device).eval()


class TorchScriptLpips:
    """LPIPS (VGG16) from NVIDIA's TorchScript `vgg16.pt`: squared distance of its LPIPS features."""

    def __init__(self, path: str | Path, device: torch.device) -> None:
        self.model = _load_torchscript(path, device)
        self.device = device

    @torch.inference_mode()
    def features(self, images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().to(self.device)
        return self.model(x, resize_images=False, return_lpips=True)

    def __call__(self, a: np.ndarray, b: np.ndarray, batch_size: int = 16) -> np.ndarray:
        _check_pair(a, b)
        out = []
        for start in range(0, len(a), batch_size):
            fa = self.features(a[start:start + batch_size])
            fb = self.features(b[start:start + batch_size])
            out.append((fa - fb).square().sum(dim=-1).cpu().double().numpy())
        return np.concatenate(out)


class TorchScriptInception:
    """2048-d pool features of NVIDIA's TorchScript `inception-2015-12-05.pt` (the FID network)."""

    def __init__(self, path: str | Path, device: torch.device) -> None:
        self.model = _load_torchscript(path, device)
        self.device = device

    @torch.inference_mode()
    def __call__(self, images: np.ndarray, batch_size: int = 16) -> np.ndarray:
        out = []
        for start in range(0, len(images), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])).permute(0, 3, 1, 2)
            out.append(self.model(x.to(self.device), return_features=True).cpu().double().numpy())
        return np.concatenate(out)


def summarize(values: Sequence[float] | np.ndarray) -> dict[str, float | int]:
    """Mean and standard deviation (ddof 0) over images; +inf when any value is +inf (PSNR)."""
    array = np.asarray(values, dtype=np.float64)
    finite = array[np.isfinite(array)]
    if array.size and np.isposinf(array).any():
        return {"mean": math.inf, "std": math.nan, "n": int(array.size), "n_inf": int(np.isposinf(array).sum())}
    if not finite.size:
        return {"mean": math.nan, "std": math.nan, "n": int(array.size)}
    return {"mean": float(finite.mean()), "std": float(finite.std()), "n": int(finite.size)}


def paired_difference(values: Sequence[float], reference: Sequence[float]) -> dict[str, float]:
    """Mean of the per-image differences values - reference, and its standard error."""
    diff = np.asarray(values, dtype=np.float64) - np.asarray(reference, dtype=np.float64)
    return {"mean": float(diff.mean()), "se": float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else 0.0}
