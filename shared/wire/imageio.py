"""Bounded decoding of untrusted uploads (photos and PNG label maps), PNG encoding and resizing.

A service must never let a client pick its memory use: the byte size is checked first, then the
pixel count from the image header alone (before any pixel data is decompressed, so a small PNG that
claims 100k x 100k pixels costs nothing), then the file is verified and decoded. Every failure, from
random bytes to a truncated JPEG, is an `ImageDecodeError` (a ValueError) with a message a client
can act on; no other exception type escapes.
"""
from __future__ import annotations

import io

import cv2
import numpy as np
from PIL import Image, ImageOps

# Formats a client may upload; the rest of PIL's plugins (EPS, TGA, ...) are never tried.
PHOTO_FORMATS = ("PNG", "JPEG", "WEBP", "BMP")
LABEL_MAP_FORMATS = ("PNG",)
# 8-bit single-channel modes: grayscale, or a palette whose indices are the class ids.
LABEL_MAP_MODES = ("L", "P")


class ImageDecodeError(ValueError):
    """The upload is not an acceptable image; the message says why."""


class UploadTooLargeError(ImageDecodeError):
    """The upload has more bytes than allowed (a service answers 413 rather than 400)."""


def decode_image_bounded(data: bytes, max_bytes: int, max_pixels: int) -> np.ndarray:
    """Decode a PNG/JPEG/WebP/BMP upload to an HxWx3 uint8 RGB array within the given bounds.

    The EXIF orientation of camera photos is applied, and alpha is dropped.
    """
    with _open_bounded(data, max_bytes, max_pixels, PHOTO_FORMATS) as image:
        try:
            upright = ImageOps.exif_transpose(image)
            rgb = upright.convert("RGB")
            array = np.asarray(rgb, dtype=np.uint8)
        except Exception as error:  # PIL raises many types for corrupt data
            raise ImageDecodeError(f"cannot decode the image: {_reason(error)}") from error
    return np.ascontiguousarray(array)


def decode_label_map_png(data: bytes, num_classes: int, max_bytes: int, max_pixels: int) -> np.ndarray:
    """Decode an 8-bit single-channel PNG of class ids to an (H, W) uint8 array.

    Palette PNGs are read by index (the palette is only for display), as in Pascal VOC. Any id
    >= num_classes is refused, naming the largest id in the file.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, not {num_classes}")
    with _open_bounded(data, max_bytes, max_pixels, LABEL_MAP_FORMATS) as image:
        if image.mode not in LABEL_MAP_MODES:
            raise ImageDecodeError(
                "a label map must be an 8-bit single-channel PNG (grayscale or palette) of "
                f"class ids, got PNG mode {image.mode!r}"
            )
        try:
            labels = np.array(image, dtype=np.uint8)
        except Exception as error:
            raise ImageDecodeError(f"cannot decode the label map: {_reason(error)}") from error
    if labels.ndim != 2:
        raise ImageDecodeError(f"a label map must be single-channel, got shape {labels.shape}")
    max_id = int(labels.max())
    if max_id >= num_classes:
        raise ImageDecodeError(
            f"the label map has class id {max_id} (its largest), but ids must be below "
            f"num_classes {num_classes}"
        )
    return labels


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of an (H, W) uint8 label map / grayscale image or an (H, W, 3) uint8 RGB image."""
    if not isinstance(array, np.ndarray) or array.dtype != np.uint8:
        raise ValueError(f"encode_png needs a uint8 array, got {getattr(array, 'dtype', type(array))}")
    if array.ndim == 2:
        mode = "L"
    elif array.ndim == 3 and array.shape[2] == 3:
        mode = "RGB"
    else:
        raise ValueError(f"encode_png needs (H, W) or (H, W, 3), got shape {array.shape}")
    if array.size == 0:
        raise ValueError("encode_png got an empty array")
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array), mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def resize_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize an (H, W, 3) uint8 image; area averaging to shrink, bicubic to enlarge."""
    if image.shape[:2] == (height, width):
        return image
    shrinking = height <= image.shape[0] and width <= image.shape[1]
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC)


def _open_bounded(
    data: bytes, max_bytes: int, max_pixels: int, formats: tuple[str, ...]
) -> Image.Image:
    """Open `data` after the byte, format, pixel-count and integrity checks; pixels are loaded."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageDecodeError(f"expected bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise ImageDecodeError("the file is empty")
    if len(data) > max_bytes:
        raise UploadTooLargeError(
            f"the file is {len(data)} bytes, more than the limit of {max_bytes} bytes"
        )
    width, height = _header_size(data, formats)
    if width < 1 or height < 1:
        raise ImageDecodeError(f"the image header declares an empty image ({width}x{height})")
    if width * height > max_pixels:
        raise ImageDecodeError(
            f"the image is {width}x{height} = {width * height} pixels, more than the limit of "
            f"{max_pixels} pixels"
        )
    try:
        # verify() checks chunk CRCs and structure without keeping pixels; it leaves the object
        # unusable, so the image is opened again to decode it.
        with Image.open(io.BytesIO(data), formats=formats) as probe:
            probe.verify()
        image = Image.open(io.BytesIO(data), formats=formats)
        image.load()
    except Image.DecompressionBombError as error:
        raise ImageDecodeError(f"the image is too large to decode: {error}") from error
    except Exception as error:
        raise ImageDecodeError(f"the image is corrupt or truncated: {_reason(error)}") from error
    return image


def _header_size(data: bytes, formats: tuple[str, ...]) -> tuple[int, int]:
    """(width, height) read from the header only: Image.open does not decode pixel data."""
    try:
        with Image.open(io.BytesIO(data), formats=formats) as image:
            return image.size
    except Image.DecompressionBombError as error:
        raise ImageDecodeError(f"the image is too large to decode: {error}") from error
    except Image.UnidentifiedImageError as error:
        raise ImageDecodeError(
            f"the file is not a recognised image (accepted formats: {', '.join(formats)})"
        ) from error
    except Exception as error:
        raise ImageDecodeError(f"cannot read the image header: {_reason(error)}") from error


def _reason(error: Exception) -> str:
    return str(error) or type(error).__name__
