"""The run's figures: one plot per metric and SNR definition, the digital link's failure curve and
the qualitative grid of one scene across SNRs (PNG, matplotlib without a display).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

from evaluation.schema import DEFINITION_TITLE, METRICS, snr_columns  # noqa: E402
from shared.semantic.data import colorize  # noqa: E402


def plot_metrics(results: dict[str, Any], plot_dir: Path) -> list[Path]:
    """Each metric against SNR per definition (a metric nothing was measured for gets no plot), then
    the digital link's failure curve; returns the paths written."""
    plot_dir.mkdir(parents=True, exist_ok=True)
    snrs = sorted(results["settings"]["snrs_db"])
    positions = np.arange(len(snrs))
    paths = []
    for definition in results["settings"]["definitions"]:
        per_definition = results["results"].get(definition, {})
        for key, title, better, _ in METRICS:
            fig, ax = plt.subplots(figsize=(7, 4.2))
            drawn = False
            for name, per_snr in per_definition.items():
                if results["methods"][name]["kind"] == "real":
                    entry = per_snr["no channel"].get(key)
                    if isinstance(entry, dict):
                        ax.axhline(entry["mean"], color="black", linestyle="--", label=results["methods"][name]["label"])
                        drawn = True
                    continue
                means, stds = [], []
                for snr in snrs:
                    entry = per_snr.get(f"{snr:g}", {}).get(key)
                    if isinstance(entry, dict):
                        mean = entry["mean"]
                        means.append(mean if math.isfinite(mean) else np.nan)
                        stds.append(entry["std"] if math.isfinite(entry["std"]) else 0.0)
                    elif isinstance(entry, (int, float)):
                        means.append(float(entry))
                        stds.append(0.0)
                    else:
                        means.append(np.nan)
                        stds.append(0.0)
                if np.all(np.isnan(means)):
                    continue
                ax.errorbar(positions, means, yerr=stds, marker="o", capsize=3,
                            label=results["methods"][name]["label"] + _ratio_suffix(per_snr))
                drawn = True
            if not drawn:
                plt.close(fig)
                continue
            ax.set_xticks(positions, [f"{s:g}" for s in snrs])
            ax.set_xlabel(("PSNR" if definition == "paper_psnr" else "SNR") + f" (dB), {DEFINITION_TITLE[definition]}")
            ax.set_ylabel(f"{title.split(' (')[0]} {better}")
            paths.append(save_line_plot(fig, ax, plot_dir / f"{key}_{definition}.png", 7))
    curves = failure_curves(results)
    if curves:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for definition, curve in curves.items():
            line, = ax.plot(list(curve), [rate for rate, _ in curve.values()], label=DEFINITION_TITLE[definition])
            for extra, marker in ((False, "o"), (True, "x")):
                points = [(snr, rate) for snr, (rate, is_extra) in curve.items() if is_extra == extra]
                if points:
                    ax.plot(*zip(*points), linestyle="none", marker=marker, color=line.get_color())
        ticks = sorted({snr for curve in curves.values() for snr in curve})
        ax.set_xscale("symlog", linthresh=10)
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks], fontsize=7)
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("SNR (dB), each curve in its definition (symmetric log axis above 10 dB)")
        ax.set_ylabel("decode failure rate")
        ax.set_title("digital link (JPEG + 5G LDPC + QAM): the cliff (o: all images, x: extra SNRs on a subset)",
                     fontsize=9)
        paths.append(save_line_plot(fig, ax, plot_dir / "digital_cliff.png", 8))
    return paths


def save_line_plot(fig: plt.Figure, ax: plt.Axes, path: Path, legend_fontsize: int) -> Path:
    """A line plot's common finish (grid, legend, tight layout), written at the reports' 110 dpi and closed."""
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_fontsize)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _ratio_suffix(per_snr: dict[str, Any]) -> str:
    """The legend's ", bandwidth ratio r" of a method: the mean over its configurations' ratios."""
    ratios = [entry["bandwidth_ratio"]["mean"] for entry in per_snr.values()
              if isinstance(entry, dict) and isinstance(entry.get("bandwidth_ratio"), dict)]
    return f", bandwidth ratio {np.mean(ratios):.3g}" if ratios else ""


def plot_grids(results: dict[str, Any], grid: dict[str, Any], out_dir: Path) -> list[Path]:
    """One grid per definition: the original, the sent map and its segmentation above one row a method."""
    paths = []
    snrs = snr_columns(results)
    for definition, per_method in grid["images"].items():
        rows = list(per_method)
        fig, axes = plt.subplots(len(rows) + 1, len(snrs), figsize=(1.9 * len(snrs), 1.6 * (len(rows) + 1)), squeeze=False)
        for ax in axes.ravel():
            ax.axis("off")
        top = [("original", grid["original"]), ("label map sent", colorize(grid["labels"])),
               ("segmenter on the original", colorize(grid["segmented"]))]
        for ax, (title, image) in zip(axes[0], top):
            ax.imshow(image)
            ax.set_title(title, fontsize=7)
        for r, name in enumerate(rows, start=1):
            for c, snr in enumerate(snrs):
                image = per_method[name].get(snr)
                if image is None:
                    continue
                axes[r, c].imshow(image)
                axes[r, c].set_title(f"{name} @ {snr} dB", fontsize=7)
        fig.suptitle(f"scene {grid['scene']}, {DEFINITION_TITLE[definition]}", fontsize=9)
        fig.tight_layout()
        path = out_dir / ("grid.png" if definition == "paper_psnr" else f"grid_{definition}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def failure_curves(results: dict[str, Any]) -> dict[str, dict[float, tuple[float, bool]]]:
    """Decode-failure rate by SNR per definition: (rate, from the extra sweep) over both sweeps."""
    curves: dict[str, dict[float, tuple[float, bool]]] = {}
    n = results["settings"]["images"]
    for definition in results["settings"]["definitions"]:
        per_snr = results["results"].get(definition, {}).get("digital", {})
        curve = {float(snr): (entry["decode_failures"] / n, False) for snr, entry in per_snr.items()}
        cliff = results.get("digital_cliff") or {"curves": {}}
        curve.update({float(snr): (rate, True) for snr, rate in cliff["curves"].get(definition, {}).items()})
        if curve:
            curves[definition] = dict(sorted(curve.items()))
    return curves
