"""Scores of finished configurations on disk, so that an interrupted evaluation resumes.

A full run generates thousands of images on a CPU over hours. Each (definition, method, SNR)
configuration is stored under a key that covers everything its numbers depend on: the shared
`base` settings (data, images, seed, sampling, metric networks), the configuration itself, the
model file (size and modification time) and CACHE_VERSION, which changes with the code's output.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

CACHE_VERSION = 1


def file_stamp(path: str | None) -> list[Any] | None:
    """Identifies a file's content cheaply: resolved path, size and modification time."""
    if not path or not Path(path).is_file():
        return None
    resolved = Path(path).resolve()
    stat = resolved.stat()
    return [str(resolved), stat.st_size, stat.st_mtime_ns]


class ConfigCache:
    """JSON scores and the grid image of each configuration; `directory=None` disables it."""

    def __init__(self, directory: Path | None, base: dict[str, Any]) -> None:
        self.directory = directory
        self.base = {"version": CACHE_VERSION, **base}
        self.hits = 0

    def _paths(self, key: dict[str, Any]) -> tuple[Path, Path] | None:
        """(scores, grid image) files of a configuration."""
        if self.directory is None:
            return None
        digest = hashlib.sha256(json.dumps({**self.base, **key}, sort_keys=True).encode()).hexdigest()[:24]
        stem = "_".join(str(key[k]) for k in ("definition", "method", "snr") if k in key) + f"_{digest}"
        return self.directory / f"{stem}.json", self.directory / f"{stem}.npy"

    def load(self, key: dict[str, Any]) -> tuple[dict[str, Any], np.ndarray] | None:
        paths = self._paths(key)
        if paths is None or not all(p.is_file() for p in paths):
            return None
        self.hits += 1
        return json.loads(paths[0].read_text()), np.load(paths[1])

    def save(self, key: dict[str, Any], scores: dict[str, Any], grid_image: np.ndarray) -> None:
        paths = self._paths(key)
        if paths is None:
            return
        scores_path, image_path = paths
        scores_path.parent.mkdir(parents=True, exist_ok=True)
        np.save(image_path, grid_image)
        tmp = scores_path.parent / (scores_path.name + ".tmp")
        tmp.write_text(json.dumps(scores, default=lambda value: value.item()))  # inf and NaN round-trip
        tmp.replace(scores_path)  # written last: a configuration counts once its scores are complete
