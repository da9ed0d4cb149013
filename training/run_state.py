"""A training run's files written whole or not at all: an interrupted write (a stopped session,
SIGKILL) leaves the previous state, which the trainers resume from."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def save_atomically(payload: Any, path: Path) -> None:
    """torch.save to a temporary file beside `path`, then rename it over `path`."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
