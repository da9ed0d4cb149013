"""What a rate-quality run writes: results.json, the figures, the Markdown report and the sender's table.

The frontier is read off the results: at a budget of R channel uses per source value, each
representation counts with its best rate that stays within R (its budget, or for ours and the
learned encoder its measured ratio), and the best representation at (R, SNR) wins. Two targets
(`target_checks`) are checked on it; `--notes` explain them as in `evaluation.checks`. Ours counts
as the services serve it, through the condition adapter of its factor where there is one; the report sets
that against the base generator alone at the same factor (what fine-tuning bought).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from evaluation.checks import apply_notes  # noqa: E402
from evaluation.plots import save_line_plot  # noqa: E402
from evaluation.report import jsonable  # noqa: E402
from evaluation.schema import DEFINITION_TEXT, DEFINITION_TITLE  # noqa: E402
from shared.paths import REPO_ROOT  # noqa: E402
from shared.semantic import rate_quality  # noqa: E402
from shared.semantic.digital_link import MCS_TABLE  # noqa: E402

TOLERANCE_MIOU = 0.01  # a cheaper setting within this of the best becomes the default
TARGET_RATIO = 1 / 12
TARGET_KEEP = 0.9
TARGET_SNR = 10.0
EXPLANATION_SLOT = "_Explanation: to be written by whoever ran this evaluation (see `--notes`)._"


# --- reading the results -----------------------------------------------------------------------------
def point_ratio(results: dict[str, Any], name: str, rate: str, snr: str) -> float:
    """The ratio a configuration counts at: its budget, or its measured mean ratio when it has none."""
    budget = results["representations"][name]["rates"][rate].get("budget_ratio")
    if budget is not None:
        return float(budget)
    return float(results["results"][name][rate][snr]["bandwidth_ratio"]["mean"])


def miou(results: dict[str, Any], name: str, rate: str, snr: str) -> float | None:
    entry = results["results"].get(name, {}).get(rate, {}).get(snr)
    return None if entry is None else float(entry["miou"]["mean"])


def best_within(results: dict[str, Any], name: str, ratio: float, snr: str) -> tuple[str, float] | None:
    """(rate, mIoU) of a representation's best configuration within `ratio` at `snr`, or None."""
    best = None
    for rate in results["results"].get(name, {}):
        value = miou(results, name, rate, snr)
        if value is None or point_ratio(results, name, rate, snr) > ratio * (1 + 1e-9):
            continue
        if best is None or value > best[1]:
            best = (rate, value)
    return best


def frontier(results: dict[str, Any], ratios: list[float], snr: str, kind: str | None = None,
             exclude: tuple[str, ...] = ()) -> dict[float, tuple[str, str, float] | None]:
    """Per ratio, the (representation, rate, mIoU) that wins at `snr`, among `kind` when given."""
    out: dict[float, tuple[str, str, float] | None] = {}
    for ratio in ratios:
        best = None
        for name, info in results["representations"].items():
            if (kind and info["kind"] != kind) or name in exclude:
                continue
            found = best_within(results, name, ratio, snr)
            if found and (best is None or found[1] > best[2]):
                best = (name, found[0], found[1])
        out[ratio] = best
    return out


def _ratios(results: dict[str, Any]) -> list[float]:
    return sorted({rate_quality.parse_ratio(r) for r in results["settings"]["ratios"]}, reverse=True)


def _snr_keys(results: dict[str, Any]) -> list[str]:
    return [f"{s:g}" for s in results["settings"]["snrs_db"]]


def _map_size(settings: dict[str, Any]) -> tuple[int, int]:
    """The sender's map size (results from before --image-height/--image-width: the evaluated resolution)."""
    height, width = settings.get("map_size", settings["evaluated_resolution"])
    return height, width


def _at_map_size(settings: dict[str, Any]) -> bool:
    """Evaluated at the sender's map size, the generated scenes resized bicubically (the options' defaults)."""
    return tuple(settings["evaluated_resolution"]) == _map_size(settings) and settings.get("upscaler") is None


# --- checks, default and table ----------------------------------------------------------------------
def target_checks(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The two targets on this run, each PASS, FAIL or NOT EVALUATED with what was observed: within a
    ratio of 1/12 the best semantic representation keeps 0.9 of its full-bandwidth mIoU at 10 dB, and
    at equal channel uses a semantic one beats the digital and the analog image at or below 10 dB."""
    return [_keep_check(results), _equal_uses_check(results)]


def _keep_check(results: dict[str, Any]) -> dict[str, Any]:
    """Each semantic representation's best within 1/12 against its own mIoU at its largest ratio (ours'
    full-bandwidth mIoU for one whose largest ratio is within 1/12 already, like the learned encoder)."""
    snr = f"{TARGET_SNR:g}"
    check = {"id": "keep_at_1_12", "check": f"at a bandwidth ratio of at most 1/12, the best semantic representation "
             f"keeps at least {TARGET_KEEP} of its full-bandwidth mIoU at {snr} dB"}
    full = _full_bandwidth(results, "ours", snr)
    if full is None:
        return check | {"status": "NOT EVALUATED", "observed": f"needs ours at {snr} dB"}
    observed, best_keep = [], 0.0
    for name, info in results["representations"].items():
        low = best_within(results, name, TARGET_RATIO, snr)
        if info["kind"] != "semantic" or name.endswith("_fixed") or low is None:
            continue
        own = _full_bandwidth(results, name, snr)
        reference, whose = (own, "") if own and point_ratio(results, name, own[0], snr) > TARGET_RATIO else (full, "ours ")
        keep = low[1] / reference[1] if reference[1] > 0 else 0.0
        best_keep = max(best_keep, keep)
        observed.append(f"{name} {low[0]} {low[1]:.3f} vs {whose}{reference[0]} {reference[1]:.3f}: {keep:.2f}")
    if not observed:
        return check | {"status": "NOT EVALUATED", "observed": "no semantic representation ran within 1/12"}
    return check | {"status": "PASS" if best_keep >= TARGET_KEEP else "FAIL", "observed": "; ".join(observed)}


def _full_bandwidth(results: dict[str, Any], name: str, snr: str) -> tuple[str, float] | None:
    """(rate, mIoU) of a representation's largest-ratio configuration at `snr`."""
    rates = [r for r, per_snr in results["results"].get(name, {}).items() if snr in per_snr]
    if not rates:
        return None
    rate = max(rates, key=lambda r: point_ratio(results, name, r, snr))
    return rate, float(results["results"][name][rate][snr]["miou"]["mean"])


def _equal_uses_check(results: dict[str, Any]) -> dict[str, Any]:
    check = {"id": "equal_uses", "check": "at equal channel uses, some semantic representation beats the JPEG+LDPC+QAM "
             f"image and the analog image at every SNR at or below {TARGET_SNR:g} dB"}
    snrs = [s for s in _snr_keys(results) if float(s) <= TARGET_SNR]
    if not snrs or not {"digital", "analog"} <= set(results["results"]):
        return check | {"status": "NOT EVALUATED", "observed": "needs digital and analog at SNRs <= 10 dB"}
    ratios = _ratios(results)
    cells = len(snrs) * len(ratios)
    lost, margins, separated_wins = [], [], []
    for snr in snrs:
        semantic = frontier(results, ratios, snr, kind="semantic")
        images = frontier(results, ratios, snr, kind="image")
        without_separated = frontier(results, ratios, snr, kind="semantic", exclude=("separated", "separated_fixed"))
        for ratio in ratios:
            ours, theirs = semantic[ratio], images[ratio]
            if ours is None or (theirs is not None and theirs[2] >= ours[2]):
                lost.append(f"{rate_quality.ratio_text(ratio)} at {snr} dB ({_who(theirs)} vs {_who(ours)})")
            else:
                margins.append((ours[2] - (theirs[2] if theirs else 0.0), f"{rate_quality.ratio_text(ratio)} at {snr} dB"))
            if ours and ours[0].startswith("separated") and without_separated[ratio]:
                separated_wins.append(f"{rate_quality.ratio_text(ratio)} at {snr} dB by "
                                      f"{ours[2] - without_separated[ratio][2]:+.3f}")
    observed = f"semantic ahead in {cells - len(lost)} of {cells} (ratio, SNR) cells"
    if margins:
        narrow = sorted(margins)[:3]
        observed += " (smallest margins " + ", ".join(f"{m:+.3f} at {where}" for m, where in narrow) + ")"
    if lost:
        observed += "; not in " + ", ".join(lost)
    observed += ("; the separated semantic link is the best semantic one at " + ", ".join(separated_wins)
                 if separated_wins else "; the separated semantic link is never the best semantic one")
    return check | {"status": "PASS" if not lost else "FAIL", "observed": observed}


def _who(entry: tuple[str, str, float] | None) -> str:
    return "nothing" if entry is None else f"{entry[0]} {entry[1]} {entry[2]:.3f}"


def paired_difference(values: list[float], reference: list[float]) -> tuple[float, float]:
    """Mean and standard error of the per-image differences (same images, channels and seeds)."""
    difference = np.asarray(values) - np.asarray(reference)
    stderr = float(difference.std(ddof=1) / math.sqrt(difference.size)) if difference.size > 1 else math.nan
    return float(difference.mean()), stderr


def default_choice(results: dict[str, Any]) -> dict[str, Any] | None:
    """The cheapest setting of ours (factor, compression) within TOLERANCE_MIOU of factor 1 at 10 dB,
    with the paired differences it rests on."""
    snr = f"{TARGET_SNR:g}"
    reference = results["results"].get("ours", {}).get("f1", {}).get(snr)
    if reference is None:
        return None
    rows = []
    for name in ("ours", "ours_jpeg"):
        for rate, per_snr in results["results"].get(name, {}).items():
            if snr not in per_snr:
                continue
            difference, stderr = paired_difference(per_snr[snr]["per_image"]["miou"], reference["per_image"]["miou"])
            rows.append({"representation": name, "rate": rate,
                         **{k: results["representations"][name]["rates"][rate][k]
                            for k in ("downsample_factor", "compression")},
                         "bandwidth_ratio": per_snr[snr]["bandwidth_ratio"]["mean"],
                         "miou": per_snr[snr]["miou"]["mean"], "difference": difference,
                         "difference_stderr": stderr})
    rows.sort(key=lambda r: (r["bandwidth_ratio"], r["compression"] != "none"))
    chosen = next(r for r in rows if r["difference"] > -TOLERANCE_MIOU or (r["representation"], r["rate"]) == ("ours", "f1"))
    return {"snr_db": TARGET_SNR, "tolerance_miou": TOLERANCE_MIOU, "rows": rows, "chosen": chosen}


def sender_table(results: dict[str, Any]) -> dict[str, Any]:
    """The rate-quality table the sender chooses from: the settings it can send, mIoU per SNR (with the
    adapter the receiver serves each one through, as scored), and the link adaptation measured.

    Its bandwidth ratios count as the sender counts them (`shared.semantic.rate_quality`): per value
    of the image at the sender's map size, whatever the evaluated resolution; a run at another
    resolution, or through the upscaling stage, records both sizes and the stage beside the mIoU."""
    snrs = _snr_keys(results)
    s = results["settings"]
    to_sender = s["source_values"] / rate_quality.source_values(*_map_size(s))  # 1 at the map size
    entries = []
    for name, info in results["representations"].items():
        if not info["sendable"]:
            continue
        if name == "separated":
            entries += _separated_entries(results, snrs)
            continue
        for rate, rate_info in info["rates"].items():
            per_snr = results["results"][name][rate]
            entry = {"representation": name, "downsample_factor": rate_info.get("downsample_factor", 1),
                     "compression": rate_info.get("compression", "none"),
                     "jpeg_quality": rate_info.get("jpeg_quality", 75),
                     "adapter": None if rate_info.get("adapter") is None else rate_info["adapter"]["path"],
                     "bandwidth_ratio": float(np.mean([per_snr[snr]["bandwidth_ratio"]["mean"] for snr in snrs]))
                     * to_sender,
                     "miou": [round(per_snr[snr]["miou"]["mean"], 4) for snr in snrs]}
            if name == "learned":
                entry["model"] = Path(rate_info["checkpoint"]).stem
            entries.append(entry)
    table = {"version": rate_quality.TABLE_VERSION, "snr_definition": s["definition"],
             "snrs_db": [float(x) for x in snrs], "tolerance_miou": TOLERANCE_MIOU, "made_by": s["command"],
             "images": s["images"], "split": s["split"], "sampler": s["sampler"], "steps": s["steps"],
             "channel": "awgn", "link_adaptation": dict(results.get("link_adaptation", {})), "entries": entries}
    if not _at_map_size(s):  # where the mIoU was measured; a table at the map size is as before the options
        table |= {"evaluated_resolution": list(s["evaluated_resolution"]), "map_size": list(_map_size(s)),
                  "upscaler": None if s.get("upscaler") is None else s["upscaler"]["path"]}
    rate_quality.RateQualityTable.from_dict(table, "the table being written")  # what the sender will accept
    return table


def _separated_entries(results: dict[str, Any], snrs: list[str]) -> list[dict[str, Any]]:
    """The digital link's label map at each factor: the mIoU of a configuration that sent every image at
    that factor and lost none (a decoded label map gives the same scene at any SNR), with its ratio at
    the scheme of each SNR left to the sender, which codes the map itself."""
    height, width = _map_size(results["settings"])  # the label map's options are named at the map size
    images = results["settings"]["images"]
    found: dict[int, float] = {}
    for per_snr in results["results"]["separated"].values():
        for entry in per_snr.values():
            sources = entry.get("sources", {})
            if len(sources) == 1 and entry.get("lost") == 0:
                (source, count), = sources.items()
                size = source.removeprefix("labels ").split("x")
                if count == images and len(size) == 2:
                    found.setdefault(height // int(size[0]), round(entry["miou"]["mean"], 4))
    return [{"representation": "separated", "downsample_factor": factor, "compression": "none", "jpeg_quality": 75,
             "adapter": None, "bandwidth_ratio": _mean_separated_ratio(results, factor, height, width),
             "miou": [miou] * len(snrs)} for factor, miou in sorted(found.items())]


def _mean_separated_ratio(results: dict[str, Any], factor: int, height: int, width: int) -> float:
    """The label map's mean size at `factor` over the most efficient scheme's bits per channel use, as a
    ratio: the least it takes (the sender codes each map at the scheme for the SNR and counts it, per
    value of the image at its map size, `height` x `width`)."""
    bits = results["sizes"].get(f"labels {height // factor}x{width // factor}", {}).get("mean", 1.0)
    efficiency = max(mcs.spectral_efficiency for mcs in MCS_TABLE)
    return float(bits / efficiency / rate_quality.source_values(height, width))


# --- writing ---------------------------------------------------------------------------------------
def write_all(results: dict[str, Any], out_dir: Path, report_path: Path | None = None, table_path: Path | None = None,
              notes: dict[str, Any] | None = None) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    grid, original = results.pop("grid"), results.pop("grid_original")
    results["acceptance"] = target_checks(results)
    apply_notes(results, notes)
    results["default"] = default_choice(results)
    written = []
    if table_path is not None and results["settings"]["definition"] == rate_quality.TABLE_SNR_DEFINITION:
        table_path.parent.mkdir(parents=True, exist_ok=True)
        table_path.write_text(json.dumps(sender_table(results), indent=1) + "\n")
        results["settings"]["table"] = os.path.relpath(table_path.resolve(), REPO_ROOT)
        written.append(table_path)
    plots = plot_all(results, out_dir / "plots")
    grid_path = plot_grid(results, grid, original, out_dir / "grid.png")
    json_path = out_dir / "results.json"
    json_path.write_text(json.dumps(jsonable(results), indent=1, ensure_ascii=False) + "\n")
    written += [json_path, *plots, grid_path]
    report_path = report_path or out_dir / "rate-quality.md"  # one report: --report, else beside the JSON
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(render(results, report_path.parent, out_dir, plots, grid_path))
    return written + [report_path]


def _label(results: dict[str, Any], name: str) -> str:
    return results["representations"][name]["label"]


def _plot_order(results: dict[str, Any]) -> list[str]:
    return [n for n, info in results["representations"].items() if info["status"] == "ok"]


def plot_all(results: dict[str, Any], plot_dir: Path) -> list[Path]:
    """mIoU against SNR at each fixed ratio, mIoU against ratio at each SNR, and the cliffs."""
    plot_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    definition = results["settings"]["definition"]
    axis = ("PSNR" if definition == "paper_psnr" else "SNR") + f" (dB), {DEFINITION_TITLE[definition]}"
    for key in results["settings"]["fixed_ratios"]:
        ratio = rate_quality.parse_ratio(key)
        fig, ax = plt.subplots(figsize=(7.5, 4.4))
        for name in _plot_order(results):
            snrs = sorted({float(s) for per_snr in results["results"][name].values() for s in per_snr})
            points = [(s, best_within(results, name, ratio, f"{s:g}")) for s in snrs]
            points = [(s, found[1]) for s, found in points if found]
            if points:
                style = "--" if name.endswith("_fixed") else "-"
                ax.plot(*zip(*points), style, marker="o", label=_label(results, name))
        if not ax.lines:
            plt.close(fig)
            continue
        ax.set_xlabel(axis)
        ax.set_ylabel("mIoU ↑")
        ax.set_title(f"bandwidth ratio at most {key}: each representation's best rate within it", fontsize=9)
        paths.append(save_line_plot(fig, ax, plot_dir / f"miou_vs_snr_ratio_{key.replace('/', '_')}.png", 6))
    for snr in _snr_keys(results):
        fig, ax = plt.subplots(figsize=(7.5, 4.4))
        for name in _plot_order(results):
            if name.endswith("_fixed"):
                continue
            points = sorted((point_ratio(results, name, rate, snr), miou(results, name, rate, snr))
                            for rate, per_snr in results["results"][name].items() if snr in per_snr)
            if points:
                ax.plot(*zip(*points), marker="o", label=_label(results, name))
        ratios = _ratios(results)
        best = frontier(results, ratios, snr)
        steps = [(r, best[r][2]) for r in ratios if best[r]]
        if steps:
            ax.plot(*zip(*steps), color="grey", linewidth=6, alpha=0.25, label="frontier (best within each ratio)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("bandwidth ratio (complex channel uses per source value, log scale)")
        ax.set_ylabel("mIoU ↑")
        ax.set_title(f"{snr} dB ({DEFINITION_TITLE[definition]})", fontsize=9)
        paths.append(save_line_plot(fig, ax, plot_dir / f"miou_vs_ratio_{snr}dB.png", 6))
    cliff = [(name, rate, per_snr) for name in ("separated_fixed", "digital_fixed")
             for rate, per_snr in results["results"].get(name, {}).items()]
    if cliff:
        fig, ax = plt.subplots(figsize=(7.5, 4.4))
        for name, rate, per_snr in cliff:
            points = sorted((float(s), entry["lost"]) for s, entry in per_snr.items())
            ax.plot(*zip(*points), "--" if name == "digital_fixed" else "-", marker="o", label=f"{name} {rate}")
        ax.set_xlabel(axis)
        ax.set_ylabel("share of images lost")
        ax.set_title(f"separated links with the scheme for {results['settings']['design_snr_db']:g} dB: the cliff",
                     fontsize=9)
        paths.append(save_line_plot(fig, ax, plot_dir / "cliff.png", 7))
    return paths


def plot_grid(results: dict[str, Any], grid: dict[str, Any], original: np.ndarray, path: Path) -> Path:
    """The grid scene at the design SNR: one row a representation, one column a ratio (its best rate within)."""
    snr = f"{results['settings']['design_snr_db']:g}"
    ratios = _ratios(results)
    rows = [n for n in _plot_order(results) if not n.endswith("_fixed")]
    fig, axes = plt.subplots(len(rows) + 1, len(ratios), figsize=(1.5 * len(ratios), 1.3 * (len(rows) + 1)),
                             squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    axes[0, 0].imshow(original)
    axes[0, 0].set_title("original", fontsize=6)
    for r, name in enumerate(rows, start=1):
        axes[r, 0].text(-0.1, 0.5, name, transform=axes[r, 0].transAxes, fontsize=6, ha="right", va="center")
        for c, ratio in enumerate(ratios):
            found = best_within(results, name, ratio, snr)
            image = grid.get(name, {}).get(found[0], {}).get(snr) if found else None
            if image is None:
                continue
            axes[r, c].imshow(image)
            axes[r, c].set_title(f"≤{rate_quality.ratio_text(ratio)}: {found[1]:.2f}", fontsize=6)
    fig.suptitle(f"{results['grid_scene']}, {snr} dB: best rate within each ratio (mean mIoU)", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --- the Markdown ----------------------------------------------------------------------------------
def render(results: dict[str, Any], link_base: Path, out_dir: Path, plots: list[Path], grid: Path) -> str:
    s = results["settings"]

    def link(path: Path) -> str:
        return os.path.relpath(path, link_base)

    lines = ["# The rate-quality frontier: mIoU against bandwidth ratio and SNR", ""]
    if results.get("summary"):
        lines += [" ".join(results["summary"].split()), ""]
    configurations = sum(len(per_snr) for part in ("results", "without_adapters")
                         for per_rate in results.get(part, {}).values() for per_snr in per_rate.values())
    lines += [f"Command ({s['wall_time_s'] / 60:.1f} min wall time, {s['torch_threads']} torch threads on {s['device']}"
              + (f"; {s['configurations_from_cache']} of the {configurations} configurations from the cache of earlier "
                 f"runs with the same settings; the recorded compute time of all {configurations}, cached or not, "
                 f"{s['recorded_compute_s'] / 60:.1f} min" if s["configurations_from_cache"] else "")
              + "):", "", "```sh", s["command"], "```", ""]
    lines += [
        "## Bandwidth ratio",
        "",
        _bandwidth_text(s),
        "",
        "## Settings",
        "",
        _resolution_text(s),
        f"- Generator `{s['model']['path']}` ({s['generator_resolution'][0]}x{s['generator_resolution'][1]}), sampler "
        f"`{s['sampler']}` with {s['steps']} steps, guidance {s['guidance']:g}, seed {s['seed']}: a small image "
        f"count and few steps, to fit a 2-core CPU. {_adapters_text(s)}",
        *_stage_lines(results),
        f"- SNR: {DEFINITION_TITLE[s['definition']]} — {DEFINITION_TEXT[s['definition']]}. "
        "`--definition paper_psnr` runs the paper's PSNR instead.",
        "- Channel: AWGN through `shared.semantic.channels.apply_channel`, the channel simulator's code, for every "
        "representation. Channel and sampling seeds depend on the image only.",
        "",
        "## Representations",
        "",
    ]
    for name, info in results["representations"].items():
        rates = ", ".join(rate + (" (adapter)" if rate_info.get("adapter") else "")
                          for rate, rate_info in info["rates"].items()) or "—"
        lines.append(f"- `{name}`: {info['label']}. Rates: {rates}."
                     + ("" if info["status"] == "ok" else f" **{info['status']}**")
                     + (" Sendable by the services (the sender's `budget` may pick it)." if info["sendable"] else ""))
    lines += ["", "Bits: what the representation's payload counts (for ours the codec's count: one bit a value of a "
              "0/1 map, 32 bits a value of a soft, downsampled map, the JPEG bytes of JPEG maps; all sent as "
              "analog symbols, so bits do not set the channel uses).",
              "", "Budget-driven representations are run at each ratio R and send within R·"
              f"{s['source_values']:,} channel uses; ours and the learned encoder take a measured ratio. A "
              "separated link sends the largest source option that fits with its scheme; a failed CRC or "
              "nothing that fits loses the image (a mid-grey image is scored). The scheme for the SNR is the "
              "highest spectral efficiency that decoded 8 random 4,000-bit payloads 1 dB below the SNR: "
              + ", ".join(f"{snr} dB: {name or 'none'}" for snr, name in sorted(results["link_adaptation"].items(),
                                                                               key=lambda kv: float(kv[0])))
              + ".", ""]
    lines += ["## Targets", ""]
    for check in results["acceptance"]:
        explanation = " ".join(check["explanation"].split()) if check.get("explanation") else None
        lines += [f"- **{check['status']}**: {check['check']}. Observed: {check['observed']}.",
                  f"  {'_' + explanation + '_' if explanation else EXPLANATION_SLOT}"]
    lines += _frontier_section(results) + _equal_uses_section(results) + _fine_tuning_section(results)
    lines += _default_section(results)
    lines += _tables_section(results) + _sizes_section(results)
    lines += ["", "## Plots", ""] + [f"![{p.stem}]({link(p)})" for p in plots]
    lines += ["", "## One scene", "", f"![grid]({link(grid)})", "",
              f"All numbers, with per-image values: [{link(out_dir / 'results.json')}]({link(out_dir / 'results.json')})."]
    if s.get("table"):
        lines += ["", f"The sender's table: `{s['table']}` (the sendable representations' mIoU per SNR)."]
    return "\n".join(lines) + "\n"


def _frontier_section(results: dict[str, Any]) -> list[str]:
    snrs = _snr_keys(results)
    lines = ["", "## The frontier: which representation wins where", "",
             "At each ratio and SNR, the best mIoU of any representation within that ratio.", "",
             "| ratio \\ SNR (dB) | " + " | ".join(snrs) + " |", "|---" * (len(snrs) + 1) + "|"]
    by_snr = {snr: frontier(results, _ratios(results), snr) for snr in snrs}
    for ratio in _ratios(results):
        cells = []
        for snr in snrs:
            best = by_snr[snr][ratio]
            cells.append("—" if best is None else f"{best[0]} {best[1]}: {best[2]:.3f}")
        lines.append(f"| {rate_quality.ratio_text(ratio)} | " + " | ".join(cells) + " |")
    return lines


def _equal_uses_section(results: dict[str, Any]) -> list[str]:
    names = _plot_order(results)
    lines = ["", "## Every representation at equal channel uses", "",
             "Each representation's best mIoU within the ratio (its rate in brackets); — where none of its rates fits."]
    for snr in _snr_keys(results):
        lines += ["", f"{snr} dB:", "", "| ratio | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for ratio in _ratios(results):
            cells = []
            for name in names:
                found = best_within(results, name, ratio, snr)
                cells.append("—" if found is None else f"{found[1]:.3f} ({found[0]})")
            lines.append(f"| {rate_quality.ratio_text(ratio)} | " + " | ".join(cells) + " |")
    return lines


def _bandwidth_text(s: dict[str, Any]) -> str:
    """The bandwidth ratio's definition, with its denominator at the evaluated resolution."""
    height, width = s["evaluated_resolution"]
    present = f"(the evaluated images have {s['present_classes']['mean']:.1f} present classes on average)"
    closing = ("A digital link's channel uses are its coded bits over the bits per QAM symbol. Every transmission "
               "record of the services reports the ratio (`bits.bandwidth_ratio`), and the evaluation's results carry "
               "it beside the channel uses.")
    map_height, map_width = _map_size(s)
    if (height, width) == (map_height, map_width):
        return (f"The bandwidth ratio of a transmission is its number of complex channel uses per real value of the "
                f"source, the {height}x{width} RGB image at the sender's map size: {s['source_values']:,} values. Two "
                "real symbols make one complex channel use (docs/snr-definitions.md). The analog image sends every "
                "value once: ratio 1/2. Ours sends C present-class maps of (H/f) x (W/f) values, f the downsampling "
                f"factor: ratio C / (6 f²), 2.0 at f = 1 with CamVid's 12 classes {present}. " + closing)
    times = height * width / (map_height * map_width)  # source values per map position, over 3
    return (f"The bandwidth ratio of a transmission is its number of complex channel uses per real value of the "
            f"source, the {height}x{width} RGB image at the evaluated resolution: {s['source_values']:,} values (the "
            f"sender's map size is {map_height}x{map_width}). Two real symbols make one complex channel use "
            "(docs/snr-definitions.md). The analog image sends every value of the evaluated image once: ratio 1/2. "
            f"Ours sends C present-class maps of ({map_height}/f) x ({map_width}/f) values, f the downsampling factor: "
            f"ratio C / ({6 * times:g} f²), {12 / (6 * times):g} at f = 1 with CamVid's 12 classes {present}. "
            "A digital link's channel uses are its coded bits over the bits per QAM symbol. The services' transmission "
            f"records (`bits.bandwidth_ratio`) and the sender's table count per value of the {map_height}x{map_width} "
            f"image at the map size instead: {times:g} times the ratios here.")


def _resolution_text(s: dict[str, Any]) -> str:
    """The evaluated resolution and the map size, and what the mIoU compares with."""
    height, width = s["evaluated_resolution"]
    map_height, map_width = _map_size(s)
    images = f"- {s['images']} of the {s['split_images']} CamVid {s['split']} images, evenly spread; "
    segmenter = (f"mIoU of the project's segmenter (`{s['segmenter']['path']}`, void excluded) on the received scene "
                 "against the ")
    real = f"The segmenter on the real images: {s['real_miou']['mean']:.3f}."
    if (height, width) == (map_height, map_width):
        return images + f"evaluated at {height}x{width}; " + segmenter + "sent label map. " + real
    return (images + f"evaluated at {height}x{width}: the images and the ground-truth label maps are the dataset's, "
            f"resized there (area and nearest neighbour); the label map that is sent is that map resized to the sender's "
            f"map size {map_height}x{map_width} (nearest neighbour), and the image baselines (digital, analog) send the "
            f"{height}x{width} image. " + segmenter + f"{height}x{width} ground truth. " + real)


# What each semantic representation's receiver gives the upscaling stage (receiver_service.model_host),
# by family (ours and ours_jpeg, separated and separated_fixed, learned).
STAGE_MAPS = {
    "ours": "ours and ours_jpeg the received maps after FDS at the sender's map size {map_height}x{map_width} (at "
            "factor f enlarged bilinearly from the ({map_height}/f) x ({map_width}/f) sent, as the receiver's views)",
    "separated": "the separated links the decoded label map as one-hot maps after FDS, at the size it was sent "
                 "({map_height}/f) x ({map_width}/f)",
    "learned": "the learned encoder the decoder's class probabilities, {generated} as it returns them",
}


def _stage_lines(results: dict[str, Any]) -> list[str]:
    """How the generated scenes reach the evaluated resolution: the upscaling stage with the maps each
    receiver has, or bicubic (no line at the map size without a stage, as before the options)."""
    s = results["settings"]
    if _at_map_size(s):
        return []
    height, width = s["evaluated_resolution"]
    generated = "x".join(str(v) for v in s["generator_resolution"])
    stage = s.get("upscaler")
    if stage is None:
        return [f"- Generated scenes ({generated}) are resized (bicubic) to {height}x{width} for the metrics, as the "
                "receiver does for its output size without an upscaling stage."]
    out_height, out_width = stage["output_resolution"]
    ran = {name.removesuffix("_jpeg").removesuffix("_fixed") for name, info in results["representations"].items()
           if info["kind"] == "semantic"}
    map_height, map_width = _map_size(s)
    given = "; ".join(text.format(map_height=map_height, map_width=map_width, generated=generated)
                      for name, text in STAGE_MAPS.items() if name in ran)
    text = (f"- Every generated scene ({generated}) is upscaled to {out_height}x{out_width} by the receiver's upscaling "
            f"stage `{stage['path']}` ({stage['name']}), conditioned on the maps that representation's receiver has, "
            f"as the receiver does" + (f": {given}" if given else ""))
    if (out_height, out_width) != (height, width):
        shrinking = height <= out_height and width <= out_width  # as shared.wire.imageio.resize_image chooses
        text += (f"; then resized ({'area' if shrinking else 'bicubic'}) to {height}x{width} for the metrics, as the "
                 "receiver does for its output size")
    return [text + ". The image baselines are not generated: the stage does not apply to them."]


def _adapters_text(settings: dict[str, Any]) -> str:
    """Which generator served ours at which factor."""
    size = "x".join(str(v) for v in settings["generator_resolution"])
    adapters = settings["fine_tuned_per_factor"]
    if not adapters:
        why = "" if settings["adapters"] else " (condition adapters turned off with `--no-adapters`)"
        return (f"The generator was not fine-tuned per downsampling factor{why}: it conditions on {size} maps "
                "resized from whatever arrives.")
    used = ", ".join(f"{rate} `{adapter['path']}` ({_steps_text(adapter)})" for rate, adapter in adapters.items())
    return (f"Ours is served as the services serve it: at {', '.join(adapters)} through the condition adapter of "
            "that factor (the generator's SPADE layers fine-tuned on the factor's received conditions, "
            f"`shared/semantic/diffusion/adapters.py`): {used}; at the other factors, and for the other "
            f"representations, through the base generator. Both condition on {size} maps resized from whatever "
            "arrives.")


def _steps_text(adapter: dict[str, Any]) -> str:
    if adapter["fine_tuning_steps"] is not None:
        return f"{adapter['fine_tuning_steps']:,} fine-tuning steps"
    return "steps not recorded" if adapter["steps"] is None else f"step {adapter['steps']:,}"


def _fine_tuning_section(results: dict[str, Any]) -> list[str]:
    """Each adapted rate of ours through the base generator alone and through its adapter."""
    base = results.get("without_adapters") or {}
    if not base:
        return []
    snrs = _snr_keys(results)
    lines = ["", "## What fine-tuning bought: the condition adapters", "",
             "mIoU of ours at each factor with an adapter, through the base generator alone → through the adapter "
             "(paired difference ± its standard error: the same images, channel realisations and sampling seeds).",
             "", "| setting | ratio | " + " | ".join(f"{snr} dB" for snr in snrs) + " |",
             "|---" * (len(snrs) + 2) + "|"]
    for name, per_rate in base.items():
        for rate, per_snr in per_rate.items():
            adapted = results["results"][name][rate]
            cells = []
            for snr in snrs:
                difference, stderr = paired_difference(adapted[snr]["per_image"]["miou"],
                                                       per_snr[snr]["per_image"]["miou"])
                cells.append(f"{per_snr[snr]['miou']['mean']:.3f} → {adapted[snr]['miou']['mean']:.3f} "
                             f"({difference:+.3f} ± {stderr:.3f})")
            ratio = float(np.mean([adapted[snr]["bandwidth_ratio"]["mean"] for snr in snrs]))
            lines.append(f"| {name} {rate} | {ratio:.4g} | " + " | ".join(cells) + " |")
    return lines


def _default_section(results: dict[str, Any]) -> list[str]:
    default = results.get("default")
    if not default:
        return []
    lines = ["", f"## The sender's default: ours' settings at {default['snr_db']:g} dB", "",
             "Each setting against factor 1 on the same images, channel realisations and sampling seeds "
             "(paired difference ± its standard error).", "",
             "| setting | bandwidth ratio | mIoU | difference to factor 1 |", "|---|---|---|---|"]
    for row in default["rows"]:
        lines.append(f"| {row['representation']} {row['rate']} | {row['bandwidth_ratio']:.4g} | {row['miou']:.3f} | "
                     f"{row['difference']:+.3f} ± {row['difference_stderr']:.3f} |")
    chosen = default["chosen"]
    lines += ["", f"The cheapest setting within {default['tolerance_miou']} mIoU of factor 1: **{chosen['representation']} "
              f"{chosen['rate']}** (downsample_factor {chosen['downsample_factor']}, compression "
              f"{chosen['compression']}), bandwidth ratio {chosen['bandwidth_ratio']:.4g}."]
    return lines


def _tables_section(results: dict[str, Any]) -> list[str]:
    lines = ["", "## All configurations", "",
             "mIoU mean ± standard deviation over the images; ratio and bits: the measured means, lowest–highest over "
             "the SNRs when they differ (a budget-driven row's rate is its budget, which it never exceeds; an image "
             "not sent counts 0); lost: share of images lost by a separated link."]
    for name in _plot_order(results):
        per_rate = results["results"][name]
        snrs = sorted({s for per_snr in per_rate.values() for s in per_snr}, key=float)
        lines += ["", f"`{name}`: {_label(results, name)}", "",
                  "| rate | ratio | bits | " + " | ".join(f"{s} dB" for s in snrs) + " |",
                  "|---" * (len(snrs) + 3) + "|"]
        for rate, per_snr in per_rate.items():
            cells = []
            for snr in snrs:
                entry = per_snr.get(snr)
                if entry is None:
                    cells.append("—")
                    continue
                cell = f"{entry['miou']['mean']:.3f} ± {entry['miou']['std']:.3f}"
                if "lost" in entry:
                    cell += f" (lost {entry['lost']:.2f})"
                cells.append(cell)
            ratios = [e["bandwidth_ratio"]["mean"] for e in per_snr.values()]
            bits = [e["payload_bits"]["mean"] for e in per_snr.values() if "payload_bits" in e]
            lines.append(f"| {rate} | {_span(ratios, '{:.4g}')} | {_span(bits, '{:,.0f}') if bits else '—'} | "
                         + " | ".join(cells) + " |")
    return lines


def _span(values: list[float], form: str) -> str:
    """One value, or "low–high" when the SNRs differ (a separated link's scheme changes with the SNR)."""
    low, high = min(values), max(values)
    return form.format(low) if math.isclose(low, high) else f"{form.format(low)}–{form.format(high)}"


def _sizes_section(results: dict[str, Any]) -> list[str]:
    sizes = results.get("sizes") or {}
    if not sizes:
        return []
    lines = ["", "## Source options of the separated links (bits per image)", "", "| option | bits |", "|---|---|"]
    for name, summary in sorted(sizes.items(), key=lambda kv: -kv[1]["mean"]):
        lines.append(f"| {name} | {summary['mean']:,.0f} ± {summary['std']:,.0f} |")
    return lines
