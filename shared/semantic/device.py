"""Device selection shared by training, evaluation and the services."""
from __future__ import annotations

import torch


def select_device(preference: str = "auto") -> torch.device:
    """Return the torch device for `preference` ("auto", "cpu" or "cuda").

    "auto" takes CUDA when a GPU is visible and the CPU otherwise, so the same code runs on a
    laptop and on a GPU server without a CUDA-only path.
    """
    if preference not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', not {preference!r}")
    if preference == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but no CUDA device is available")
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(preference)
