"""Bandwidth ratio, channel-use budgets and the rate-quality table the sender chooses from.

The bandwidth ratio (the deep-JSCC literature's convention) is the number of complex channel uses
a transmission takes per real source value, the source being the H x W x 3 RGB image at the
sender's map size: 96x128x3 = 36,864 values by default. The analog image sends one real symbol a
value, two a channel use: ratio 1/2. Ours sends C present-class maps of (H/f) x (W/f) values:
ratio C / (6 f^2), 2.0 for CamVid's 12 classes at factor 1 (docs/rate-quality.md).

The table (`models/rate-quality-table.json`, written by `python -m evaluation.rate_quality`) holds
the measured mIoU of every setting the sender can send at a few average-power SNRs (the maps link
at each downsampling factor and map compression, the digital link's label map at each factor,
each learned map encoder) and the link adaptation measured (the digital scheme per SNR). With a budget, the sender encodes the label map at each setting, keeps
those within the budget and takes the cheapest whose expected mIoU at the requested SNR is within
the table's tolerance of the best (`choose`). Numpy-free: the torch-free sender imports it.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gesco.options import Link, SnrDefinition

SOURCE_CHANNELS = 3  # RGB
TABLE_VERSION = 1
TABLE_SNR_DEFINITION = SnrDefinition.AVERAGE_POWER.value
# A ratio is a fraction ("1/12") or a decimal number ("0.083"); a plain integer counts channel uses.
_RATIO_PATTERN = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*/\s*(\d+(?:\.\d*)?|\.\d+)\s*$")
_DECIMAL_PATTERN = re.compile(r"^\s*(\d*\.\d+|\d+\.\d*)\s*$")
_INTEGER_PATTERN = re.compile(r"^\s*\d+\s*$")
# The link each representation of the table is sent by.
REPRESENTATION_LINKS = {"ours": Link.MAPS, "ours_jpeg": Link.MAPS, "separated": Link.DIGITAL, "learned": Link.LEARNED}
MAX_BUDGET_RATIO = 100.0
MAX_BUDGET_CHANNEL_USES = 10**12


def source_values(height: int, width: int) -> int:
    """Real values of the source: the H x W RGB image at the sender's map size."""
    if height < 1 or width < 1:
        raise ValueError(f"the source size must be positive, not {height}x{width}")
    return height * width * SOURCE_CHANNELS


def channel_uses(num_real_symbols: int) -> int:
    """Complex channel uses of `num_real_symbols` real symbols, paired two a use (odd: one zero added)."""
    if num_real_symbols < 0:
        raise ValueError(f"the number of symbols must be >= 0, not {num_real_symbols}")
    return -(-num_real_symbols // 2)


def bandwidth_ratio(num_channel_uses: int, height: int, width: int) -> float:
    """Complex channel uses per real source value of an H x W RGB image."""
    return num_channel_uses / source_values(height, width)


def ratio_text(ratio: float) -> str:
    """"1/12" for a ratio below 1 whose inverse is an integer, else the number ("2", "0.3")."""
    inverse = 1 / ratio
    if ratio < 1 and abs(inverse - round(inverse)) < 1e-9:
        return f"1/{round(inverse)}"
    return f"{ratio:g}"


def parse_ratio(text: str) -> float:
    """A positive bandwidth ratio written as a fraction ("1/12") or a number ("0.5", "2")."""
    if fraction := _RATIO_PATTERN.match(text):
        numerator, denominator = float(fraction.group(1)), float(fraction.group(2))
        if denominator == 0:
            raise ValueError(f"the ratio {text.strip()!r} divides by zero")
        ratio = numerator / denominator
    elif _DECIMAL_PATTERN.match(text) or _INTEGER_PATTERN.match(text):
        ratio = float(text)
    else:
        raise ValueError(f"a ratio is a fraction such as 1/12 or a number such as 0.083, not {text.strip()[:40]!r}")
    if not 0 < ratio <= MAX_BUDGET_RATIO:
        raise ValueError(f"a ratio must lie in (0, {MAX_BUDGET_RATIO:g}], not {ratio:g}")
    return ratio


@dataclass(frozen=True)
class Budget:
    """A channel-use budget as the client wrote it: complex channel uses, or a bandwidth ratio."""

    text: str
    channel_uses: int | None = None
    ratio: float | None = None

    def uses_for(self, height: int, width: int) -> int:
        """The budget in complex channel uses for a source of H x W (a ratio rounded down)."""
        if self.channel_uses is not None:
            return self.channel_uses
        assert self.ratio is not None
        return math.floor(self.ratio * source_values(height, width) + 1e-9)


def parse_budget(text: str) -> Budget:
    """`3072` (complex channel uses), `1/12` or `0.083` (a bandwidth ratio); ValueError otherwise."""
    if _INTEGER_PATTERN.match(text):
        uses = int(text)
        if not 1 <= uses <= MAX_BUDGET_CHANNEL_USES:
            raise ValueError(f"a budget in channel uses must lie in 1..{MAX_BUDGET_CHANNEL_USES}, not {uses}")
        return Budget(text=text.strip(), channel_uses=uses)
    if not (_RATIO_PATTERN.match(text) or _DECIMAL_PATTERN.match(text)):
        raise ValueError(f"budget must be complex channel uses (an integer such as 3072) or a bandwidth ratio "
                         f"(a fraction such as 1/12 or a decimal such as 0.083 or 2.0), not {text.strip()[:40]!r}")
    try:
        return Budget(text=text.strip(), ratio=parse_ratio(text))
    except ValueError as error:
        raise ValueError(f"budget: {error}") from None


def average_power_snr_db(snr_db: float, snr_definition: str, map_scale: float) -> float:
    """The average-power SNR of a request: the paper's PSNR puts noise of std map_scale 10^(-PSNR/20)
    on unit-power symbols, an average-power SNR of PSNR - 20 log10(map_scale) (docs/snr-definitions.md)."""
    if snr_definition == TABLE_SNR_DEFINITION:
        return snr_db
    if snr_definition == SnrDefinition.PAPER_PSNR:
        return snr_db - 20.0 * math.log10(map_scale)
    raise ValueError(f"unknown SNR definition {snr_definition!r}")


@dataclass(frozen=True)
class TableEntry:
    """One setting the sender can send, with its measured mIoU at the table's SNRs."""

    representation: str
    downsample_factor: int
    compression: str
    jpeg_quality: int
    bandwidth_ratio: float  # measured mean over the evaluated images
    miou: tuple[float, ...]  # one a table SNR
    model: str | None = None  # the learned link's map encoder

    @property
    def link(self) -> Link:
        return REPRESENTATION_LINKS[self.representation]

    @property
    def name(self) -> str:
        if self.model is not None:
            return f"{self.representation}, {self.model}"
        if self.link is Link.DIGITAL:
            return f"{self.representation}, label map at factor {self.downsample_factor}"
        suffix = f", JPEG q{self.jpeg_quality} maps" if self.compression == "jpeg" else ""
        return f"{self.representation}, factor {self.downsample_factor}{suffix}"


@dataclass(frozen=True)
class RateQualityTable:
    """The measured mIoU of the sendable settings at average-power SNRs, and how it was made."""

    path: str
    snrs_db: tuple[float, ...]
    entries: tuple[TableEntry, ...]
    tolerance_miou: float
    made_by: str
    images: int
    split: str
    # Link adaptation as measured: average-power SNR -> the scheme the digital link used there.
    link_adaptation: dict[float, str | None] = dataclasses.field(default_factory=dict)

    def expected_miou(self, entry: TableEntry, snr_db: float) -> float:
        """Linear in the SNR between the table's SNRs, the end values outside them."""
        snrs = self.snrs_db
        if snr_db <= snrs[0]:
            return entry.miou[0]
        for (left, right), (low, high) in zip(zip(snrs, snrs[1:]), zip(entry.miou, entry.miou[1:])):
            if snr_db <= right:
                return low + (high - low) * (snr_db - left) / (right - left)
        return entry.miou[-1]

    @classmethod
    def load(cls, path: str | Path, shown_as: str | None = None) -> RateQualityTable:
        """Read and check a table; ValueError saying what is wrong with it."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"the rate-quality table {shown_as or path} cannot be read: {error}") from error
        return cls.from_dict(data, shown_as or str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: str) -> RateQualityTable:
        problem = _table_problem(data)
        if problem:
            raise ValueError(f"the rate-quality table {path} is not usable: {problem}")
        entries = tuple(
            TableEntry(
                representation=e["representation"], downsample_factor=int(e["downsample_factor"]),
                compression=e["compression"], jpeg_quality=int(e["jpeg_quality"]),
                bandwidth_ratio=float(e["bandwidth_ratio"]), miou=tuple(float(v) for v in e["miou"]),
                model=e.get("model"),
            )
            for e in data["entries"]
        )
        return cls(path=path, snrs_db=tuple(float(s) for s in data["snrs_db"]), entries=entries,
                   tolerance_miou=float(data["tolerance_miou"]), made_by=data["made_by"],
                   images=int(data["images"]), split=data["split"],
                   link_adaptation={float(snr): scheme for snr, scheme in data.get("link_adaptation", {}).items()})


def _table_problem(data: Any) -> str | None:
    if not isinstance(data, dict) or data.get("version") != TABLE_VERSION:
        return f"expected a JSON object of version {TABLE_VERSION}"
    if data.get("snr_definition") != TABLE_SNR_DEFINITION:
        return f"its SNRs must be {TABLE_SNR_DEFINITION}"
    snrs = data.get("snrs_db")
    if not isinstance(snrs, list) or not snrs or any(not isinstance(s, (int, float)) for s in snrs) \
            or any(b <= a for a, b in zip(snrs, snrs[1:])):
        return "snrs_db must be a non-empty increasing list of numbers"
    for key in ("tolerance_miou", "images"):
        if not isinstance(data.get(key), (int, float)) or data[key] < 0:
            return f"{key} must be a number >= 0"
    for key in ("made_by", "split"):
        if not isinstance(data.get(key), str):
            return f"{key} must be a string"
    entries = data.get("entries")
    if not isinstance(entries, list) or not entries:
        return "entries must be a non-empty list"
    for entry in entries:
        if not isinstance(entry, dict):
            return "every entry must be an object"
        if entry.get("representation") not in REPRESENTATION_LINKS or entry.get("compression") not in ("none", "jpeg"):
            return (f"every entry needs a representation of {sorted(REPRESENTATION_LINKS)} and a compression of "
                    "none or jpeg")
        if entry["representation"] == "learned" and not isinstance(entry.get("model"), str):
            return "every learned entry names its model"
        for key in ("downsample_factor", "jpeg_quality"):
            if not isinstance(entry.get(key), int) or entry[key] < 1:
                return f"every entry needs an integer {key} >= 1"
        if not isinstance(entry.get("bandwidth_ratio"), (int, float)) or entry["bandwidth_ratio"] <= 0:
            return "every entry needs a positive bandwidth_ratio"
        miou = entry.get("miou")
        if not isinstance(miou, list) or len(miou) != len(snrs) or any(
                not isinstance(v, (int, float)) or not 0 <= v <= 1 for v in miou):
            return "every entry needs one mIoU in [0, 1] per SNR"
    adaptation = data.get("link_adaptation", {})
    if not isinstance(adaptation, dict) or any(not _is_number(k) or not isinstance(v, (str, type(None)))
                                               for k, v in adaptation.items()):
        return "link_adaptation must map SNRs to scheme names"
    return None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class Candidate:
    """A table setting encoded for one label map: what it costs and what it should give."""

    entry: TableEntry
    channel_uses: int
    bandwidth_ratio: float
    snr_db_average_power: float
    expected_miou: float


def choose(candidates: list[Candidate], budget_uses: int, tolerance_miou: float) -> Candidate | None:
    """The cheapest candidate within `budget_uses` whose expected mIoU is less than `tolerance_miou` below
    the best one within it (of equally cheap ones, the first: the table lists plain maps before JPEG
    maps of the same size); None when none fits.

    Differences under the tolerance are within what the table's few images can tell apart, so
    they buy neither channel uses nor the JPEG round trip.
    """
    fitting = [c for c in candidates if c.channel_uses <= budget_uses]
    if not fitting:
        return None
    best = max(c.expected_miou for c in fitting)
    good = [c for c in fitting if c.expected_miou > best - tolerance_miou or c.expected_miou == best]
    return min(good, key=lambda c: c.channel_uses)
