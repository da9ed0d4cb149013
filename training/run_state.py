"""A training run's files: its state written whole or not at all (an interrupted write, from a
stopped session or SIGKILL, leaves the previous state, which the trainers resume from), and its
JSON log."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


def save_atomically(payload: Any, path: Path) -> None:
    """torch.save to a temporary file beside `path`, then rename it over `path`."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def log_record(folder: Path, record: dict[str, Any]) -> None:
    """Print one JSON log line and append it to <folder>/log.jsonl (the run's curve, kept across calls)."""
    line = json.dumps(record)
    print(line, flush=True)
    with open(folder / "log.jsonl", "a") as f:
        f.write(line + "\n")
