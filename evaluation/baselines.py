"""Classical transmissions of the image itself over the project's channel, for comparison.

* Analog: the RGB pixels, centred and scaled to unit power (`shared.semantic.codec.encode_image_analog`),
  one real symbol a pixel value, two a complex channel use.
* Digital, what a communications engineer would build: the image as JPEG bytes over CRCs, 5G NR
  LDPC and QAM (`shared.semantic.ldpc`, the code the services' digital link runs), the same AWGN
  channel (`shared.semantic.channels.apply_channel`), then JPEG decoding. A failed CRC or an
  undecodable JPEG is a decode failure: the receiver has no image.

The digital link is sized per image to fit the channel uses of the semantic link for that image
(`plan_digital`): the highest JPEG quality of `JPEG_QUALITIES` (at most 75, the project's
full-image quality) for which some scheme of `MCS_TABLE` fits, with the most robust such scheme. The scheme does not adapt to the SNR (no
feedback), which is what makes the cliff visible.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from shared.semantic.channels import ChannelConfig, apply_channel
from shared.semantic.codec import decode_image_analog, encode_image_analog
from shared.semantic.digital_link import MCS_TABLE, CodeLayout, Mcs, layout_blocks
from shared.semantic.ldpc import transmit_bytes

JPEG_QUALITIES: tuple[int, ...] = (75, 50, 30, 15, 5)  # 75: the project's full-image JPEG quality


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
            blocks, k, n = layout_blocks(len(data) * 8, scheme)
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
