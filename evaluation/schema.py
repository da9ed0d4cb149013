"""What a run's results are made of: its rows (methods), its SNR definitions and its metrics.

The run (`evaluation.evaluate`), the checks, the Markdown and the plots all name these; they are
declared here once. Plain data: importing this loads neither torch nor matplotlib.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Method:
    """One row of the tables. `fds` and `noisy_training` are Table 5's columns."""

    name: str
    label: str
    kind: str  # "semantic", "analog", "digital" or "real"
    model: str | None = None  # "model" or "ablation_model"
    fds: bool | None = None
    noisy_training: bool | None = None


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("ours", "ours (noisy training + FDS)", "semantic", "model", True, True),
        Method("no_fds", "ablation: without FDS", "semantic", "model", False, True),
        Method("no_noisy", "ablation: without noisy training", "semantic", "ablation_model", True, False),
        Method("no_both", "ablation: without FDS and noisy training", "semantic", "ablation_model", False, False),
        Method("analog", "analog: RGB pixels as symbols", "analog"),
        Method("digital", "digital: JPEG + 5G LDPC + QAM", "digital"),
        Method("real", "real image (segmenter upper bound, no channel)", "real"),
    )
}
ABLATIONS = ("no_fds", "no_noisy", "no_both")

DEFINITION_TEXT = {
    "paper_psnr": (
        "the paper's PSNR (eq. 1), noise referred to a peak of 1 of the un-normalised values: ours and the "
        "ablations: the 0/1 class maps (noise std on the maps 10^(-PSNR/20)); analog: the pixels in [0, 1] "
        "(noise std on a pixel 10^(-PSNR/20)); digital: the same noise per channel use as ours on that image "
        "(unit power per real symbol, noise std sqrt(C) 10^(-PSNR/20), i.e. an average-power SNR of "
        "PSNR - 10 log10 C for C present classes)"
    ),
    "average_power": (
        "the average-power SNR, 10 log10(P / sigma^2) per real symbol with P the transmitted power "
        "(unit power per real symbol for every method); the same as Es/N0 per complex channel use"
    ),
}
DEFINITION_TITLE = {"paper_psnr": "paper's PSNR (eq. 1)", "average_power": "average-power SNR"}

# (key, title, better, decimals); per-image metrics have mean ± std, the distances one number.
METRICS: tuple[tuple[str, str, str, int], ...] = (
    ("miou", "mIoU", "↑", 3),
    ("pixel_accuracy", "pixel accuracy", "↑", 3),
    ("ssim", "SSIM", "↑", 3),
    ("psnr", "PSNR (dB) of the image", "↑", 2),
    ("lpips", "LPIPS", "↓", 3),
    ("frechet_segmenter_distance", "Frechet segmenter distance (FD over the project's segmenter features, not FID)", "↓", 3),
    ("fid", "FID (Inception)", "↓", 2),
)


def snr_columns(results: dict[str, Any]) -> list[str]:
    """SNR keys in the paper's column order, highest first."""
    return [f"{s:g}" for s in sorted(results["settings"]["snrs_db"], reverse=True)]
