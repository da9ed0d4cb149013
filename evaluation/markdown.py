"""The run's report in Markdown, in the paper's layout.

Methods as rows and SNRs as columns from 100 dB down to 1 dB, mean ± standard deviation over
images, one table per metric and SNR definition; then the ablation table in the layout of Table 5,
what the models are conditioned on, the bit budget, the digital link's decode failures and the
acceptance checks with their explanations.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from evaluation.schema import DEFINITION_TEXT, DEFINITION_TITLE, METHODS, METRICS, snr_columns

TABLE5_PAPER = {"ours": (0.549, 0.905), "no_noisy": (0.663, 0.713), "no_fds": (0.665, 0.613), "no_both": ("noise", "noise")}
EXPLANATION_SLOT = "_Explanation: to be written by whoever ran this evaluation (see `--notes`)._"


def render(results: dict[str, Any], link_base: Path, out_dir: Path, plots: list[Path], grids: list[Path]) -> str:
    """The whole report; links are relative to `link_base`, the folder the Markdown is written to."""
    s = results["settings"]

    def link(path: Path) -> str:
        return os.path.relpath(path, link_base)

    ours_info = (s["models"]["model"] or {}).get("info") or {}
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
        _resolution_line(s),
        f"- Generation: sampler `{s['sampler']}`, {s['steps']} steps, classifier-free guidance {s['guidance']:g}, "
        f"seed {s['seed']}. Generated images are made at the models' resolution "
        f"{', '.join(sorted({f'{v[0]}x{v[1]}' for v in s['generator_resolution'].values()})) or '—'} "
        + _stage_text(s),
        _fds_line(s),
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


def _resolution_line(s: dict[str, Any]) -> str:
    """The evaluated resolution and the map size, and which label map is which."""
    height, width = s["evaluated_resolution"]
    map_height, map_width = s.get("map_size", s["evaluated_resolution"])  # reports from before the option: equal
    if (height, width) == (map_height, map_width):
        return (f"- Evaluated resolution: {height}x{width}, the sender's map size. The label map that is sent and the "
                "original image are the dataset's, resized there (nearest neighbour and area). Every metric compares "
                "with them.")
    return (f"- Evaluated resolution: {height}x{width}; the sender's map size is {map_height}x{map_width}. The original "
            f"image and the ground-truth label map are the dataset's, resized to {height}x{width} (area and nearest "
            f"neighbour); the label map that is sent is that map resized to {map_height}x{map_width} (nearest "
            f"neighbour), as the sender takes its map at its map size. Every metric compares with the {height}x{width} "
            f"image and labels; the analog and digital baselines send the {height}x{width} image.")


def _fds_line(s: dict[str, Any]) -> str:
    """Which FDS the methods with FDS ran; reports from before the option ran eq. 2 as published."""
    variant = s.get("fds_variant", "paper")
    if variant == "paper":
        return "- FDS: eq. 2 as published (`paper`), 3x3 average then 3x3 max pooling."
    return (f"- FDS: `{variant}` (shared/semantic/fds.py; docs/fds.md compares it with eq. 2 as published, `paper`), "
            "3x3 pooling.")


def _stage_text(s: dict[str, Any]) -> str:
    """How the generated images reach the evaluated resolution: the upscaling stage, or bicubic."""
    height, width = s["evaluated_resolution"]
    stage = s.get("upscaler")
    if stage is None:
        return (f"and resized (bicubic) to {height}x{width} for the metrics, as the receiver does for its output "
                "size.")
    out_height, out_width = stage["output_resolution"]
    text = (f"and upscaled to {out_height}x{out_width} by the receiver's upscaling stage `{stage['path']}` "
            f"({stage['name']}), conditioned on the received maps at the size they were sent (after FDS; the raw "
            "maps for the methods without FDS), as the receiver does")
    if (out_height, out_width) == (height, width):
        return text + "."
    shrinking = height <= out_height and width <= out_width  # as shared.wire.imageio.resize_image chooses
    return (text + f"; then resized ({'area' if shrinking else 'bicubic'}) to {height}x{width} for the metrics, as "
            "the receiver does for its output size.")


def _table5(results: dict[str, Any]) -> list[str]:
    lines = ["", "## Ablations at PSNR 10 dB (layout of Table 5)", "",
             "| FDS | Noisy training | LPIPS | mIoU | pixel accuracy | SSIM | paper LPIPS | paper mIoU |",
             "|---|---|---|---|---|---|---|---|"]
    for name in ("no_both", "no_fds", "no_noisy", "ours"):
        info = results["methods"].get(name)
        paper = TABLE5_PAPER[name]
        marks = ("✓" if METHODS[name].fds else "✗", "✓" if METHODS[name].noisy_training else "✗")
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


def _bits_section(results: dict[str, Any]) -> list[str]:
    summary = results["bits"]["summary"]
    height, width = results["settings"]["evaluated_resolution"]
    map_height, map_width = results["settings"].get("map_size", (height, width))

    def row(label: str, bits_key: str | None, uses_key: str | None) -> str:
        bits = _cell(summary[bits_key], 0) if bits_key else "—"
        uses = _cell(summary[uses_key], 0) if uses_key else "—"
        ratio_key = uses_key.replace("_channel_uses", "_bandwidth_ratio") if uses_key else None
        ratio = _cell(summary[ratio_key], 3) if ratio_key in summary else "—"
        return f"| {label} | {bits} | {uses} | {ratio} |"

    lines = ["", f"## Bits and channel uses per image at {height}x{width}", "",
             "| transmission | bits per image | complex channel uses per image | bandwidth ratio |",
             "|---|---|---|---|",
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
             "baseline's channel uses on average.",
             "",
             f"The bandwidth ratio is the complex channel uses per real value of the {height}x{width}x3 source image "
             f"({height * width * 3:,} values; docs/rate-quality.md): the analog image's is 1/2. "
             "docs/rate-quality.md compares the representations at equal channel uses."]
    if (map_height, map_width) != (height, width):
        lines += ["", f"Ours' maps and the label map's PNG are at the sender's map size {map_height}x{map_width}; "
                  f"the images (raw, JPEG, analog, digital) at {height}x{width}."]
    return lines


def _digital_section(results: dict[str, Any]) -> list[str]:
    if "digital" not in results["methods"] or results["methods"]["digital"]["status"] != "ok":
        return []
    columns = snr_columns(results)
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


def _table(results: dict[str, Any], definition: str, key: str, decimals: int) -> list[str]:
    columns = snr_columns(results)
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
