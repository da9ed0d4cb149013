"""What a link's framing tells the receiver, beyond the maps link's semantic header.

Each link sends real symbols through the same channel simulator; the framing says how to turn
them back into a condition for the generator: the digital link's code blocks and scheme (demap,
LDPC-decode, CRC-check, LZMA-decode, `shared.semantic.ldpc`), or the learned link's map encoder
(whose decoder gives soft maps, `shared.semantic.map_jscc`). Torch-free: the wire format and the
sender read it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from gesco.options import Link
from shared.semantic.digital_link import CRC_BITS, CodeLayout, mcs_named

# The learned link's map encoders, found beside the other models (their names: the files' stems).
MAP_ENCODER_PATTERN = "map-jscc-*.pt"


@dataclass(frozen=True)
class DigitalFraming:
    """The digital link's code: scheme, code blocks and the payload they carry."""

    scheme: str
    num_blocks: int
    block_info_bits: int  # k per block, CRC24B included
    block_coded_bits: int  # n per block after rate matching
    payload_bytes: int  # the LZMA-coded label map
    symbol_power: float  # mean power per real symbol as sent: the demapper's noise reference

    def __post_init__(self) -> None:
        mcs = mcs_named(self.scheme)
        if not 1 <= self.num_blocks <= 4096:
            raise ValueError(f"digital.num_blocks must be in 1..4096, got {self.num_blocks}")
        if not CRC_BITS < self.block_info_bits < self.block_coded_bits:
            raise ValueError(f"digital.block_info_bits must lie in ({CRC_BITS}, block_coded_bits), "
                             f"got {self.block_info_bits} of {self.block_coded_bits}")
        if self.block_coded_bits % mcs.bits_per_symbol:
            raise ValueError(f"digital.block_coded_bits must be a multiple of {mcs.bits_per_symbol} for "
                             f"{self.scheme}, got {self.block_coded_bits}")
        capacity = self.num_blocks * (self.block_info_bits - CRC_BITS) - CRC_BITS
        if not 1 <= self.payload_bytes * 8 <= capacity:
            raise ValueError(f"digital.payload_bytes must be 1..{capacity // 8} for these code blocks, "
                             f"got {self.payload_bytes}")
        if not math.isfinite(self.symbol_power) or self.symbol_power <= 0:
            raise ValueError(f"digital.symbol_power must be finite and > 0, got {self.symbol_power}")

    @property
    def layout(self) -> CodeLayout:
        return CodeLayout(mcs_named(self.scheme), self.num_blocks, self.block_info_bits, self.block_coded_bits)

    @classmethod
    def of(cls, layout: CodeLayout, payload_bytes: int, symbol_power: float) -> DigitalFraming:
        return cls(layout.mcs.name, layout.num_blocks, layout.block_info_bits, layout.block_coded_bits,
                   payload_bytes, symbol_power)


@dataclass(frozen=True)
class LinkFraming:
    """The link of a transmission and, for the digital and learned ones, their framing."""

    link: Link = Link.MAPS
    digital: DigitalFraming | None = None
    learned_model: str | None = None  # the map encoder's name (its checkpoint's stem)

    def __post_init__(self) -> None:
        if self.link is Link.AUTO:
            raise ValueError("a transmission's link is maps, digital or learned: auto only picks one")
        if (self.link is Link.DIGITAL) != (self.digital is not None):
            raise ValueError("the digital link, and only it, needs its framing (semantic.digital)")
        if (self.link is Link.LEARNED) != bool(self.learned_model):
            raise ValueError("the learned link, and only it, names its model (semantic.learned.model)")

    def expected_symbols(self) -> int | None:
        """Real symbols the framing implies (the digital link's), None where the header's maps or the
        learned model say."""
        return None if self.digital is None else self.digital.layout.num_real_symbols
