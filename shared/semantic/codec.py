"""Semantic codec: label map -> power-normalised symbols of the present classes, and back.

The sender keeps only the one-hot maps of classes present in the image (paper sec. 3.2): absent
maps would be pure noise at the receiver and waste bandwidth. The maps may be area-downsampled and
JPEG-compressed (supplementary), then scaled to unit mean power to meet the transmit power
constraint (sec. 3.1). The receiver undoes the scaling, resizes and re-inserts the absent classes.

The analog baseline (`encode_image_analog`) sends the RGB pixels themselves the same way, and
`jpeg_bits` sizes the classical "full image" transmission.
"""
from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

FLOAT_BITS = 32
PIXEL_BITS = 8


class Compression(str, enum.Enum):
    """How each transmitted map is compressed before power normalisation."""

    NONE = "none"
    JPEG = "jpeg"


@dataclass(frozen=True)
class CodecConfig:
    """Sender settings; checked on construction so a bad config fails before any image is sent."""

    num_classes: int
    downsample_factor: int = 1
    compression: Compression = Compression.NONE
    jpeg_quality: int = 75

    def __post_init__(self) -> None:
        _check_num_classes(self.num_classes)
        if not _is_int(self.downsample_factor) or self.downsample_factor < 1:
            raise ValueError(
                f"downsample_factor must be an integer >= 1, not {self.downsample_factor!r}"
            )
        _check_jpeg_quality(self.jpeg_quality)
        # Accept the plain string from a config file; Compression() rejects unknown names.
        object.__setattr__(self, "compression", Compression(self.compression))


@dataclass(frozen=True)
class SemanticHeader:
    """Side information the receiver needs to turn the symbols back into K maps."""

    num_classes: int
    height: int
    width: int
    map_height: int
    map_width: int
    present_class_ids: tuple[int, ...]
    downsample_factor: int
    compression: Compression
    jpeg_quality: int
    scale: float
    num_symbols: int
    payload_bits: int


@dataclass(frozen=True)
class EncodedMaps:
    """Real symbols ready for the channel, with the header that decodes them."""

    symbols: np.ndarray
    header: SemanticHeader


@dataclass(frozen=True)
class EncodedImage:
    """Analog baseline: centred RGB pixels as symbols; `mean` and `scale` travel as side info."""

    symbols: np.ndarray
    scale: float
    mean: float
    height: int
    width: int
    payload_bits: int


def one_hot(label_map: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, H, W) float32 one-hot maps of a label map with ids in [0, K)."""
    _check_num_classes(num_classes)
    _check_label_map(label_map, num_classes)
    return _class_maps(label_map, np.arange(num_classes))


def encode_label_map(label_map: np.ndarray, config: CodecConfig) -> EncodedMaps:
    """Encode the present-class maps of `label_map` as unit-power float32 symbols.

    payload_bits counts what a digital link would carry: with JPEG the compressed bytes; with NONE
    one bit a value when every value is 0 or 1 (binary maps, e.g. factor 1) and 32 bits a value
    otherwise (soft maps after area pooling are sent as float32).
    """
    _check_label_map(label_map, config.num_classes)
    height, width = label_map.shape
    factor = config.downsample_factor
    if height % factor or width % factor:
        raise ValueError(
            f"downsample_factor {factor} must divide the label map size {height}x{width}"
        )
    present_ids = np.unique(label_map)
    maps = _area_downsample(_class_maps(label_map, present_ids), factor)
    if config.compression is Compression.JPEG:
        maps, payload_bits = _jpeg_round_trip(maps, config.jpeg_quality)
    else:
        bits_per_value = 1 if np.isin(maps, (0.0, 1.0)).all() else FLOAT_BITS
        payload_bits = maps.size * bits_per_value
    symbols, scale = _normalise_power(maps)
    header = SemanticHeader(
        num_classes=config.num_classes,
        height=height,
        width=width,
        map_height=maps.shape[1],
        map_width=maps.shape[2],
        present_class_ids=tuple(int(class_id) for class_id in present_ids),
        downsample_factor=factor,
        compression=config.compression,
        jpeg_quality=config.jpeg_quality,
        scale=scale,
        num_symbols=symbols.size,
        payload_bits=payload_bits,
    )
    return EncodedMaps(symbols=symbols, header=header)


def decode_present_maps(
    symbols: np.ndarray, header: SemanticHeader, out_size: tuple[int, int] | None = None
) -> np.ndarray:
    """Undo the power scaling and resize the received maps to (C_present, H, W) float32.

    `out_size` is (H, W), by default the sender's label map size. Enlarging is bilinear so the
    soft (possibly noisy) values stay soft for FDS; shrinking uses area averaging to avoid aliasing.
    """
    num_maps = len(header.present_class_ids)
    expected = num_maps * header.map_height * header.map_width
    if header.num_symbols != expected:
        raise ValueError(
            f"header is inconsistent: num_symbols {header.num_symbols} != "
            f"{num_maps} maps x {header.map_height}x{header.map_width}"
        )
    _check_symbols(symbols, expected)
    out_height, out_width = (header.height, header.width) if out_size is None else out_size
    if out_height < 1 or out_width < 1:
        raise ValueError(f"out_size must be positive, not {out_size!r}")
    maps = (symbols.astype(np.float64) / header.scale).astype(np.float32)
    maps = maps.reshape(num_maps, header.map_height, header.map_width)
    return _resize_maps(maps, out_height, out_width)


def reinsert_absent_classes(
    present_maps: np.ndarray, present_class_ids: Sequence[int], num_classes: int
) -> np.ndarray:
    """(K, H, W) maps with the received present maps in place and exact zeros for absent classes."""
    _check_num_classes(num_classes)
    if present_maps.ndim != 3:
        raise ValueError(f"present_maps must be (C_present, H, W), got shape {present_maps.shape}")
    ids = np.asarray(present_class_ids)
    if ids.ndim != 1 or ids.size != present_maps.shape[0]:
        raise ValueError(
            f"got {ids.size} present_class_ids for {present_maps.shape[0]} present maps"
        )
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"present_class_ids must be integers, got dtype {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= num_classes):
        raise ValueError(f"present_class_ids must lie in [0, {num_classes}), got {ids.tolist()}")
    if np.unique(ids).size != ids.size:
        raise ValueError(f"present_class_ids must be unique, got {ids.tolist()}")
    full = np.zeros((num_classes, *present_maps.shape[1:]), dtype=np.float32)
    full[ids] = present_maps
    return full


def labels_from_maps(maps: np.ndarray) -> np.ndarray:
    """Argmax over the class axis of (K, H, W) maps; uint8 when K <= 256 (PNG-friendly), else int64.

    Absent classes are zeros, so a pixel where every present map is negative (heavy channel noise)
    maps to an absent class: denoise with FDS first when that matters.
    """
    if maps.ndim != 3 or maps.size == 0:
        raise ValueError(f"maps must be a non-empty (K, H, W) array, got shape {maps.shape}")
    if not np.isfinite(maps).all():
        raise ValueError("maps contain NaN or inf")
    labels = np.argmax(maps, axis=0)
    return labels.astype(np.uint8) if maps.shape[0] <= 256 else labels.astype(np.int64)


def encode_image_analog(image: np.ndarray) -> EncodedImage:
    """Send the RGB image itself as unit-power symbols (the classical analog baseline).

    Pixels in [0, 1] are centred on their image mean so all transmit power carries detail, not a DC
    offset, then scaled to mean power 1. A constant image has nothing but its mean to send: its
    symbols are zeros (power 0, within the power constraint) and `mean` restores it.
    payload_bits is the raw 8-bit RGB image the symbols stand for.
    """
    _check_rgb_image(image)
    pixels = image.astype(np.float64) / 255.0
    mean = float(pixels.mean())
    centred = pixels - mean
    power = float(np.mean(centred**2))
    scale = 1.0 / np.sqrt(power) if power > 0 else 1.0
    height, width = image.shape[:2]
    return EncodedImage(
        symbols=(centred * scale).astype(np.float32).ravel(),
        scale=float(scale),
        mean=mean,
        height=height,
        width=width,
        payload_bits=image.size * PIXEL_BITS,
    )


def decode_image_analog(symbols: np.ndarray, encoded: EncodedImage) -> np.ndarray:
    """Rebuild the HxWx3 uint8 image from received symbols, clipping channel noise to [0, 255]."""
    _check_symbols(symbols, encoded.height * encoded.width * 3)
    pixels = symbols.astype(np.float64) / encoded.scale + encoded.mean
    image = np.clip(np.rint(pixels * 255.0), 0, 255).astype(np.uint8)
    return image.reshape(encoded.height, encoded.width, 3)


def jpeg_bits(image: np.ndarray, quality: int) -> int:
    """Size in bits of the RGB image as a JPEG at `quality` (the paper's full-image comparison)."""
    _check_rgb_image(image)
    _check_jpeg_quality(quality)
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    return len(_jpeg_encode(bgr, quality)) * 8


def _class_maps(label_map: np.ndarray, class_ids: np.ndarray) -> np.ndarray:
    return (class_ids[:, None, None] == label_map[None]).astype(np.float32)


def _area_downsample(maps: np.ndarray, factor: int) -> np.ndarray:
    """Mean over factor x factor blocks: soft maps that keep each class's area fraction."""
    if factor == 1:
        return maps
    channels, height, width = maps.shape
    blocks = maps.reshape(channels, height // factor, factor, width // factor, factor)
    return blocks.mean(axis=(2, 4), dtype=np.float64).astype(np.float32)


def _jpeg_round_trip(maps: np.ndarray, quality: int) -> tuple[np.ndarray, int]:
    """Compress each map as an 8-bit grayscale JPEG; return what the receiver sees and the bits."""
    decoded = []
    total_bytes = 0
    for class_map in maps:
        gray = np.rint(class_map * 255.0).astype(np.uint8)
        data = _jpeg_encode(gray, quality)
        total_bytes += len(data)
        decoded.append(cv2.imdecode(data, cv2.IMREAD_GRAYSCALE).astype(np.float32) / 255.0)
    return np.stack(decoded), total_bytes * 8


def _jpeg_encode(image: np.ndarray, quality: int) -> np.ndarray:
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError(f"JPEG encoding failed for an image of shape {image.shape}")
    return data


def _normalise_power(maps: np.ndarray) -> tuple[np.ndarray, float]:
    """Flatten and scale to mean power exactly 1 (computed in float64, sent as float32)."""
    values = maps.astype(np.float64).ravel()
    power = float(np.mean(values**2))
    if power == 0.0:
        raise ValueError("the maps to transmit are all zero; nothing to normalise")
    scale = 1.0 / np.sqrt(power)
    return (values * scale).astype(np.float32), float(scale)


def _resize_maps(maps: np.ndarray, out_height: int, out_width: int) -> np.ndarray:
    _, map_height, map_width = maps.shape
    if (out_height, out_width) == (map_height, map_width):
        return maps
    shrinking = out_height <= map_height and out_width <= map_width
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    resized = [
        cv2.resize(class_map, (out_width, out_height), interpolation=interpolation)
        for class_map in maps
    ]
    return np.stack(resized).astype(np.float32)


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_num_classes(num_classes: int) -> None:
    if not _is_int(num_classes) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, not {num_classes!r}")


def _check_jpeg_quality(quality: int) -> None:
    if not _is_int(quality) or not 1 <= quality <= 100:
        raise ValueError(f"jpeg_quality must be an integer in 1..100, not {quality!r}")


def _check_label_map(label_map: np.ndarray, num_classes: int) -> None:
    if not isinstance(label_map, np.ndarray) or label_map.ndim != 2:
        raise ValueError(f"label_map must be a 2-D array, got shape {np.shape(label_map)}")
    if label_map.size == 0:
        raise ValueError("label_map is empty")
    if not np.issubdtype(label_map.dtype, np.integer):
        raise ValueError(f"label_map must have an integer dtype, got {label_map.dtype}")
    if label_map.min() < 0:
        raise ValueError(f"label_map has negative class ids (min {label_map.min()})")
    if label_map.max() >= num_classes:
        raise ValueError(
            f"label_map has class id {label_map.max()} >= num_classes {num_classes}"
        )


def _check_rgb_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be an HxWx3 array, got shape {np.shape(image)}")
    if image.size == 0:
        raise ValueError("image is empty")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {image.dtype}")


def _check_symbols(symbols: np.ndarray, expected_length: int) -> None:
    if not isinstance(symbols, np.ndarray) or symbols.ndim != 1:
        raise ValueError(f"symbols must be a 1-D array, got shape {np.shape(symbols)}")
    if not np.issubdtype(symbols.dtype, np.floating):
        raise ValueError(f"symbols must be real floats, got dtype {symbols.dtype}")
    if symbols.size != expected_length:
        raise ValueError(f"expected {expected_length} symbols, got {symbols.size}")
    if not np.isfinite(symbols).all():
        raise ValueError("symbols contain NaN or inf")
