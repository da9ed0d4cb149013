"""The sender's side of each link: a label map into the symbols, semantic header and framing it sends.

* maps: the paper's present-class maps (`shared.semantic.codec`), as before links existed.
* digital: the label map at a factor, coded losslessly (`shared.semantic.digital_link`), then CRCs,
  5G LDPC and QAM (`shared.semantic.ldpc`, Sionna: imported on first use, as the segmenter's torch).
  The scheme is the request's, else the one the rate-quality table measured for the SNR.
* learned: the map encoder of a shipped map-JSCC checkpoint (`shared.semantic.map_jscc`).

The digital and learned symbols are at unit power; their header's `scale` is that of the maps
link's factor-1 maps of the same label map, so the paper's PSNR puts the same noise on every link
of one scene, as `evaluation.rate_quality` scores them.
"""
from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gesco.options import Link
from shared.semantic import codec
from shared.semantic.digital_link import MCS_TABLE, CodeLayout, Mcs, SourceOption, majority_downsample, mcs_named, scheme_for_snr
from shared.semantic.links import MAP_ENCODER_PATTERN, DigitalFraming, LinkFraming
from shared.semantic.rate_quality import RateQualityTable, average_power_snr_db

_MODEL_LOCK = threading.Lock()


@dataclass(frozen=True)
class LinkEncoding:
    """What one link sends: the semantic header, the real symbols and the link's framing."""

    semantic: codec.SemanticHeader
    symbols: np.ndarray
    framing: LinkFraming


def encode_maps(labels: np.ndarray, config: codec.CodecConfig) -> LinkEncoding:
    encoded = codec.encode_label_map(labels, config)
    return LinkEncoding(encoded.header, encoded.symbols, LinkFraming())


def noise_reference_scale(labels: np.ndarray, num_classes: int) -> float:
    """The scale of the maps link's factor-1 maps of `labels`: the paper's PSNR refers every link's
    noise to it."""
    return codec.encode_label_map(labels, codec.CodecConfig(num_classes=num_classes)).header.scale


def average_power_snr(labels: np.ndarray, num_classes: int, snr_db: float, snr_definition: str) -> float:
    """The request's SNR as an average-power SNR on unit-power symbols (the table's definition)."""
    return average_power_snr_db(snr_db, snr_definition, noise_reference_scale(labels, num_classes))


@dataclass(frozen=True)
class SchemeChoice:
    mcs: Mcs | None  # None: no scheme is known to decode at this SNR
    why: str


def choose_scheme(table: RateQualityTable | None, snr_db_average_power: float, requested: str | None) -> SchemeChoice:
    """The request's scheme, else link adaptation from the table's measurements; ValueError for an
    unknown name."""
    if requested:
        return SchemeChoice(mcs_named(requested), "the request's scheme")
    adaptation = table.link_adaptation if table is not None else {}
    mcs = scheme_for_snr(adaptation, snr_db_average_power)
    if mcs is not None:
        tabled = max(snr for snr in adaptation if snr <= snr_db_average_power + 1e-9)
        return SchemeChoice(mcs, f"link adaptation: the scheme that decoded at {tabled:g} dB in the "
                                 f"rate-quality table, the highest tabled SNR at or below {snr_db_average_power:.2f} dB")
    return SchemeChoice(MCS_TABLE[0], f"below every SNR of the rate-quality table: the most robust scheme, "
                                      f"{MCS_TABLE[0].name}")


def encode_digital(labels: np.ndarray, option: SourceOption, layout: CodeLayout, num_classes: int) -> LinkEncoding:
    """The label map `option` over LDPC + QAM with `layout`."""
    from shared.semantic.ldpc import encode_bytes, symbol_power  # Sionna and torch: off the startup path

    symbols = encode_bytes(option.data, layout)
    small = majority_downsample(labels, option.factor, num_classes)
    height, width = labels.shape
    semantic = codec.SemanticHeader(
        num_classes=num_classes, height=height, width=width, map_height=small.shape[0], map_width=small.shape[1],
        present_class_ids=tuple(int(c) for c in np.unique(small)), downsample_factor=option.factor,
        compression=codec.Compression.NONE, jpeg_quality=0, scale=noise_reference_scale(labels, num_classes),
        num_symbols=int(symbols.size), payload_bits=option.bits)
    framing = LinkFraming(Link.DIGITAL, DigitalFraming.of(layout, len(option.data), symbol_power(symbols)))
    return LinkEncoding(semantic, symbols, framing)


def map_encoders(directory: Path) -> dict[str, Path]:
    """The shipped map encoders by name (their checkpoints' stems), smallest bandwidth last."""
    return {path.stem: path for path in sorted(directory.glob(MAP_ENCODER_PATTERN))}


@functools.lru_cache(maxsize=4)
def _map_encoder(path: Path) -> Any:
    from shared.semantic.map_jscc import load_map_jscc  # torch: off the startup path

    return load_map_jscc(path)[0]


def map_encoder_symbols(path: Path) -> int:
    """Real symbols the map encoder at `path` sends per image."""
    with _MODEL_LOCK:
        return _map_encoder(path).config.num_symbols


def encode_learned(labels: np.ndarray, path: Path, num_classes: int) -> LinkEncoding:
    """The one-hot maps of `labels` through the map encoder at `path`; ValueError when it codes
    another map size or class count."""
    import torch  # off the startup path

    with _MODEL_LOCK:
        model = _map_encoder(path)
        config = model.config
        if (config.map_height, config.map_width, config.num_classes) != (*labels.shape, num_classes):
            raise ValueError(f"the map encoder {path.stem} codes {config.map_height}x{config.map_width} maps of "
                             f"{config.num_classes} classes, not {labels.shape[0]}x{labels.shape[1]} of {num_classes}")
        with torch.inference_mode():
            symbols = model.encode(torch.from_numpy(codec.one_hot(labels, num_classes))[None])[0].numpy()
    height, width = labels.shape
    semantic = codec.SemanticHeader(
        num_classes=num_classes, height=height, width=width, map_height=height, map_width=width,
        present_class_ids=tuple(int(c) for c in np.unique(labels)), downsample_factor=1,
        compression=codec.Compression.NONE, jpeg_quality=0, scale=noise_reference_scale(labels, num_classes),
        num_symbols=int(symbols.size), payload_bits=0)
    return LinkEncoding(semantic, np.ascontiguousarray(symbols, dtype=np.float32),
                        LinkFraming(Link.LEARNED, learned_model=path.stem))
