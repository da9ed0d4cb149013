"""Classical transmissions of the image itself over the project's channel, for comparison.

* Analog: the RGB pixels, centred and scaled to unit power (`shared.semantic.codec.encode_image_analog`),
  one real symbol a pixel value, two a complex channel use.
* Digital, what a communications engineer would build: the image as JPEG bytes, a CRC24A over
  the transport block, segmentation into code blocks with a CRC24B each, 5G NR LDPC (Sionna,
  3GPP 38.212 rate matching and bit interleaving), QAM with Gray labelling, the same AWGN
  channel (`shared.semantic.channels.apply_channel`), APP demapping, belief-propagation decoding stopped
  early once a block's CRC holds, then JPEG decoding. A failed CRC or an undecodable JPEG is a
  decode failure: the receiver has no image.

The digital link is sized per image to fit the channel uses of the semantic link for that image
(`plan_digital`): the highest JPEG quality of `JPEG_QUALITIES` (at most 75, the project's
full-image quality) for which some scheme of `MCS_TABLE` fits, with the most robust such scheme. The scheme does not adapt to the SNR (no
feedback), which is what makes the cliff visible.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from sionna.phy.fec.crc import CRCDecoder, CRCEncoder
from sionna.phy.fec.ldpc import LDPC5GDecoder, LDPC5GEncoder
from sionna.phy.mapping import Demapper, Mapper

from shared.semantic.channels import ChannelConfig, apply_channel, noise_std_per_real_symbol
from shared.semantic.codec import decode_image_analog, encode_image_analog

_DEVICE = "cpu"
_PRECISION = "single"
# Largest 5G NR code block, CRC included: base graph 1, or base graph 2 at rates <= 1/4.
MAX_CODE_BLOCK_BITS_BG1 = 8448
MAX_CODE_BLOCK_BITS_BG2 = 3840
CRC_BITS = 24
JPEG_QUALITIES: tuple[int, ...] = (75, 50, 30, 15, 5)  # 75: the project's full-image JPEG quality
EARLY_STOP_ITERATIONS = 4


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


@dataclass(frozen=True)
class AnalogResult:
    image: np.ndarray  # (H, W, 3) uint8 as received
    channel_uses: int
    payload_bits: int
    measured_snr_db: float


def analog_transmit(image: np.ndarray, channel: ChannelConfig, seed: int) -> AnalogResult:
    """Send the pixels themselves. For the paper's PSNR the noise is referred to the peak 1 of the
    [0, 1] pixels (map_scale = the encoder's scale), as eq. 1 refers it to the 0/1 maps."""
    encoded = encode_image_analog(image)
    received = apply_channel(encoded.symbols, channel, seed=seed, map_scale=encoded.scale)
    return AnalogResult(
        image=decode_image_analog(received.symbols, encoded),
        channel_uses=received.channel_uses,
        payload_bits=encoded.payload_bits,
        measured_snr_db=received.measured_snr_db,
    )


def analog_transmit_at_ratio(image: np.ndarray, ratio: float, channel: ChannelConfig, seed: int) -> AnalogResult:
    """The analog image fitted to `ratio` complex channel uses per source value.

    Below 1/2 the image is area-downsampled to the largest size (aspect kept) whose pixels fit and
    enlarged again (bicubic) by the receiver; from 1/2 up every real symbol is sent
    floor(2 ratio) times and the receiver averages the copies (noise variance / copies).
    """
    height, width = image.shape[:2]
    budget_reals = 2 * math.floor(ratio * image.size + 1e-9)
    if budget_reals < 3:
        raise ValueError(f"a bandwidth ratio of {ratio:g} leaves no room for one pixel of a {height}x{width} image")
    copies = max(budget_reals // image.size, 1)
    small = image
    if copies == 1 and budget_reals < image.size:
        scale = math.sqrt(budget_reals / image.size)
        size = [max(math.floor(height * scale), 1), max(math.floor(width * scale), 1)]
        while size[0] * size[1] * 3 > budget_reals:
            size[int(size[1] / width > size[0] / height)] -= 1
        small = cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_AREA)
    encoded = encode_image_analog(small)
    received = apply_channel(np.tile(encoded.symbols, copies), channel, seed=seed, map_scale=encoded.scale)
    averaged = received.symbols.reshape(copies, -1).mean(axis=0, dtype=np.float64).astype(np.float32)
    decoded = decode_image_analog(averaged, encoded)
    if decoded.shape != image.shape:
        decoded = cv2.resize(decoded, (width, height), interpolation=cv2.INTER_CUBIC)
    return AnalogResult(image=decoded, channel_uses=received.channel_uses, payload_bits=encoded.payload_bits,
                        measured_snr_db=received.measured_snr_db)


def jpeg_encode(image: np.ndarray, quality: int) -> bytes:
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError(f"JPEG encoding failed for an image of shape {image.shape}")
    return data.tobytes()


def jpeg_decode(data: bytes, shape: tuple[int, ...]) -> np.ndarray | None:
    """RGB image from JPEG bytes, or None when they do not decode to an image of `shape`."""
    bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if bgr is None or bgr.shape != tuple(shape):
        return None
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


@dataclass(frozen=True)
class DigitalPlan:
    """How one image is sent digitally: JPEG quality, scheme and code block layout."""

    jpeg_quality: int
    jpeg_bytes: bytes
    mcs: Mcs
    num_blocks: int
    block_info_bits: int  # k per code block, CRC24B included
    block_coded_bits: int  # n per code block after rate matching
    budget_channel_uses: int | None
    over_budget: bool

    @property
    def jpeg_bits(self) -> int:
        return len(self.jpeg_bytes) * 8

    @property
    def coded_bits(self) -> int:
        return self.num_blocks * self.block_coded_bits

    @property
    def channel_uses(self) -> int:
        return self.coded_bits // self.mcs.bits_per_symbol


def _layout(payload_bits: int, mcs: Mcs) -> tuple[int, int, int]:
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


def plan_digital(image: np.ndarray, budget_channel_uses: int | None, quality: int | None = None,
                 mcs: Mcs | None = None) -> DigitalPlan:
    """Pick JPEG quality and scheme for `image` within `budget_channel_uses` complex uses.

    Fixed `quality` and/or `mcs` restrict the search. When nothing fits, the smallest
    transmission (lowest quality, highest rate) is used and flagged `over_budget`.
    """
    qualities = JPEG_QUALITIES if quality is None else (quality,)
    schemes = MCS_TABLE if mcs is None else (mcs,)
    smallest: DigitalPlan | None = None
    for q in qualities:
        data = jpeg_encode(image, q)
        for scheme in schemes:
            blocks, k, n = _layout(len(data) * 8, scheme)
            plan = DigitalPlan(q, data, scheme, blocks, k, n, budget_channel_uses, over_budget=False)
            if budget_channel_uses is None or plan.channel_uses <= budget_channel_uses:
                return plan
            if smallest is None or plan.channel_uses < smallest.channel_uses:
                smallest = plan
    assert smallest is not None
    return DigitalPlan(smallest.jpeg_quality, smallest.jpeg_bytes, smallest.mcs, smallest.num_blocks,
                       smallest.block_info_bits, smallest.block_coded_bits, budget_channel_uses, over_budget=True)


@dataclass(frozen=True)
class DigitalResult:
    image: np.ndarray | None  # None: decode failure
    failure: str | None  # "crc" or "jpeg" when the image is lost
    failed_blocks: int
    channel_uses: int
    measured_snr_db: float


class _Codec:
    """Sionna blocks for one (k, n, bits per symbol); built once, reused across SNRs."""

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


_TB_CRC = CRCEncoder("CRC24A", precision=_PRECISION, device=_DEVICE)
_TB_CRC_CHECK = CRCDecoder(_TB_CRC, precision=_PRECISION, device=_DEVICE)


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


def code_layout(payload_bits: int, mcs: Mcs) -> CodeLayout:
    """The layout of a payload of `payload_bits` under `mcs` (transport block CRC included)."""
    return CodeLayout(mcs, *_layout(payload_bits, mcs))


@dataclass(frozen=True)
class BytesResult:
    data: bytes | None  # None: a code block's or the transport block's CRC failed
    failed_blocks: int
    channel_uses: int
    measured_snr_db: float


def transmit_bytes(data: bytes, layout: CodeLayout, channel: ChannelConfig, seed: int, map_scale: float = 1.0,
                   max_iterations: int = 20) -> BytesResult:
    """Send bytes over the channel with CRCs, 5G LDPC and QAM, and decode them.

    `map_scale` only matters for the paper's PSNR: the channel noise per real symbol is then
    map_scale * 10**(-PSNR/20) at the unit power of the QAM symbols, so passing the semantic
    link's scale gives the digital link the same noise as the semantic one for that image.
    """
    codec = _codec(layout.block_info_bits, layout.block_coded_bits, layout.mcs.bits_per_symbol, max_iterations)
    with torch.inference_mode():
        payload = torch.from_numpy(np.unpackbits(np.frombuffer(data, dtype=np.uint8)).astype(np.float32))
        tb = _TB_CRC(payload[None])[0]
        per_block = layout.block_info_bits - CRC_BITS
        padded = torch.nn.functional.pad(tb, (0, layout.num_blocks * per_block - tb.numel()))
        blocks = codec.block_crc(padded.reshape(layout.num_blocks, per_block))
        symbols = codec.mapper(codec.encoder(blocks)).reshape(-1)
        # Unit power per real symbol, as the semantic and analog links send: E|c|^2 = 2.
        real = (torch.view_as_real(symbols).reshape(-1) * math.sqrt(2)).numpy().astype(np.float32)
        received = apply_channel(real, channel, seed=seed, map_scale=map_scale)
        power = float(np.mean(np.square(real, dtype=np.float64)))
        sigma = noise_std_per_real_symbol(channel, power, map_scale)
        y = torch.view_as_complex(torch.from_numpy(received.symbols.reshape(-1, 2).copy())) / math.sqrt(2)
        # Back on the unit-power constellation the complex noise variance is 2 sigma^2 / 2.
        llr = codec.demapper(y.reshape(layout.num_blocks, -1), sigma**2)
        decoded, valid = codec.decode(llr)
        tb_hat = decoded[:, :per_block].reshape(-1)[: tb.numel()]
        _, tb_ok = _TB_CRC_CHECK(tb_hat[None])
    failed_blocks = int((~valid).sum())
    ok = not failed_blocks and bool(tb_ok.all())
    decoded_data = np.packbits(tb_hat[: -CRC_BITS].numpy().astype(np.uint8)).tobytes() if ok else None
    return BytesResult(data=decoded_data, failed_blocks=failed_blocks, channel_uses=received.channel_uses,
                       measured_snr_db=received.measured_snr_db)


def digital_transmit(plan: DigitalPlan, image_shape: tuple[int, ...], channel: ChannelConfig, seed: int,
                     map_scale: float = 1.0, max_iterations: int = 20) -> DigitalResult:
    """Send `plan`'s JPEG over the channel (`transmit_bytes`) and decode it."""
    layout = CodeLayout(plan.mcs, plan.num_blocks, plan.block_info_bits, plan.block_coded_bits)
    sent = transmit_bytes(plan.jpeg_bytes, layout, channel, seed, map_scale, max_iterations)
    result = dict(failed_blocks=sent.failed_blocks, channel_uses=sent.channel_uses,
                  measured_snr_db=sent.measured_snr_db)
    if sent.data is None:
        return DigitalResult(image=None, failure="crc", **result)
    image = jpeg_decode(sent.data, image_shape)
    return DigitalResult(image=image, failure=None if image is not None else "jpeg", **result)
