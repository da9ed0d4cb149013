"""One file format for every shipped model: kind, config, fp16 weights and a free-form meta dict.

Shipped files hold only what inference needs (EMA weights, no optimiser state), so they stay small
and load on any device.
"""
from __future__ import annotations

import dataclasses
import hashlib
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


def weights_fingerprint(state_dict: dict[str, torch.Tensor], exclude: frozenset[str] = frozenset()) -> str:
    """SHA-256 of the fp16 bytes of every weight but those in `exclude`, in name order: what ties
    a model derived from another (an adapter, a distilled student) to the weights it was made from.

    fp16 because shipped checkpoints hold fp16: a model loaded from its file and the same weights
    held in fp32 by a trainer give one fingerprint. Zeros are hashed as +0: an EMA update turns a
    -0 weight into +0 without changing it."""
    digest = hashlib.sha256()
    for name, tensor in sorted(state_dict.items()):
        if name in exclude:
            continue
        if tensor.is_floating_point():
            tensor = tensor.detach().to("cpu", torch.float16) + 0.0  # -0 + 0 is +0
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def beside_by_factor(checkpoint: str | Path, suffix: str) -> dict[int, Path]:
    """The files <stem>.f<factor>.<suffix> beside `checkpoint` (its condition adapters, its
    students), by downsample factor > 1, in factor order."""
    checkpoint = Path(checkpoint)
    found = {}
    for path in checkpoint.parent.glob(f"{checkpoint.stem}.f*.{suffix}"):
        factor = path.name[len(checkpoint.stem) + 2:-len(f".{suffix}")]
        if factor.isdigit() and int(factor) > 1:
            found[int(factor)] = path
    return dict(sorted(found.items()))
