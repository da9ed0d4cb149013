"""What an evaluation run writes: results.json, results.md, plots/*.png and grid*.png.

The Markdown follows the paper's layout (methods as rows, SNRs as columns from 100 dB down to
1 dB, mean ± standard deviation over images) with one table per metric and SNR definition, the
ablation table in the layout of Table 5, the bit budget and the acceptance checks of the issue.
"""
from __future__ import annotations

import json
import math
import os
import tomllib
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

from shared.semantic.data import colorize  # noqa: E402
from shared.semantic.segmenter import miou  # noqa: E402

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
TABLE5_PAPER = {"ours": (0.549, 0.905), "no_noisy": (0.663, 0.713), "no_fds": (0.665, 0.613), "no_both": ("noise", "noise")}
EXPLANATION_SLOT = "_Explanation: to be written by whoever ran this evaluation (see `--notes`)._"


def pooled_miou(conf: np.ndarray, ignore_index: int | None) -> float:
    return miou(conf, exclude=[] if ignore_index is None else [ignore_index])


# --- JSON ------------------------------------------------------------------------------------------
def jsonable(value: Any) -> Any:
    """Plain JSON: inf as "inf", NaN as null, numpy scalars and arrays as Python values."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    return value


# --- notes: the explanations of whoever ran the evaluation -----------------------------------------
def load_notes(path: Path) -> dict[str, Any]:
    """A TOML file: `summary`, and per check id a table with the `observed` text it explains and
    the `explanation`. Keeping them outside the report lets a rerun regenerate the report with them."""
    notes = tomllib.loads(path.read_text())
    unknown = set(notes) - {"summary", "checks"}
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)} (expected summary and checks)")
    for check_id, note in notes.get("checks", {}).items():
        if not isinstance(note, dict) or set(note) != {"observed", "explanation"}:
            raise ValueError(f"{path}: checks.{check_id} needs exactly observed and explanation")
    return notes


def apply_notes(results: dict[str, Any], notes: dict[str, Any] | None) -> None:
    """Attach each explanation to its check only while the check still observes what was explained;
    the summary only while every explained check does. A stale note is dropped, never shown."""
    notes = notes or {}
    fresh = True
    for check in results["acceptance"]:
        note = notes.get("checks", {}).get(check["id"])
        matches = note is not None and note["observed"].strip() == check["observed"]
        check["explanation"] = note["explanation"].strip() if matches else None
        fresh = fresh and (note is None or matches)
    summary = notes.get("summary", "").strip()
    results["summary"] = summary if summary and fresh else None


# --- formatting --------------------------------------------------------------------------------------
def _cell(entry: Any, decimals: int) -> str:
    if entry is None:
        return "—"
    if isinstance(entry, str):
        return entry
    if isinstance(entry, dict):
        mean, std = entry.get("mean"), entry.get("std")
        if mean is None or (isinstance(mean, float) and math.isnan(mean)):
            return "—"
        if math.isinf(mean):
            return "inf"
        if std is None or math.isnan(std):
            return f"{mean:.{decimals}f}"
        return f"{mean:.{decimals}f} ± {std:.{decimals}f}"
    if isinstance(entry, float) and math.isnan(entry):
        return "—"
    return f"{entry:.{decimals}f}"


def _snr_columns(results: dict[str, Any]) -> list[str]:
    """SNR keys in the paper's column order, highest first."""
    return [f"{s:g}" for s in sorted(results["settings"]["snrs_db"], reverse=True)]


def _table(results: dict[str, Any], definition: str, key: str, decimals: int) -> list[str]:
    columns = _snr_columns(results)
    header = "SNR (dB)" if definition == "average_power" else "PSNR (dB)"
    lines = [f"| Method \\ {header} | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    per_definition = results["results"].get(definition, {})
    for name, info in results["methods"].items():
        if info["status"] != "ok":
            lines.append(f"| {info['label']} | {info['status']} |" + " |" * (len(columns) - 1))
            continue
        if name not in per_definition:
            if definition not in info["definitions"]:
                lines.append(f"| {info['label']} | not run under this definition |" + " |" * (len(columns) - 1))
            continue
        if info["kind"] == "real":
            entry = per_definition[name]["no channel"].get(key)
            value = _cell(entry, decimals) if entry is not None else "reference"
            lines.append(f"| {info['label']} | " + " | ".join([value] * len(columns)) + " |")
            continue
        cells = [_cell(per_definition[name][c].get(key), decimals) if c in per_definition[name] else "—"
                 for c in columns]
        lines.append(f"| {info['label']} | " + " | ".join(cells) + " |")
    return lines


def _metric(results: dict[str, Any], definition: str, name: str, snr: str, key: str = "miou") -> float | None:
    entry = results["results"].get(definition, {}).get(name, {}).get(snr, {}).get(key)
    if isinstance(entry, dict):
        value = entry.get("mean")
        return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)
    return None if entry is None or isinstance(entry, str) else float(entry)


# --- acceptance checks -------------------------------------------------------------------------------
def acceptance_checks(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's criteria, evaluated on this run, each PASS, FAIL or NOT EVALUATED."""
    checks = []
    for definition in results["settings"]["definitions"]:
        title = DEFINITION_TITLE[definition]
        real = results["results"].get(definition, {}).get("real", {}).get("no channel", {}).get("miou")
        context = f"; the segmenter on the real images: {real['mean']:.3f}" if isinstance(real, dict) else ""
        low, high = _metric(results, definition, "ours", "1"), _metric(results, definition, "ours", "100")
        if low is None or high is None:
            checks.append({"id": f"ours_1db_{definition}", "status": "NOT EVALUATED",
                           "check": f"ours keeps >= 0.9 of its 100 dB mIoU at 1 dB ({title})",
                           "observed": "needs ours at 1 and 100 dB"})
        else:
            ratio = low / high if high > 0 else float("nan")
            checks.append({"id": f"ours_1db_{definition}", "check": f"ours keeps >= 0.9 of its 100 dB mIoU at 1 dB ({title})",
                           "status": "PASS" if ratio >= 0.9 else "FAIL",
                           "observed": f"mIoU {low:.3f} at 1 dB vs {high:.3f} at 100 dB: ratio {ratio:.3f}{context}"})
        low, high = _metric(results, definition, "analog", "1"), _metric(results, definition, "analog", "30")
        if low is None or high is None:
            checks.append({"id": f"analog_1db_{definition}", "check": f"analog falls below half of its 30 dB mIoU at 1 dB ({title})",
                           "status": "NOT EVALUATED", "observed": "needs analog at 1 and 30 dB"})
        else:
            ratio = low / high if high > 0 else float("nan")
            checks.append({"id": f"analog_1db_{definition}", "check": f"analog falls below half of its 30 dB mIoU at 1 dB ({title})",
                           "status": "PASS" if ratio < 0.5 else "FAIL",
                           "observed": f"mIoU {low:.3f} at 1 dB vs {high:.3f} at 30 dB: ratio {ratio:.3f}{context}"})
    checks.append(_ablation_check(results))
    checks.append(_bits_check(results))
    return checks


def _ablation_check(results: dict[str, Any]) -> dict[str, Any]:
    expected = ["ours", "no_noisy", "no_fds", "no_both"]  # Table 5, mIoU high to low
    check = "ablations rank as in Table 5 by mIoU at PSNR 10 dB: ours > without noisy training > without FDS > without both"
    values = {name: _metric(results, "paper_psnr", name, "10") for name in expected}
    missing = [name for name, value in values.items() if value is None]
    if missing:
        return {"id": "ablation_ranking", "check": check, "status": "NOT EVALUATED",
                "observed": f"no PSNR 10 dB result for {', '.join(missing)}"}
    observed = sorted(expected, key=lambda n: -values[n])
    text = " > ".join(f"{n} {values[n]:.3f}" for n in observed)
    return {"id": "ablation_ranking", "check": check, "status": "PASS" if observed == expected else "FAIL", "observed": text}


def _bits_check(results: dict[str, Any]) -> dict[str, Any]:
    summary = results["bits"]["summary"]
    ours, jpeg = summary["ours_payload_bits"]["mean"], summary["jpeg_q75_bits"]["mean"]
    ratio = summary["ours_over_jpeg_q75"]["mean"]
    height, width = results["settings"]["evaluated_resolution"]
    return {"id": "bits", "check": f"ours sends fewer bits per image than the JPEG image (quality 75) at {height}x{width} "
                     "(the paper: 92% fewer than the full image at 256x512)",
            "status": "PASS" if ratio < 1 else "FAIL",
            "observed": f"ours {ours:,.0f} bits vs JPEG {jpeg:,.0f} bits per image on average; "
                        f"ours/JPEG per image {ratio:.2f} ± {summary['ours_over_jpeg_q75']['std']:.2f}"}


# --- Markdown ----------------------------------------------------------------------------------------
def markdown(results: dict[str, Any], link_base: Path, out_dir: Path, plots: list[Path], grids: list[Path]) -> str:
    s = results["settings"]

    def link(path: Path) -> str:
        return os.path.relpath(path, link_base)

    ours_info = (s["models"]["model"] or {}).get("info") or {}
    height, width = s["evaluated_resolution"]
    lines = [f"# Evaluation on CamVid {s['split']}: the paper's tables", ""]
    if results.get("summary"):
        lines += [" ".join(results["summary"].split()), ""]
    lines += [
        f"Command ({s['wall_time_s'] / 60:.1f} min wall time, {s['torch_threads']} torch threads on {s['device']}):",
        "",
        "```sh",
        s["command"],
        "```",
        "",
    ]
    if s.get("configurations_from_cache"):
        lines += [f"{s['configurations_from_cache']} configurations were taken from the cache of an earlier run "
                  "with the same settings; the wall time counts this run only. The configurations' own compute "
                  f"time, as recorded: {sum(s['seconds_by_method'].values()) / 60:.1f} min.", ""]
    lines += [
        "## Settings",
        "",
        f"- Images: {s['images']} of the {s['split_images']} {s['split']} images"
        + (" (all)." if s["images"] == s["split_images"] else ", evenly spread over the split."),
        f"- Evaluated resolution: {height}x{width}, the sender's map size. The label map that is sent and the original "
        "image are the dataset's, resized there (nearest neighbour and area). Every metric compares with them.",
        f"- Generation: sampler `{s['sampler']}`, {s['steps']} steps, classifier-free guidance {s['guidance']:g}, "
        f"seed {s['seed']}. Generated images are made at the models' resolution "
        f"{', '.join(sorted({f'{v[0]}x{v[1]}' for v in s['generator_resolution'].values()})) or '—'} "
        f"and resized (bicubic) to {height}x{width} for the metrics, as the receiver does for its output size.",
        f"- Noisy-trained model: `{s['models']['model']['path']}`"
        + (f" ({ours_info.get('name')}, {ours_info.get('training_steps')} training steps)." if ours_info else
           f" — {s['models']['model']['unavailable']}."),
        f"- Clean-trained model (ablations without noisy training): `{s['models']['ablation_model']['path']}`"
        + (" — " + s["models"]["ablation_model"]["unavailable"] + "." if s["models"]["ablation_model"]["unavailable"]
           else "."),
        f"- Segmenter for mIoU and pixel accuracy: `{s['segmenter']['path']}` (the project's CNN at "
        f"{s['segmenter']['input_size'][0]}x{s['segmenter']['input_size'][1]}; void excluded"
        + (f"; its own val mIoU {s['segmenter']['val_miou']:.3f}" if s["segmenter"]["val_miou"] else "") + ").",
        f"- LPIPS: {'`' + s['lpips'] + '`' if s['lpips'] != 'n/a' else 'n/a (no pretrained weights given)'}. "
        f"FID: {'`' + s['inception'] + '`' if s['inception'] != 'n/a' else 'n/a (no pretrained Inception given)'}. "
        "The Frechet segmenter distance is the FID formula over the project's segmenter features "
        "(pyramid-pooling output, spatial mean) against the real images; it is not FID.",
        "- Mean ± standard deviation over images. Channel noise and sampling seeds depend on the seed and the image "
        "only: every method sees the same channel realisation of an image at an SNR.",
        "",
        "## SNR definitions",
        "",
    ]
    for definition in s["definitions"]:
        lines.append(f"- **{DEFINITION_TITLE[definition]}** (`{definition}`): {DEFINITION_TEXT[definition]}.")
    lines += ["", "See docs/snr-definitions.md. Ablations run under: "
              + ", ".join(DEFINITION_TITLE[d] for d in s["ablation_definitions"]) + ".", ""]
    lines += ["## Acceptance checks", ""]
    for check in results["acceptance"]:
        explanation = " ".join(check["explanation"].split()) if check.get("explanation") else None
        lines += [f"- **{check['status']}**: {check['check']}. Observed: {check['observed']}.",
                  f"  {'_' + explanation + '_' if explanation else EXPLANATION_SLOT}"]
    lines += ["", "## Methods", ""]
    for name, info in results["methods"].items():
        lines.append(f"- `{name}`: {info['label']}" + ("" if info["status"] == "ok" else f" — **{info['status']}**"))
    for key, title, better, decimals in METRICS:
        lines += ["", f"## {title} {better}", ""]
        for definition in s["definitions"]:
            lines += [f"SNR definition: {DEFINITION_TITLE[definition]}.", ""]
            lines += _table(results, definition, key, decimals) + [""]
    lines += _table5(results) + _conditions_section(results) + _bits_section(results) + _digital_section(results)
    lines += ["", "## Plots", ""]
    lines += [f"![{p.stem}]({link(p)})" for p in plots]
    lines += ["", "## Qualitative grid", "",
              f"One scene ({results['grid_scene']}) across SNRs: the first row holds the original, the sent label map "
              "and the segmenter's map of the original; then one row a method, SNRs from high to low.", ""]
    lines += [f"![{p.stem}]({link(p)})" for p in grids]
    lines += ["", f"All numbers, with per-image values: [{link(out_dir / 'results.json')}]({link(out_dir / 'results.json')}).", ""]
    return "\n".join(lines)


def _table5(results: dict[str, Any]) -> list[str]:
    lines = ["", "## Ablations at PSNR 10 dB (layout of Table 5)", "",
             "| FDS | Noisy training | LPIPS | mIoU | pixel accuracy | SSIM | paper LPIPS | paper mIoU |",
             "|---|---|---|---|---|---|---|---|"]
    for name in ("no_both", "no_fds", "no_noisy", "ours"):
        info = results["methods"].get(name)
        paper = TABLE5_PAPER[name]
        marks = ("✓" if METHODS_FLAGS[name][0] else "✗", "✓" if METHODS_FLAGS[name][1] else "✗")
        if info is None or info["status"] != "ok" or "10" not in results["results"].get("paper_psnr", {}).get(name, {}):
            reason = "not run" if info is None else info["status"] if info["status"] != "ok" else "no PSNR 10 dB result"
            lines.append(f"| {marks[0]} | {marks[1]} | {reason} | | | | {paper[0]} | {paper[1]} |")
            continue
        entry = results["results"]["paper_psnr"][name]["10"]
        lines.append(f"| {marks[0]} | {marks[1]} | {_cell(entry.get('lpips'), 3)} | {_cell(entry['miou'], 3)} | "
                     f"{_cell(entry['pixel_accuracy'], 3)} | {_cell(entry['ssim'], 3)} | {paper[0]} | {paper[1]} |")
    lines += ["", "The paper's columns are its Cityscapes numbers (DRN-D-105 segmenter); ours are CamVid with the "
              "project's segmenter, so only the ranking compares."]
    return lines


def _conditions_section(results: dict[str, Any]) -> list[str]:
    conditions = results.get("conditions")
    if not conditions:
        return []
    lines = ["", "## What the models are conditioned on", "",
             "The receiver's present-class maps at the pixels where the sent map is 0 and where it is 1, before and "
             "after FDS (mean ± standard deviation over those pixels of every image, on the methods' channel "
             "realisations). The model trained on clean maps learned on the 100 dB row after FDS; the noisy-trained "
             "model on the FDS rows of all the training SNRs.", "",
             "| SNR definition | SNR (dB) | raw on 0 | raw on 1 | after FDS on 0 | after FDS on 1 |",
             "|---|---|---|---|---|---|"]
    for definition, per_snr in conditions.items():
        for snr in sorted(per_snr, key=float, reverse=True):
            cells = " | ".join(_cell(per_snr[snr][key], 3) for key in ("raw_on_0", "raw_on_1", "fds_on_0", "fds_on_1"))
            lines.append(f"| {DEFINITION_TITLE[definition]} | {snr} | {cells} |")
    return lines


METHODS_FLAGS = {"ours": (True, True), "no_fds": (False, True), "no_noisy": (True, False), "no_both": (False, False)}


def _bits_section(results: dict[str, Any]) -> list[str]:
    summary = results["bits"]["summary"]
    height, width = results["settings"]["evaluated_resolution"]

    def row(label: str, bits_key: str | None, uses_key: str | None) -> str:
        bits = _cell(summary[bits_key], 0) if bits_key else "—"
        uses = _cell(summary[uses_key], 0) if uses_key else "—"
        return f"| {label} | {bits} | {uses} |"

    lines = ["", f"## Bits and channel uses per image at {height}x{width}", "",
             "| transmission | bits per image | complex channel uses per image |", "|---|---|---|",
             row("ours and ablations: present-class 0/1 maps (1 bit a value; sent as analog symbols)",
                 "ours_payload_bits", "ours_channel_uses"),
             row("analog: raw 8-bit RGB (sent as analog symbols)", "raw_rgb_bits", "analog_channel_uses"),
             row("JPEG image, quality 75 (the paper's full-image comparison)", "jpeg_q75_bits", None),
             row("label map as a lossless PNG (not sent: what the semantics take when entropy-coded)",
                 "label_map_png_bits", None),
             row("digital: JPEG at the chosen quality", "digital_jpeg_bits", None),
             row("digital: LDPC-coded bits (with CRCs)", "digital_coded_bits", "digital_channel_uses"),
             "",
             f"Present classes per image: {_cell(summary['present_classes'], 2)}. Ours / JPEG (quality 75) per image: "
             f"{_cell(summary['ours_over_jpeg_q75'], 2)}. Digital schemes chosen: "
             + ", ".join(f"{k}: {v}" for k, v in summary["digital_mcs_counts"].items())
             + f"; JPEG quality {_cell(summary['digital_jpeg_quality'], 1)}; "
             f"{summary['digital_over_budget']} image(s) did not fit ours' channel uses (sent with the smallest scheme).",
             "",
             "The digital link is sized to ours' channel uses per image (at most; the rest of the budget is unused). "
             "The analog baseline is not: it sends one real symbol a pixel value (three a pixel), ours one a pixel "
             f"for each of its C present classes, so ours uses "
             f"{summary['ours_channel_uses']['mean'] / summary['analog_channel_uses']['mean']:.1f}x the analog "
             "baseline's channel uses on average."]
    return lines


def _digital_section(results: dict[str, Any]) -> list[str]:
    if "digital" not in results["methods"] or results["methods"]["digital"]["status"] != "ok":
        return []
    columns = _snr_columns(results)
    n = results["settings"]["images"]
    lines = ["", "## Digital link: decode failures (images lost to a failed CRC or JPEG)", "",
             "| SNR definition | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for definition in results["settings"]["definitions"]:
        per_snr = results["results"].get(definition, {}).get("digital", {})
        cells = [f"{per_snr[c]['decode_failures']}/{n}" if c in per_snr else "—" for c in columns]
        lines.append(f"| {DEFINITION_TITLE[definition]} | " + " | ".join(cells) + " |")
    lines += ["", "A lost image is replaced by a mid-grey image for every metric. The scheme is fixed per image "
              "(no SNR feedback), so the link works perfectly above a threshold and loses everything below it."]
    cliff = results.get("digital_cliff")
    if cliff:
        lines += ["", f"Failure rate at extra SNRs ({cliff['images']} of the images, no generation involved):", ""]
        for definition, curve in cliff["curves"].items():
            lines.append(f"- {DEFINITION_TITLE[definition]}: " + ", ".join(f"{k} dB: {v:.2f}" for k, v in curve.items()))
    return lines


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


# --- plots and grid ----------------------------------------------------------------------------------
def plot_metrics(results: dict[str, Any], plot_dir: Path) -> list[Path]:
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
                ax.errorbar(positions, means, yerr=stds, marker="o", capsize=3, label=results["methods"][name]["label"])
                drawn = True
            if not drawn:
                plt.close(fig)
                continue
            ax.set_xticks(positions, [f"{s:g}" for s in snrs])
            ax.set_xlabel(("PSNR" if definition == "paper_psnr" else "SNR") + f" (dB), {DEFINITION_TITLE[definition]}")
            ax.set_ylabel(f"{title.split(' (')[0]} {better}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            fig.tight_layout()
            path = plot_dir / f"{key}_{definition}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            paths.append(path)
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
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = plot_dir / "digital_cliff.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_grids(results: dict[str, Any], grid: dict[str, Any], out_dir: Path) -> list[Path]:
    paths = []
    snrs = _snr_columns(results)
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


def write_all(results: dict[str, Any], out_dir: Path, report_path: Path | None = None,
              notes: dict[str, Any] | None = None) -> list[Path]:
    """Write every output; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    grid = results.pop("grid")
    results["grid_scene"] = grid["scene"]
    results["acceptance"] = acceptance_checks(results)
    apply_notes(results, notes)
    plots = plot_metrics(results, out_dir / "plots")
    grids = plot_grids(results, grid, out_dir)
    json_path = out_dir / "results.json"
    json_path.write_text(json.dumps(jsonable(results), indent=1, ensure_ascii=False) + "\n")
    md_path = out_dir / "results.md"
    md_path.write_text(markdown(results, out_dir, out_dir, plots, grids))
    written = [json_path, md_path, *plots, *grids]
    if report_path is not None:
        report_path.parent.mkdir(parents=True, exist_ok=True)
        report_path.write_text(markdown(results, report_path.parent, out_dir, plots, grids))
        written.append(report_path)
    return written
