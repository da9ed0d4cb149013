"""Bytes over the channel, the way a communications engineer would send them: CRCs, 5G LDPC, QAM.

The transport block gets a CRC24A, is split into the code blocks of `digital_link.CodeLayout`
with a CRC24B each, LDPC-coded (Sionna's 5G NR encoder: 3GPP 38.212 rate matching and bit
interleaving) and mapped onto Gray-labelled QAM at unit power per real symbol, as every other
transmission of the project. The receiver demaps (APP, with the channel's noise variance),
decodes by belief propagation stopped early once a block's CRC holds, and checks the transport
block's CRC: a failed CRC gives no bytes, never wrong ones. The sender (`encode_bytes`), the
receiver (`decode_symbols`) and the evaluation (`transmit_bytes`) share these functions.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
from sionna.phy.fec.crc import CRCDecoder, CRCEncoder
from sionna.phy.fec.ldpc import LDPC5GDecoder, LDPC5GEncoder
from sionna.phy.mapping import Demapper, Mapper

from shared.semantic.channels import ChannelConfig, apply_channel, noise_std_per_real_symbol
from shared.semantic.digital_link import CRC_BITS, CodeLayout

_DEVICE = "cpu"
_PRECISION = "single"
EARLY_STOP_ITERATIONS = 4
DEFAULT_MAX_ITERATIONS = 20


class _Codec:
    """Sionna blocks for one (k, n, bits per symbol); built once, reused."""

    def __init__(self, k: int, n: int, bits_per_symbol: int, max_iterations: int) -> None:
        kwargs = {"precision": _PRECISION, "device": _DEVICE}
        self.encoder = LDPC5GEncoder(k, n, num_bits_per_symbol=bits_per_symbol, **kwargs)
        self.decoder = LDPC5GDecoder(self.encoder, hard_out=True, return_infobits=True, return_state=True, **kwargs)
        self.mapper = Mapper("qam", bits_per_symbol, **kwargs)
        self.demapper = Demapper("app", "qam", bits_per_symbol, **kwargs)
        self.block_crc = CRCEncoder("CRC24B", **kwargs)
        self.block_crc_check = CRCDecoder(self.block_crc, **kwargs)
        self.max_iterations = max_iterations

    def decode(self, llr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """BP decoding in rounds of EARLY_STOP_ITERATIONS; a block stops once its CRC24B holds."""
        bits = torch.zeros(llr.shape[0], self.encoder.k)
        valid = torch.zeros(llr.shape[0], dtype=torch.bool)
        active = torch.arange(llr.shape[0])
        state = None
        done = 0
        while active.numel() and done < self.max_iterations:
            rounds = min(EARLY_STOP_ITERATIONS, self.max_iterations - done)
            decoded, state = self.decoder(llr[active], num_iter=rounds, msg_v2c=state)
            done += rounds
            _, ok = self.block_crc_check(decoded)
            ok = ok.reshape(-1)
            bits[active] = decoded
            valid[active] = ok
            active, state = active[~ok], state[~ok]
        return bits, valid


@functools.lru_cache(maxsize=256)
def _codec(k: int, n: int, bits_per_symbol: int, max_iterations: int) -> _Codec:
    return _Codec(k, n, bits_per_symbol, max_iterations)


@functools.lru_cache(maxsize=1)
def _tb_crc() -> tuple[CRCEncoder, CRCDecoder]:
    encoder = CRCEncoder("CRC24A", precision=_PRECISION, device=_DEVICE)
    return encoder, CRCDecoder(encoder, precision=_PRECISION, device=_DEVICE)


def encode_bytes(data: bytes, layout: CodeLayout) -> np.ndarray:
    """The real float32 symbols of `data` under `layout` (unit power per real symbol: E|c|^2 = 2)."""
    codec = _codec(layout.block_info_bits, layout.block_coded_bits, layout.mcs.bits_per_symbol, DEFAULT_MAX_ITERATIONS)
    per_block = layout.block_info_bits - CRC_BITS
    with torch.inference_mode():
        payload = torch.from_numpy(np.unpackbits(np.frombuffer(data, dtype=np.uint8)).astype(np.float32))
        tb = _tb_crc()[0](payload[None])[0]
        if tb.numel() > layout.num_blocks * per_block:
            raise ValueError(f"{len(data)} bytes do not fit {layout.num_blocks} code blocks of {per_block} bits")
        padded = torch.nn.functional.pad(tb, (0, layout.num_blocks * per_block - tb.numel()))
        blocks = codec.block_crc(padded.reshape(layout.num_blocks, per_block))
        symbols = codec.mapper(codec.encoder(blocks)).reshape(-1)
        return (torch.view_as_real(symbols).reshape(-1) * math.sqrt(2)).numpy().astype(np.float32)


@dataclass(frozen=True)
class DecodedBytes:
    data: bytes | None  # None: a code block's or the transport block's CRC failed
    failed_blocks: int
    num_blocks: int


def decode_symbols(received: np.ndarray, layout: CodeLayout, payload_bytes: int, noise_std: float,
                   max_iterations: int = DEFAULT_MAX_ITERATIONS) -> DecodedBytes:
    """Demap, LDPC-decode and CRC-check received real symbols with noise std `noise_std` per real
    symbol: the `payload_bytes` sent, or no data when a CRC fails."""
    if received.size != layout.num_real_symbols:
        raise ValueError(f"the layout takes {layout.num_real_symbols} real symbols, {received.size} arrived")
    codec = _codec(layout.block_info_bits, layout.block_coded_bits, layout.mcs.bits_per_symbol, max_iterations)
    per_block = layout.block_info_bits - CRC_BITS
    tb_bits = payload_bytes * 8 + CRC_BITS
    with torch.inference_mode():
        y = torch.view_as_complex(torch.from_numpy(np.ascontiguousarray(received, dtype=np.float32).reshape(-1, 2)))
        y = y / math.sqrt(2)
        # Back on the unit-power constellation the complex noise variance is 2 sigma^2 / 2.
        llr = codec.demapper(y.reshape(layout.num_blocks, -1), float(noise_std) ** 2)
        decoded, valid = codec.decode(llr)
        tb_hat = decoded[:, :per_block].reshape(-1)[:tb_bits]
        _, tb_ok = _tb_crc()[1](tb_hat[None])
    failed_blocks = int((~valid).sum())
    ok = not failed_blocks and bool(tb_ok.all())
    data = np.packbits(tb_hat[:-CRC_BITS].numpy().astype(np.uint8)).tobytes() if ok else None
    return DecodedBytes(data=data, failed_blocks=failed_blocks, num_blocks=layout.num_blocks)


@dataclass(frozen=True)
class BytesResult:
    data: bytes | None  # None: a code block's or the transport block's CRC failed
    failed_blocks: int
    channel_uses: int
    measured_snr_db: float


def transmit_bytes(data: bytes, layout: CodeLayout, channel: ChannelConfig, seed: int, map_scale: float = 1.0,
                   max_iterations: int = DEFAULT_MAX_ITERATIONS) -> BytesResult:
    """Send bytes over the channel with CRCs, 5G LDPC and QAM, and decode them.

    `map_scale` only matters for the paper's PSNR: the channel noise per real symbol is then
    map_scale * 10**(-PSNR/20) at the unit power of the QAM symbols, so passing the semantic
    link's scale gives the digital link the same noise as the semantic one for that image.
    """
    real = encode_bytes(data, layout)
    received = apply_channel(real, channel, seed=seed, map_scale=map_scale)
    sigma = noise_std_per_real_symbol(channel, symbol_power(real), map_scale)
    decoded = decode_symbols(received.symbols, layout, len(data), sigma, max_iterations)
    return BytesResult(data=decoded.data, failed_blocks=decoded.failed_blocks, channel_uses=received.channel_uses,
                       measured_snr_db=received.measured_snr_db)


def symbol_power(symbols: np.ndarray) -> float:
    """Mean power per real symbol, as the channel measures it for the average-power SNR."""
    return float(np.mean(np.square(symbols, dtype=np.float64)))
