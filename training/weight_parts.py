"""Training weights written as numbered parts of at most 16 MiB, and read back in one piece.

A GPU training call hands back its weights as files of bounded size, so a run that outgrows one
call continues in the next from what the last one returned. The payload (a dict of tensors and
plain values) is serialised once with `torch.save`; its bytes are cut into parts
`<name>.partNN`, and `<name>.json` lists every part's size and SHA-256 and the whole payload's.
Reading checks all of them, so a missing, truncated or mixed-up part fails loudly instead of
loading wrong weights.
"""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import torch

MAX_PART_BYTES = 16 * 2**20
MANIFEST_VERSION = 1


def save_parts(payload: dict[str, Any], folder: str | Path, name: str = "weights",
               part_bytes: int = MAX_PART_BYTES) -> list[Path]:
    """Write `payload` as `<folder>/<name>.partNN` files of at most `part_bytes` and the manifest
    `<name>.json` (written last, so a folder with a manifest holds complete parts). Old parts of
    the same name are removed first. Returns the part paths."""
    if not 0 < part_bytes <= MAX_PART_BYTES:
        raise ValueError(f"part_bytes must be in 1..{MAX_PART_BYTES}, not {part_bytes}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for old in [folder / f"{name}.json", *folder.glob(f"{name}.part*")]:
        old.unlink(missing_ok=True)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    count = max(1, -(-len(data) // part_bytes))
    if count > 100:
        raise ValueError(f"{len(data)} bytes would need {count} parts; at most 100 are numbered")
    parts, entries = [], []
    for i in range(count):
        chunk = data[i * part_bytes : (i + 1) * part_bytes]
        path = folder / f"{name}.part{i:02d}"
        path.write_bytes(chunk)
        parts.append(path)
        entries.append({"file": path.name, "bytes": len(chunk), "sha256": hashlib.sha256(chunk).hexdigest()})
    manifest = {"version": MANIFEST_VERSION, "total_bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                "parts": entries}
    (folder / f"{name}.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return parts


def has_parts(folder: str | Path, name: str = "weights") -> bool:
    return (Path(folder) / f"{name}.json").is_file()


def load_parts(folder: str | Path, name: str = "weights", map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Reassemble and verify the parts written by `save_parts`; tensors land on `map_location`."""
    folder = Path(folder)
    manifest_path = folder / f"{name}.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"no parts manifest {manifest_path}")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("version") != MANIFEST_VERSION:
        raise ValueError(f"{manifest_path} has manifest version {manifest.get('version')!r}, expected {MANIFEST_VERSION}")
    chunks = []
    for entry in manifest["parts"]:
        path = folder / entry["file"]
        if not path.is_file():
            raise FileNotFoundError(f"part {path} listed in {manifest_path} is missing")
        chunk = path.read_bytes()
        if len(chunk) != entry["bytes"] or hashlib.sha256(chunk).hexdigest() != entry["sha256"]:
            raise ValueError(f"part {path} does not match {manifest_path} (size or SHA-256 differs)")
        chunks.append(chunk)
    data = b"".join(chunks)
    if len(data) != manifest["total_bytes"] or hashlib.sha256(data).hexdigest() != manifest["sha256"]:
        raise ValueError(f"the parts in {folder} do not add up to the payload {manifest_path} describes")
    return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
