"""One file format for every shipped model: kind, config, fp16 weights and a free-form meta dict.

Shipped files hold only what inference needs (EMA weights, no optimiser state), so they stay small
and load on any device.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 1


def save_checkpoint(
    path: str | Path,
    kind: str,
    config: Any,
    state_dict: dict[str, torch.Tensor],
    meta: dict[str, Any] | None = None,
    half: bool = True,
) -> None:
    """Write weights (fp16 when `half`) with the dataclass `config` that rebuilds the network."""
    weights = {
        name: (t.detach().to("cpu").half() if half and t.is_floating_point() else t.detach().to("cpu"))
        for name, t in state_dict.items()
    }
    payload = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "config": dataclasses.asdict(config),
        "state_dict": weights,
        "meta": meta or {},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def load_checkpoint(path: str | Path, expected_kind: str) -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint`, refusing files of another kind."""
    payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    if payload.get("kind") != expected_kind:
        raise ValueError(f"{path} holds a {payload.get('kind')!r} checkpoint, expected {expected_kind!r}")
    payload["state_dict"] = {
        name: (t.float() if t.is_floating_point() else t) for name, t in payload["state_dict"].items()
    }
    return payload
