"""Separation-based links for the rate-quality comparison: a source code, then a channel code.

* The semantic one codes the label map losslessly (LZMA2, an LZ77 coder followed by a range coder,
  i.e. an arithmetic coder; raw stream, no container: the receiver knows the size) at the sender's
  map size or downsampled by majority vote, so that fewer bits fit smaller budgets
  (`shared.semantic.digital_link`, the code the services' digital link sends). Decoded, it is the
  exact label map, and the receiver conditions the same generator on it.
* The image one is the JPEG image at a quality and a size (full, half, quarter) that fit.

Both go over `shared.semantic.ldpc.transmit_bytes` (CRCs, 5G LDPC, QAM, the project's channel). For a budget
of channel uses and a scheme, the sender sends the largest source option that fits; a failed CRC
loses the transmission. The scheme is either adapted to the SNR (the sender knows it: the highest
spectral efficiency that decoded every trial payload 1 dB below it, `SchemeProbe`) or fixed for a
design SNR, which shows the cliff below it.
"""
from __future__ import annotations

import numpy as np

from evaluation.baselines import jpeg_decode, jpeg_encode
from shared.semantic.channels import ChannelConfig, SnrDefinition
from shared.semantic.digital_link import MCS_TABLE, Mcs, SourceOption, code_layout
from shared.semantic.ldpc import transmit_bytes
from shared.wire.imageio import resize_image

JPEG_SCALES = (1, 2, 4)
JPEG_QUALITIES = (75, 50, 30, 15, 5)


def jpeg_options(image: np.ndarray) -> list[SourceOption]:
    """The image as JPEG at each scale and quality, largest first."""
    height, width = image.shape[:2]
    options = []
    for scale in JPEG_SCALES:
        small = resize_image(image, height // scale, width // scale)
        for quality in JPEG_QUALITIES:
            options.append(SourceOption(f"JPEG q{quality} {height // scale}x{width // scale}", scale,
                                        jpeg_encode(small, quality), quality))
    return sorted(options, key=lambda o: -o.bits)


def decode_jpeg_option(data: bytes, option: SourceOption, height: int, width: int) -> np.ndarray | None:
    """The received JPEG enlarged to the source size, or None when it does not decode."""
    small = jpeg_decode(data, (height // option.factor, width // option.factor, 3))
    return None if small is None else resize_image(small, height, width)


class SchemeProbe:
    """Link adaptation: which scheme the sender picks for an average-power SNR.

    The highest spectral efficiency of `MCS_TABLE` that decoded all `trials` random payloads of
    `payload_bits` at the SNR less `margin_db`, or None when even the most robust one failed.
    """

    def __init__(self, seed: int, trials: int = 8, margin_db: float = 1.0, payload_bits: int = 4000,
                 max_iterations: int = 20) -> None:
        self.seed, self.trials, self.margin_db = seed, trials, margin_db
        self.payload_bits, self.max_iterations = payload_bits, max_iterations

    def __call__(self, snr_db: float) -> Mcs | None:
        rng = np.random.default_rng([self.seed, int(round(snr_db * 100)) + 10_000])
        channel = ChannelConfig(snr_db=max(snr_db - self.margin_db, -10.0), snr_definition=SnrDefinition.AVERAGE_POWER)
        best = None
        for mcs in MCS_TABLE:  # most robust first
            layout = code_layout(self.payload_bits, mcs)
            ok = all(
                transmit_bytes(rng.integers(0, 256, self.payload_bits // 8, dtype=np.uint8).tobytes(), layout, channel,
                               seed=int(rng.integers(2**62)), max_iterations=self.max_iterations).data is not None
                for _ in range(self.trials)
            )
            if not ok:
                break
            best = mcs
        return best
