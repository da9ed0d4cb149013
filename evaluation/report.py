"""What an evaluation run writes: results.json, the report (results.md or --report), plots/*.png and grid*.png.

It puts the checks (`evaluation.checks`), the Markdown (`evaluation.markdown`) and the figures
(`evaluation.plots`) together over one run's results.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from evaluation import markdown
from evaluation.checks import acceptance_checks, apply_notes
from evaluation.plots import plot_grids, plot_metrics


def write_all(results: dict[str, Any], out_dir: Path, report_path: Path | None = None,
              notes: dict[str, Any] | None = None) -> list[Path]:
    """Write every output; returns the paths written. The report is written once: at `report_path`
    when given (its links relative to it), else as results.md beside the JSON."""
    out_dir.mkdir(parents=True, exist_ok=True)
    grid = results.pop("grid")
    results["grid_scene"] = grid["scene"]
    results["acceptance"] = acceptance_checks(results)
    apply_notes(results, notes)
    plots = plot_metrics(results, out_dir / "plots")
    grids = plot_grids(results, grid, out_dir)
    json_path = out_dir / "results.json"
    json_path.write_text(json.dumps(jsonable(results), indent=1, ensure_ascii=False) + "\n")
    md_path = report_path or out_dir / "results.md"
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(markdown.render(results, md_path.parent, out_dir, plots, grids))
    return [json_path, md_path, *plots, *grids]


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
