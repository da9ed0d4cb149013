"""The separated digital link's plan: schemes, code-block layouts and the label map's lossless code.

Torch-free (the sender imports it to size a transmission): which modulation and coding schemes
exist, how many code blocks and coded bits a payload takes under one (5G NR: a CRC24A over the
transport block, equal code blocks with a CRC24B each), and the label map coded losslessly
(majority-vote downsampling, then raw LZMA2). The channel coding itself, Sionna's 5G LDPC and
QAM, lives in `shared.semantic.ldpc`. The services and `evaluation.rate_quality` both plan with
these functions, so a service sends what the evaluation scored.
"""
from __future__ import annotations

import lzma
import math
from dataclasses import dataclass

import numpy as np

# Largest 5G NR code block, CRC included: base graph 1, or base graph 2 at rates <= 1/4.
MAX_CODE_BLOCK_BITS_BG1 = 8448
MAX_CODE_BLOCK_BITS_BG2 = 3840
CRC_BITS = 24
LABEL_FACTORS = (1, 2, 4, 8)
_LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]


@dataclass(frozen=True)
class Mcs:
    """A modulation and coding scheme: QAM order (bits per symbol) and LDPC code rate."""

    name: str
    bits_per_symbol: int
    code_rate: float

    @property
    def spectral_efficiency(self) -> float:
        return self.bits_per_symbol * self.code_rate


# A subset of the 5G NR MCS range, most robust first.
MCS_TABLE: tuple[Mcs, ...] = (
    Mcs("QPSK r=1/5", 2, 1 / 5),
    Mcs("QPSK r=1/3", 2, 1 / 3),
    Mcs("QPSK r=1/2", 2, 1 / 2),
    Mcs("QPSK r=2/3", 2, 2 / 3),
    Mcs("16-QAM r=1/2", 4, 1 / 2),
    Mcs("16-QAM r=2/3", 4, 2 / 3),
    Mcs("64-QAM r=2/3", 6, 2 / 3),
    Mcs("64-QAM r=5/6", 6, 5 / 6),
)
MCS_BY_NAME = {mcs.name: mcs for mcs in MCS_TABLE}


def mcs_named(name: str) -> Mcs:
    """The scheme of MCS_TABLE called `name`; ValueError listing the names otherwise."""
    try:
        return MCS_BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown scheme {name[:40]!r}: one of {list(MCS_BY_NAME)}") from None


def layout_blocks(payload_bits: int, mcs: Mcs) -> tuple[int, int, int]:
    """(num_blocks, k, n) for a payload: TB CRC24A, equal code blocks with a CRC24B each.

    n is a multiple of the bits per symbol, so each block fills whole QAM symbols.
    """
    tb_bits = payload_bits + CRC_BITS
    max_block = MAX_CODE_BLOCK_BITS_BG2 if mcs.code_rate <= 0.25 else MAX_CODE_BLOCK_BITS_BG1
    num_blocks = math.ceil(tb_bits / (max_block - CRC_BITS))
    k = math.ceil(tb_bits / num_blocks) + CRC_BITS
    m = mcs.bits_per_symbol
    # Rounded down: the rate never falls below the scheme's (Sionna refuses r < 1/5, and < 1/3 on BG1).
    n = math.floor(k / mcs.code_rate / m) * m
    return num_blocks, k, n


@dataclass(frozen=True)
class CodeLayout:
    """How a payload travels: the scheme, the code blocks and their bits before and after coding."""

    mcs: Mcs
    num_blocks: int
    block_info_bits: int  # k per code block, CRC24B included
    block_coded_bits: int  # n per code block after rate matching

    @property
    def channel_uses(self) -> int:
        return self.num_blocks * self.block_coded_bits // self.mcs.bits_per_symbol

    @property
    def num_real_symbols(self) -> int:
        """Real symbols on the wire: two a QAM symbol."""
        return 2 * self.channel_uses


def code_layout(payload_bits: int, mcs: Mcs) -> CodeLayout:
    """The layout of a payload of `payload_bits` under `mcs` (transport block CRC included)."""
    return CodeLayout(mcs, *layout_blocks(payload_bits, mcs))


def majority_downsample(labels: np.ndarray, factor: int, num_classes: int) -> np.ndarray:
    """The most frequent class of every factor x factor block (ties: the lowest id), uint8."""
    if factor == 1:
        return labels.astype(np.uint8)
    height, width = labels.shape
    if height % factor or width % factor:
        raise ValueError(f"factor {factor} must divide the label map size {height}x{width}")
    counts = (np.arange(num_classes)[:, None, None] == labels[None]).reshape(
        num_classes, height // factor, factor, width // factor, factor).sum(axis=(2, 4))
    return counts.argmax(axis=0).astype(np.uint8)


def encode_labels(labels: np.ndarray) -> bytes:
    """Lossless code of a uint8 label map: raw LZMA2 of its bytes (the receiver knows the size)."""
    return lzma.compress(np.ascontiguousarray(labels, dtype=np.uint8).tobytes(), format=lzma.FORMAT_RAW,
                         filters=_LZMA_FILTERS)


def decode_labels(data: bytes, shape: tuple[int, int]) -> np.ndarray | None:
    """The label map of `encode_labels`' bytes, or None when they do not decode to one of `shape`."""
    try:
        raw = lzma.decompress(data, format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
    except lzma.LZMAError:
        return None
    if len(raw) != shape[0] * shape[1]:
        return None
    return np.frombuffer(raw, dtype=np.uint8).reshape(shape)


@dataclass(frozen=True)
class SourceOption:
    """One way to code an image's content: its name, its factor (or JPEG scale) and its bytes."""

    name: str
    factor: int
    data: bytes
    quality: int = 0  # JPEG quality; 0 for the label map

    @property
    def bits(self) -> int:
        return len(self.data) * 8


def label_option(labels: np.ndarray, factor: int, num_classes: int) -> SourceOption:
    """The label map downsampled by `factor`, losslessly coded."""
    small = majority_downsample(labels, factor, num_classes)
    return SourceOption(f"labels {small.shape[0]}x{small.shape[1]}", factor, encode_labels(small))


def label_options(labels: np.ndarray, num_classes: int, factors: tuple[int, ...] = LABEL_FACTORS) -> list[SourceOption]:
    """The label map at each factor that divides its size, losslessly coded, largest first."""
    height, width = labels.shape
    options = [label_option(labels, f, num_classes) for f in factors if not height % f and not width % f]
    return sorted(options, key=lambda o: -o.bits)


def fit(options: list[SourceOption], mcs: Mcs, budget_uses: int) -> tuple[SourceOption, CodeLayout] | None:
    """The largest option whose coded size under `mcs` fits `budget_uses` complex channel uses."""
    for option in options:
        layout = code_layout(option.bits, mcs)
        if layout.channel_uses <= budget_uses:
            return option, layout
    return None


def scheme_for_snr(link_adaptation: dict[float, str], snr_db: float) -> Mcs | None:
    """Link adaptation from a measured table (average-power SNR -> the scheme that decoded there):
    the scheme of the highest tabled SNR at or below `snr_db`; None below them all (no scheme is
    known to work there)."""
    below = [snr for snr in link_adaptation if snr <= snr_db + 1e-9]
    if not below:
        return None
    name = link_adaptation[max(below)]
    return MCS_BY_NAME.get(name)
