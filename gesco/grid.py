"""The PNG grid of `gesco sweep`: one row per SNR, one column per stage, labelled."""
from __future__ import annotations

import base64
from dataclasses import dataclass

import cv2
import numpy as np

CELL_HEIGHT, CELL_WIDTH = 144, 192
LABEL_WIDTH = 150
HEADER_HEIGHT = 28
GAP = 4
COLUMNS = ("label map sent", "received (noisy)", "after FDS", "generated", "analog (pixels)")
BACKGROUND = 255
INK = (30, 35, 48)


@dataclass(frozen=True)
class SweepRow:
    """PNG bytes of each stage at one SNR."""

    snr_db: float
    measured_snr_db: float
    received: bytes
    fds: bytes
    generated: bytes
    analog: bytes


def data_url_bytes(url: str) -> bytes:
    """The bytes of a base64 `data:` URL, as the sender's preview and analog answers carry PNGs."""
    _, _, payload = url.partition("base64,")
    return base64.b64decode(payload)


def sweep_grid(segmentation: bytes, rows: list[SweepRow]) -> bytes:
    """The grid as PNG bytes: a header row of stage names, then the stages of each SNR."""
    width = LABEL_WIDTH + len(COLUMNS) * (CELL_WIDTH + GAP)
    height = HEADER_HEIGHT + len(rows) * (CELL_HEIGHT + GAP)
    canvas = np.full((height, width, 3), BACKGROUND, dtype=np.uint8)
    for column, title in enumerate(COLUMNS):
        _text(canvas, title, LABEL_WIDTH + column * (CELL_WIDTH + GAP) + 4, HEADER_HEIGHT - 9)
    for index, row in enumerate(rows):
        top = HEADER_HEIGHT + index * (CELL_HEIGHT + GAP)
        _text(canvas, f"{row.snr_db:g} dB", 8, top + CELL_HEIGHT // 2 - 4, scale=0.6)
        _text(canvas, f"measured {row.measured_snr_db:.1f}", 8, top + CELL_HEIGHT // 2 + 18)
        cells = (segmentation, row.received, row.fds, row.generated, row.analog)
        for column, (png, is_map) in enumerate(zip(cells, (True, True, True, False, False))):
            left = LABEL_WIDTH + column * (CELL_WIDTH + GAP)
            canvas[top:top + CELL_HEIGHT, left:left + CELL_WIDTH] = _cell(png, is_map)
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError("PNG encoding of the grid failed")
    return encoded.tobytes()


def _cell(png: bytes, is_map: bool) -> np.ndarray:
    """One picture scaled to the cell: maps with nearest neighbour (crisp classes), images bicubic."""
    bgr = cv2.imdecode(np.frombuffer(png, dtype=np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError("a stage picture is not a decodable image")
    interpolation = cv2.INTER_NEAREST if is_map else cv2.INTER_CUBIC
    return cv2.cvtColor(cv2.resize(bgr, (CELL_WIDTH, CELL_HEIGHT), interpolation=interpolation), cv2.COLOR_BGR2RGB)


def _text(canvas: np.ndarray, text: str, x: int, y: int, scale: float = 0.45) -> None:
    cv2.putText(canvas, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, INK, 1, cv2.LINE_AA)
