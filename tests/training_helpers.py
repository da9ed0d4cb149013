"""Training test helpers: a tiny CamVid-shaped dataset written by the test, and the flags and log
of a tiny diffusion training run on it."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np


def fake_camvid(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 2)):
        for i in range(n):
            (root / split / "images").mkdir(parents=True, exist_ok=True)
            (root / split / "labels").mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(root / split / "images" / f"{i}.png"), rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
            labels = np.kron(rng.integers(0, 12, (4, 4)), np.ones((8, 8), dtype=np.int64)).astype(np.uint8)
            cv2.imwrite(str(root / split / "labels" / f"{i}.png"), labels)
    return root


def train_args(tmp_path: Path, out: str, *extra: str) -> list[str]:
    return [
        "--data-root", str(fake_camvid(tmp_path / "camvid")), "--out-dir", str(tmp_path / out),
        "--export-path", str(tmp_path / out / "export.pt"), "--image-height", "16", "--image-width", "16",
        "--link-height", "32", "--link-width", "32", "--model-channels", "8", "--spade-hidden", "8",
        "--batch-size", "4", "--log-every", "1", "--eval-every", "2", "--sample-every", "1000", "--device", "cpu", *extra,
    ]  # fmt: skip


def train_log(tmp_path: Path, out: str) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / out / "log.jsonl").read_text().splitlines()]
