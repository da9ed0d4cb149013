"""The `budget` of a transmission: the map coding with the best expected mIoU within a channel-use budget.

The client gives a budget in complex channel uses (`3072`) or as a bandwidth ratio (`1/12`,
`0.083`: uses per value of the H x W x 3 source at the map size). The sender encodes the label map
at every setting of the rate-quality table (`GESCO_SENDER_RATE_QUALITY_TABLE`, written by
`python -m evaluation.rate_quality`, docs/rate-quality.md), keeps those within the budget and takes
the cheapest whose expected mIoU at the requested SNR (converted to the table's average-power SNR
with each setting's own map scale) is within the table's tolerance of the best
(`shared.semantic.rate_quality.choose`). The table holds only what the services can send: ours at
its downsampling factors, with and without JPEG maps. Too small a budget is a 400 naming `budget`
and the smallest budget that works for this image.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sender_service.settings import SenderSettings
from shared.paths import REPO_ROOT
from shared.semantic import codec
from shared.semantic.rate_quality import (
    Candidate,
    RateQualityTable,
    average_power_snr_db,
    bandwidth_ratio,
    channel_uses,
    choose,
    parse_budget,
    ratio_text,
)


class BudgetError(ValueError):
    """The budget cannot be met or read; `status_code` is the HTTP status (400 or 422)."""

    def __init__(self, message: str, status_code: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code


class TableUnavailableError(RuntimeError):
    """The sender has no usable rate-quality table, so it cannot honour a budget."""


@dataclass(frozen=True)
class BudgetRequest:
    """A client's budget with the SNR it is for; `codec_given`: the client also chose the coding."""

    text: str
    snr_db: float
    snr_definition: str
    codec_given: bool = False


@dataclass(frozen=True)
class BudgetChoice:
    """The coding the budget picked, its encoded maps and the record the client is told."""

    config: codec.CodecConfig
    encoded: codec.EncodedMaps
    record: dict[str, Any]


def choose_coding(labels: np.ndarray, request: BudgetRequest, settings: SenderSettings) -> BudgetChoice:
    """Encode `labels` at every table setting and pick one within the budget (BudgetError, or
    TableUnavailableError when the table is missing or broken)."""
    if request.codec_given:
        raise BudgetError("budget picks downsample_factor, compression and jpeg_quality: send either budget or "
                          "those fields", status_code=422)
    try:
        budget = parse_budget(request.text)
    except ValueError as error:
        raise BudgetError(str(error), status_code=422) from None
    table = load_table(settings.rate_quality_table)
    height, width = labels.shape
    budget_uses = budget.uses_for(height, width)
    encodings: list[tuple[Candidate, codec.CodecConfig, codec.EncodedMaps]] = []
    for entry in table.entries:
        if height % entry.downsample_factor or width % entry.downsample_factor:
            continue
        config = codec.CodecConfig(num_classes=settings.num_classes, downsample_factor=entry.downsample_factor,
                                   compression=codec.Compression(entry.compression), jpeg_quality=entry.jpeg_quality)
        encoded = codec.encode_label_map(labels, config)
        uses = channel_uses(encoded.header.num_symbols)
        snr = average_power_snr_db(request.snr_db, request.snr_definition, encoded.header.scale)
        candidate = Candidate(entry, uses, bandwidth_ratio(uses, height, width), snr, table.expected_miou(entry, snr))
        encodings.append((candidate, config, encoded))
    candidates = [candidate for candidate, _, _ in encodings]
    if not candidates:
        raise TableUnavailableError(f"no setting of the rate-quality table {table.path} fits the {height}x{width} maps")
    chosen = choose(candidates, budget_uses, table.tolerance_miou)
    if chosen is None:
        smallest = min(candidates, key=lambda c: c.channel_uses)
        raise BudgetError(
            f"budget {budget.text} ({budget_uses} complex channel uses, ratio "
            f"{ratio_text(bandwidth_ratio(budget_uses, height, width))}) "
            f"is too small for any representation of this image; the smallest that works is {smallest.channel_uses} "
            f"channel uses (ratio {ratio_text(smallest.bandwidth_ratio)}: {smallest.entry.name})")
    _, config, encoded = next(e for e in encodings if e[0] is chosen)
    record = {
        "requested": budget.text,
        "channel_uses": budget_uses,
        "bandwidth_ratio": bandwidth_ratio(budget_uses, height, width),
        "table": table.path,
        "table_made_by": table.made_by,
        "chosen": _describe(chosen),
        "candidates": [_describe(c) | {"fits": c.channel_uses <= budget_uses} for c in candidates],
    }
    return BudgetChoice(config=config, encoded=encoded, record=record)


def _describe(candidate: Candidate) -> dict[str, Any]:
    entry = candidate.entry
    return {"representation": entry.representation, "downsample_factor": entry.downsample_factor,
            "compression": entry.compression, "jpeg_quality": entry.jpeg_quality,
            "channel_uses": candidate.channel_uses, "bandwidth_ratio": candidate.bandwidth_ratio,
            "snr_db_average_power": round(candidate.snr_db_average_power, 3),
            "expected_miou": round(candidate.expected_miou, 4)}


def load_table(path: Path) -> RateQualityTable:
    """The table at `path`, read again only when the file changes."""
    try:
        stat = path.stat()
    except OSError:
        raise TableUnavailableError(f"the rate-quality table {_shown(path)} is missing, so budgets cannot be "
                                    "honoured: make it with `python -m evaluation.rate_quality`") from None
    try:
        return _read_table(path, stat.st_mtime_ns, stat.st_size)
    except ValueError as error:
        raise TableUnavailableError(str(error)) from None


@functools.lru_cache(maxsize=4)
def _read_table(path: Path, mtime_ns: int, size: int) -> RateQualityTable:
    return RateQualityTable.load(path, shown_as=_shown(path))


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)
