"""The `budget` of a transmission: the representation with the best expected mIoU within a channel-use budget.

The client gives a budget in complex channel uses (`3072`) or as a bandwidth ratio (`1/12`,
`0.083`: uses per value of the H x W x 3 source at the map size). The sender codes the label map
at every setting of the rate-quality table (`GESCO_SENDER_RATE_QUALITY_TABLE`, written by
`python -m evaluation.rate_quality`, docs/rate-quality.md) that the request's link allows, keeps
those within the budget and takes the cheapest whose expected mIoU at the requested SNR (converted
to the table's average-power SNR with each setting's own map scale) is within the table's tolerance
of the best (`shared.semantic.rate_quality.choose`). The table holds what the services can send:
the maps link at its factors with and without JPEG maps, the digital link's label map at each
factor (its channel uses counted here, per image, at the scheme for the SNR) and each learned map
encoder. `link=auto` lets every link compete; an explicit link only its own settings. Too small a
budget is a 400 naming `budget` and the smallest budget that works for this image.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gesco.options import Link
from sender_service.link_coding import (
    LinkEncoding,
    average_power_snr,
    choose_scheme,
    encode_digital,
    encode_learned,
    encode_maps,
    map_encoder_symbols,
    map_encoders,
)
from sender_service.settings import SenderSettings
from shared.paths import REPO_ROOT
from shared.semantic import codec
from shared.semantic.digital_link import code_layout, label_option
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
    """A client's budget with the SNR and link it is for; `codec_given`: the client also chose the coding."""

    text: str
    snr_db: float
    snr_definition: str
    link: Link = Link.MAPS
    codec_given: bool = False
    scheme: str | None = None  # the digital link's scheme, when the client fixed it


@dataclass(frozen=True)
class BudgetChoice:
    """What the budget picked, its encoding and the record the client is told."""

    encoding: LinkEncoding
    record: dict[str, Any]


def choose_coding(labels: np.ndarray, request: BudgetRequest, settings: SenderSettings) -> BudgetChoice:
    """Code `labels` at every table setting of the request's link (all of them for auto) and pick
    one within the budget (BudgetError, or TableUnavailableError when the table is missing, broken
    or holds nothing for the link)."""
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
    links = {Link.MAPS, Link.DIGITAL, Link.LEARNED} if request.link is Link.AUTO else {request.link}
    reference_snr = average_power_snr(labels, settings.num_classes, request.snr_db, request.snr_definition)
    scheme = None
    if Link.DIGITAL in links:
        try:
            scheme = choose_scheme(table, reference_snr, request.scheme)
        except ValueError as error:
            raise BudgetError(str(error), status_code=422) from None
    encoders = map_encoders(settings.map_encoders_dir)
    options: list[tuple[Candidate, Callable[[], LinkEncoding]]] = []
    for entry in table.entries:
        if entry.link not in links or height % entry.downsample_factor or width % entry.downsample_factor:
            continue
        if entry.link is Link.MAPS:
            config = codec.CodecConfig(num_classes=settings.num_classes, downsample_factor=entry.downsample_factor,
                                       compression=codec.Compression(entry.compression),
                                       jpeg_quality=entry.jpeg_quality)
            encoding = encode_maps(labels, config)
            uses, snr = channel_uses(encoding.semantic.num_symbols), average_power_snr_db(
                request.snr_db, request.snr_definition, encoding.semantic.scale)
            make: Callable[[], LinkEncoding] = lambda e=encoding: e  # noqa: E731
        elif entry.link is Link.DIGITAL:
            assert scheme is not None
            option = label_option(labels, entry.downsample_factor, settings.num_classes)
            layout = code_layout(option.bits, scheme.mcs)
            uses, snr = layout.channel_uses, reference_snr
            make = lambda o=option, lay=layout: encode_digital(labels, o, lay, settings.num_classes)  # noqa: E731
        else:
            path = encoders.get(entry.model or "")
            if path is None:
                continue
            uses, snr = channel_uses(map_encoder_symbols(path)), reference_snr
            make = lambda p=path: encode_learned(labels, p, settings.num_classes)  # noqa: E731
        candidate = Candidate(entry, uses, bandwidth_ratio(uses, height, width), snr, table.expected_miou(entry, snr))
        options.append((candidate, make))
    candidates = [candidate for candidate, _ in options]
    if not candidates:
        raise TableUnavailableError(f"no setting of the rate-quality table {table.path} for the link "
                                    f"{request.link.value} fits the {height}x{width} maps")
    chosen = choose(candidates, budget_uses, table.tolerance_miou)
    if chosen is None:
        smallest = min(candidates, key=lambda c: c.channel_uses)
        raise BudgetError(
            f"budget {budget.text} ({budget_uses} complex channel uses, ratio "
            f"{ratio_text(bandwidth_ratio(budget_uses, height, width))}) "
            f"is too small for any representation of this image; the smallest that works is {smallest.channel_uses} "
            f"channel uses (ratio {ratio_text(smallest.bandwidth_ratio)}: {smallest.entry.name})")
    try:
        encoding = next(make for c, make in options if c is chosen)()
    except ValueError as error:  # a map encoder for another map size or class count
        raise BudgetError(str(error), status_code=422) from None
    fitting = [c for c in candidates if c.channel_uses <= budget_uses]
    best = max(fitting, key=lambda c: c.expected_miou)
    why = (f"{chosen.entry.name}: expected mIoU {chosen.expected_miou:.3f} at an average-power SNR of "
           f"{chosen.snr_db_average_power:.2f} dB in {chosen.channel_uses} channel uses, the cheapest of the "
           f"{len(fitting)} settings within the budget whose expected mIoU is within {table.tolerance_miou:g} of "
           f"the best ({best.entry.name}: {best.expected_miou:.3f})")
    record = {
        "requested": budget.text,
        "link": request.link.value,
        "channel_uses": budget_uses,
        "bandwidth_ratio": bandwidth_ratio(budget_uses, height, width),
        "table": table.path,
        "table_made_by": table.made_by,
        "chosen": _describe(chosen),
        "why": why,
        "candidates": [_describe(c) | {"fits": c.channel_uses <= budget_uses} for c in candidates],
    }
    if scheme is not None:
        record["scheme"] = {"name": scheme.mcs.name if scheme.mcs else None, "why": scheme.why}
    return BudgetChoice(encoding=encoding, record=record)


def _describe(candidate: Candidate) -> dict[str, Any]:
    entry = candidate.entry
    return {"representation": entry.representation, "link": entry.link.value, "model": entry.model,
            "downsample_factor": entry.downsample_factor,
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
