"""Bounded image decoding: every bad upload is an ImageDecodeError with a useful message."""
from __future__ import annotations

import io
import struct
import zlib

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from shared.wire.imageio import (
    ImageDecodeError,
    UploadTooLargeError,
    decode_image_bounded,
    decode_label_map_png,
    encode_png,
)

MAX_BYTES = 1_000_000
MAX_PIXELS = 1_000_000


def _photo(height: int = 24, width: int = 32) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def _jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return data.tobytes()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny, structurally valid PNG whose header claims a huge image (a decompression bomb)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def test_png_and_jpeg_photos_decode_to_rgb() -> None:
    image = _photo()
    assert np.array_equal(decode_image_bounded(encode_png(image), MAX_BYTES, MAX_PIXELS), image)
    decoded = decode_image_bounded(_jpeg(image), MAX_BYTES, MAX_PIXELS)
    assert decoded.shape == image.shape and decoded.dtype == np.uint8


def test_grayscale_and_rgba_photos_become_rgb() -> None:
    gray = np.full((8, 10), 77, dtype=np.uint8)
    decoded = decode_image_bounded(encode_png(gray), MAX_BYTES, MAX_PIXELS)
    assert decoded.shape == (8, 10, 3) and (decoded == 77).all()
    buffer = io.BytesIO()
    Image.new("RGBA", (5, 4), (10, 20, 30, 128)).save(buffer, format="PNG")
    assert decode_image_bounded(buffer.getvalue(), MAX_BYTES, MAX_PIXELS).shape == (4, 5, 3)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"definitely not an image", "not a recognised image"),
        (b"GIF89a" + b"\x00" * 40, "not a recognised image"),
    ],
)
def test_non_images_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(ImageDecodeError, match=message):
        decode_image_bounded(data, MAX_BYTES, MAX_PIXELS)


def test_too_many_bytes_is_refused_before_anything_else() -> None:
    with pytest.raises(UploadTooLargeError, match="more than the limit of 10 bytes"):
        decode_image_bounded(encode_png(_photo()), 10, MAX_PIXELS)


def test_pixel_bound_is_checked_from_the_header() -> None:
    bomb = _png_claiming(5_000, 5_000)
    assert len(bomb) < 200
    with pytest.raises(ImageDecodeError, match="5000x5000 = 25000000 pixels"):
        decode_image_bounded(bomb, MAX_BYTES, MAX_PIXELS)
    with pytest.raises(ImageDecodeError, match="more than the limit of 100 pixels"):
        decode_image_bounded(encode_png(_photo()), MAX_BYTES, 100)


def test_pils_own_bomb_guard_is_mapped() -> None:
    with pytest.raises(ImageDecodeError, match="too large"):
        decode_image_bounded(_png_claiming(100_000, 100_000), MAX_BYTES, 10**12)


@pytest.mark.parametrize("encode", [encode_png, _jpeg], ids=["png", "jpeg"])
def test_truncated_files_are_refused(encode) -> None:
    data = encode(_photo(64, 64))
    with pytest.raises(ImageDecodeError, match="corrupt or truncated"):
        decode_image_bounded(data[: len(data) // 2], MAX_BYTES, MAX_PIXELS)


def test_png_with_a_bad_crc_is_refused() -> None:
    data = bytearray(encode_png(_photo()))
    data[-20] ^= 0xFF  # inside the last IDAT chunk or its CRC
    with pytest.raises(ImageDecodeError):
        decode_image_bounded(bytes(data), MAX_BYTES, MAX_PIXELS)


def test_label_map_round_trip() -> None:
    labels = np.arange(12, dtype=np.uint8).repeat(4).reshape(6, 8)
    assert np.array_equal(decode_label_map_png(encode_png(labels), 12, MAX_BYTES, MAX_PIXELS), labels)


def test_palette_label_map_is_read_by_index() -> None:
    labels = np.array([[0, 1], [2, 3]], dtype=np.uint8)
    image = Image.new("P", (2, 2))
    image.putdata(labels.ravel().tolist())
    image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 9, 9])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    assert np.array_equal(decode_label_map_png(buffer.getvalue(), 4, MAX_BYTES, MAX_PIXELS), labels)


def test_label_ids_out_of_range_name_the_max_id() -> None:
    labels = np.zeros((4, 4), dtype=np.uint8)
    labels[1, 2] = 200
    labels[0, 0] = 13
    with pytest.raises(ImageDecodeError, match="class id 200.*num_classes 12"):
        decode_label_map_png(encode_png(labels), 12, MAX_BYTES, MAX_PIXELS)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (encode_png(np.zeros((4, 4, 3), dtype=np.uint8)), "mode 'RGB'"),
        (_jpeg(np.zeros((8, 8, 3), dtype=np.uint8)), "not a recognised image"),
    ],
    ids=["rgb-png", "jpeg"],
)
def test_label_maps_must_be_single_channel_png(data: bytes, message: str) -> None:
    with pytest.raises(ImageDecodeError, match=message):
        decode_label_map_png(data, 12, MAX_BYTES, MAX_PIXELS)


def test_sixteen_bit_label_map_is_refused() -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((4, 4), dtype=np.uint16)).save(buffer, format="PNG")
    with pytest.raises(ImageDecodeError, match="8-bit single-channel"):
        decode_label_map_png(buffer.getvalue(), 12, MAX_BYTES, MAX_PIXELS)


def test_encode_png_rejects_bad_arrays() -> None:
    with pytest.raises(ValueError):
        encode_png(np.zeros((4, 4), dtype=np.float32))
    with pytest.raises(ValueError):
        encode_png(np.zeros((4, 4, 4), dtype=np.uint8))


_VALID = [encode_png(_photo(16, 16)), _jpeg(_photo(16, 16))]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
def test_random_bytes_only_ever_raise_image_decode_error(data: bytes) -> None:
    for decode in (
        lambda d: decode_image_bounded(d, MAX_BYTES, MAX_PIXELS),
        lambda d: decode_label_map_png(d, 12, MAX_BYTES, MAX_PIXELS),
    ):
        try:
            decode(data)
        except ImageDecodeError:
            pass


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(_VALID),
    st.integers(min_value=0, max_value=10_000),
    st.binary(min_size=1, max_size=8),
)
def test_mangled_valid_images_decode_or_raise_image_decode_error(
    data: bytes, position: int, patch: bytes
) -> None:
    position %= len(data)
    for mangled in (data[:position], data[:position] + patch + data[position + len(patch) :]):
        try:
            decoded = decode_image_bounded(mangled, MAX_BYTES, MAX_PIXELS)
        except ImageDecodeError:
            continue
        assert decoded.dtype == np.uint8 and decoded.ndim == 3 and decoded.shape[2] == 3
