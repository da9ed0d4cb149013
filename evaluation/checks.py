"""The acceptance checks (the paper's claims, restated for this link) evaluated on a run's results, and the notes that explain them.

Each check is PASS, FAIL or NOT EVALUATED with the numbers it observed. Whoever ran the evaluation
explains the outcome in a TOML notes file (`--notes`): an explanation is kept only while its check
still observes the text it was written for, so a rerun never prints a stale one.
"""
from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import Any

from evaluation.schema import DEFINITION_TITLE


def acceptance_checks(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The acceptance checks, evaluated on this run, each PASS, FAIL or NOT EVALUATED."""
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


def _metric(results: dict[str, Any], definition: str, name: str, snr: str, key: str = "miou") -> float | None:
    entry = results["results"].get(definition, {}).get(name, {}).get(snr, {}).get(key)
    if isinstance(entry, dict):
        value = entry.get("mean")
        return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)
    return None if entry is None or isinstance(entry, str) else float(entry)


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
