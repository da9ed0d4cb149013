"""Semantic codec: exact lossless round trip, unit power, bounded lossy error, bits, errors."""
from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.semantic.codec import (
    CodecConfig,
    Compression,
    EncodedMaps,
    decode_image_analog,
    decode_present_maps,
    encode_image_analog,
    encode_label_map,
    jpeg_bits,
    labels_from_maps,
    one_hot,
    reinsert_absent_classes,
)

HEIGHT, WIDTH = 32, 48


def blocky_label_map(
    rng: np.random.Generator,
    num_classes: int,
    block: int = 8,
    shape: tuple[int, int] = (HEIGHT, WIDTH),
) -> np.ndarray:
    """Random classes on a grid of block x block squares: large regions, like real layouts."""
    grid = rng.integers(0, num_classes, size=(shape[0] // block, shape[1] // block))
    return np.kron(grid, np.ones((block, block), dtype=np.int64))


def round_trip_labels(label_map: np.ndarray, config: CodecConfig) -> np.ndarray:
    """Encode, send over a noiseless channel, decode to labels."""
    encoded = encode_label_map(label_map, config)
    header = encoded.header
    present = decode_present_maps(encoded.symbols, header)
    full = reinsert_absent_classes(present, header.present_class_ids, header.num_classes)
    return labels_from_maps(full)


def mean_power(symbols: np.ndarray) -> float:
    return float(np.mean(symbols.astype(np.float64) ** 2))


@pytest.mark.parametrize("num_classes", [12, 35])
@pytest.mark.parametrize("seed", range(3))
def test_lossless_round_trip_is_exact(num_classes: int, seed: int) -> None:
    label_map = blocky_label_map(np.random.default_rng(seed), num_classes, block=4)
    labels = round_trip_labels(label_map, CodecConfig(num_classes))
    np.testing.assert_array_equal(labels, label_map)


@settings(max_examples=25, deadline=None)
@given(
    labels=st.lists(st.integers(0, 182), min_size=12, max_size=12),
    num_classes=st.sampled_from([12, 35, 183]),
)
def test_lossless_round_trip_is_exact_for_any_ids(labels: list[int], num_classes: int) -> None:
    label_map = (np.array(labels).reshape(3, 4) % num_classes).astype(np.uint8)
    np.testing.assert_array_equal(round_trip_labels(label_map, CodecConfig(num_classes)), label_map)


def test_encoding_keeps_only_present_classes_in_ascending_order() -> None:
    label_map = np.full((HEIGHT, WIDTH), 9, dtype=np.int64)
    label_map[:, :16] = 2
    label_map[:8, 30:] = 5
    encoded = encode_label_map(label_map, CodecConfig(12))
    header = encoded.header
    assert header.present_class_ids == (2, 5, 9)
    assert header.num_symbols == encoded.symbols.size == 3 * HEIGHT * WIDTH
    maps = encoded.symbols.reshape(3, HEIGHT, WIDTH) / header.scale
    np.testing.assert_allclose(maps, one_hot(label_map, 12)[[2, 5, 9]], atol=1e-6)


@pytest.mark.parametrize("factor", [1, 2, 4])
@pytest.mark.parametrize("compression", list(Compression))
def test_symbols_have_unit_mean_power(factor: int, compression: Compression) -> None:
    label_map = blocky_label_map(np.random.default_rng(factor), 12, block=2)
    encoded = encode_label_map(label_map, CodecConfig(12, factor, compression, jpeg_quality=50))
    assert encoded.symbols.dtype == np.float32
    assert encoded.symbols.ndim == 1
    assert abs(mean_power(encoded.symbols) - 1.0) < 1e-6


@pytest.mark.parametrize(
    "config",
    [
        CodecConfig(12, downsample_factor=2),
        CodecConfig(12, downsample_factor=4),
        CodecConfig(12, compression=Compression.JPEG, jpeg_quality=50),
        CodecConfig(12, downsample_factor=2, compression=Compression.JPEG, jpeg_quality=50),
    ],
)
def test_lossy_round_trip_keeps_most_pixels(config: CodecConfig) -> None:
    rng = np.random.default_rng(7)
    for _ in range(3):
        label_map = blocky_label_map(rng, 12, block=8)
        agreement = np.mean(round_trip_labels(label_map, config) == label_map)
        assert agreement >= 0.95


def test_downsampling_shrinks_the_transmitted_maps() -> None:
    label_map = blocky_label_map(np.random.default_rng(3), 12)
    header = encode_label_map(label_map, CodecConfig(12, downsample_factor=4)).header
    assert (header.map_height, header.map_width) == (HEIGHT // 4, WIDTH // 4)
    assert (header.height, header.width) == (HEIGHT, WIDTH)
    assert header.num_symbols == len(header.present_class_ids) * 8 * 12


def test_soft_downsampled_maps_keep_area_fractions() -> None:
    label_map = np.zeros((4, 4), dtype=np.int64)
    label_map[0, 0] = 1
    encoded = encode_label_map(label_map, CodecConfig(2, downsample_factor=2))
    maps = encoded.symbols.astype(np.float64).reshape(2, 2, 2) / encoded.header.scale
    np.testing.assert_allclose(maps[1], [[0.25, 0.0], [0.0, 0.0]], atol=1e-6)
    np.testing.assert_allclose(maps[0], [[0.75, 1.0], [1.0, 1.0]], atol=1e-6)


def test_decode_resizes_to_requested_size() -> None:
    label_map = blocky_label_map(np.random.default_rng(4), 12)
    encoded = encode_label_map(label_map, CodecConfig(12, downsample_factor=2))
    assert decode_present_maps(encoded.symbols, encoded.header).shape[1:] == (HEIGHT, WIDTH)
    shrunk = decode_present_maps(encoded.symbols, encoded.header, out_size=(8, 12))
    assert shrunk.shape == (len(encoded.header.present_class_ids), 8, 12)
    assert shrunk.dtype == np.float32


def test_decode_enlarges_bilinearly_and_shrinks_by_area() -> None:
    label_map = np.zeros((4, 4), dtype=np.int64)
    label_map[:, :2] = 1
    encoded = encode_label_map(label_map, CodecConfig(2, downsample_factor=2))
    enlarged = decode_present_maps(encoded.symbols, encoded.header)
    np.testing.assert_allclose(enlarged[1, 0], [1.0, 0.75, 0.25, 0.0], atol=1e-6)

    stripes = np.zeros((8, 8), dtype=np.int64)
    stripes[:, ::4] = 1
    encoded = encode_label_map(stripes, CodecConfig(2))
    shrunk = decode_present_maps(encoded.symbols, encoded.header, out_size=(2, 2))
    np.testing.assert_allclose(shrunk[1], 0.25, atol=1e-6)


def test_binary_maps_cost_one_bit_per_value_and_soft_maps_32() -> None:
    label_map = blocky_label_map(np.random.default_rng(5), 12, block=8)
    binary = encode_label_map(label_map, CodecConfig(12)).header
    assert binary.payload_bits == binary.num_symbols
    odd_map = label_map.copy()
    odd_map[0, 0] = (label_map[0, 0] + 1) % 12
    soft = encode_label_map(odd_map, CodecConfig(12, downsample_factor=2)).header
    assert soft.payload_bits == soft.num_symbols * 32


def test_jpeg_shrinks_large_flat_maps() -> None:
    label_map = np.zeros((128, 256), dtype=np.int64)
    label_map[60:, :] = 3
    label_map[20:90, 100:180] = 7
    raw = encode_label_map(label_map, CodecConfig(12)).header
    config = CodecConfig(12, compression=Compression.JPEG, jpeg_quality=50)
    jpeg = encode_label_map(label_map, config).header
    assert jpeg.payload_bits < raw.payload_bits / 2
    assert jpeg.num_symbols == raw.num_symbols


def test_jpeg_payload_is_the_size_of_the_map_jpegs() -> None:
    label_map = blocky_label_map(np.random.default_rng(13), 12)
    config = CodecConfig(12, compression=Compression.JPEG, jpeg_quality=40)
    encoded = encode_label_map(label_map, config)
    expected_bytes = 0
    for class_id in encoded.header.present_class_ids:
        gray = (label_map == class_id).astype(np.uint8) * 255
        expected_bytes += len(cv2.imencode(".jpg", gray, [cv2.IMWRITE_JPEG_QUALITY, 40])[1])
    assert encoded.header.payload_bits == expected_bytes * 8


def test_noisy_image_costs_more_jpeg_bits_than_its_maps() -> None:
    rng = np.random.default_rng(6)
    image = rng.integers(0, 256, size=(128, 192, 3), dtype=np.uint8)
    label_map = blocky_label_map(rng, 4, block=32, shape=(128, 192))
    config = CodecConfig(12, compression="jpeg", jpeg_quality=50)
    maps_bits = encode_label_map(label_map, config).header.payload_bits
    assert jpeg_bits(image, 50) > 2 * maps_bits


def test_jpeg_bits_grow_with_quality() -> None:
    image = np.random.default_rng(8).integers(0, 256, size=(HEIGHT, WIDTH, 3), dtype=np.uint8)
    assert jpeg_bits(image, 20) < jpeg_bits(image, 90)
    assert jpeg_bits(image, 75) % 8 == 0


def test_single_class_map_round_trips() -> None:
    label_map = np.full((HEIGHT, WIDTH), 4, dtype=np.uint8)
    for config in (CodecConfig(12), CodecConfig(12, 4, Compression.JPEG, 30)):
        encoded = encode_label_map(label_map, config)
        assert encoded.header.present_class_ids == (4,)
        assert abs(mean_power(encoded.symbols) - 1.0) < 1e-6
        np.testing.assert_array_equal(round_trip_labels(label_map, config), label_map)


def test_one_hot_marks_each_pixel_once() -> None:
    label_map = blocky_label_map(np.random.default_rng(9), 12)
    maps = one_hot(label_map, 12)
    assert maps.shape == (12, HEIGHT, WIDTH) and maps.dtype == np.float32
    np.testing.assert_array_equal(maps.sum(axis=0), 1.0)
    np.testing.assert_array_equal(maps.argmax(axis=0), label_map)


def test_reinsert_puts_zeros_for_absent_classes() -> None:
    present = np.random.default_rng(10).random((2, 4, 5)).astype(np.float32)
    full = reinsert_absent_classes(present, (1, 6), 8)
    assert full.shape == (8, 4, 5)
    np.testing.assert_array_equal(full[[1, 6]], present)
    np.testing.assert_array_equal(np.delete(full, [1, 6], axis=0), 0.0)


def test_config_accepts_compression_by_name() -> None:
    assert CodecConfig(12, compression="jpeg").compression is Compression.JPEG


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_classes": 0}, "num_classes"),
        ({"num_classes": 12, "downsample_factor": 0}, "downsample_factor"),
        ({"num_classes": 12, "jpeg_quality": 0}, "jpeg_quality"),
        ({"num_classes": 12, "jpeg_quality": 101}, "jpeg_quality"),
        ({"num_classes": 12, "compression": "png"}, "png"),
    ],
)
def test_bad_config_raises(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CodecConfig(**kwargs)


@pytest.mark.parametrize(
    "label_map, message",
    [
        (np.zeros((2, 3, 4), dtype=np.int64), "2-D"),
        (np.zeros((4, 4), dtype=np.float32), "integer dtype"),
        (np.zeros((4, 4), dtype=bool), "integer dtype"),
        (np.full((4, 4), -1, dtype=np.int64), "negative"),
        (np.full((4, 4), 12, dtype=np.int64), "num_classes"),
        (np.zeros((0, 4), dtype=np.int64), "empty"),
    ],
)
def test_bad_label_map_raises(label_map: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        encode_label_map(label_map, CodecConfig(12))
    with pytest.raises(ValueError, match=message):
        one_hot(label_map, 12)


def test_factor_must_divide_map_size() -> None:
    with pytest.raises(ValueError, match="divide"):
        encode_label_map(np.zeros((30, 48), dtype=np.int64), CodecConfig(12, downsample_factor=4))


@pytest.fixture
def encoded() -> EncodedMaps:
    return encode_label_map(blocky_label_map(np.random.default_rng(11), 12), CodecConfig(12))


@pytest.mark.parametrize(
    "make_symbols, message",
    [
        (lambda s: s.reshape(-1, 2), "1-D"),
        (lambda s: s[:-1], "expected"),
        (lambda s: np.append(s, 0.0).astype(np.float32), "expected"),
        (lambda s: np.where(np.arange(s.size) == 3, np.nan, s), "NaN"),
        (lambda s: np.where(np.arange(s.size) == 3, np.inf, s), "inf"),
        (lambda s: s.astype(np.complex64), "real floats"),
    ],
)
def test_bad_symbols_raise(encoded: EncodedMaps, make_symbols, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        decode_present_maps(make_symbols(encoded.symbols), encoded.header)


def test_inconsistent_header_raises(encoded: EncodedMaps) -> None:
    header = encoded.header
    broken = dataclasses.replace(header, present_class_ids=header.present_class_ids[:-1])
    with pytest.raises(ValueError, match="inconsistent"):
        decode_present_maps(encoded.symbols, broken)


@pytest.mark.parametrize(
    "ids, message",
    [
        ((1,), "present_class_ids"),
        ((1, 1), "unique"),
        ((1, 12), r"\[0, 12\)"),
        ((-1, 2), r"\[0, 12\)"),
    ],
)
def test_bad_reinsert_ids_raise(ids: tuple[int, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        reinsert_absent_classes(np.zeros((2, 4, 4), dtype=np.float32), ids, 12)


def test_labels_from_bad_maps_raise() -> None:
    with pytest.raises(ValueError, match="K, H, W"):
        labels_from_maps(np.zeros((4, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="NaN"):
        labels_from_maps(np.full((2, 4, 4), np.nan, dtype=np.float32))


def test_analog_baseline_round_trips_within_one_level() -> None:
    image = np.random.default_rng(12).integers(0, 256, size=(HEIGHT, WIDTH, 3), dtype=np.uint8)
    encoded = encode_image_analog(image)
    assert encoded.symbols.dtype == np.float32 and encoded.symbols.shape == (HEIGHT * WIDTH * 3,)
    assert abs(mean_power(encoded.symbols) - 1.0) < 1e-6
    assert encoded.payload_bits == HEIGHT * WIDTH * 3 * 8
    decoded = decode_image_analog(encoded.symbols, encoded)
    assert decoded.dtype == np.uint8 and decoded.shape == image.shape
    assert np.abs(decoded.astype(int) - image.astype(int)).max() <= 1


def test_analog_baseline_clips_channel_noise() -> None:
    image = np.full((4, 4, 3), 250, dtype=np.uint8)
    image[0, 0] = 0
    encoded = encode_image_analog(image)
    decoded = decode_image_analog(encoded.symbols + 50.0, encoded)
    np.testing.assert_array_equal(decoded, 255)


def test_analog_baseline_sends_a_constant_image_by_its_mean() -> None:
    image = np.full((4, 6, 3), 77, dtype=np.uint8)
    encoded = encode_image_analog(image)
    np.testing.assert_array_equal(encoded.symbols, 0.0)
    np.testing.assert_array_equal(decode_image_analog(encoded.symbols, encoded), image)


@pytest.mark.parametrize(
    "image, message",
    [
        (np.zeros((4, 4), dtype=np.uint8), "HxWx3"),
        (np.zeros((4, 4, 4), dtype=np.uint8), "HxWx3"),
        (np.zeros((4, 4, 3), dtype=np.float32), "uint8"),
        (np.zeros((0, 4, 3), dtype=np.uint8), "empty"),
    ],
)
def test_bad_images_raise(image: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        encode_image_analog(image)
    with pytest.raises(ValueError, match=message):
        jpeg_bits(image, 75)


def test_bad_analog_symbols_and_quality_raise() -> None:
    image = np.zeros((4, 4, 3), dtype=np.uint8)
    image[0, 0] = 9
    encoded = encode_image_analog(image)
    with pytest.raises(ValueError, match="expected"):
        decode_image_analog(encoded.symbols[:-1], encoded)
    with pytest.raises(ValueError, match="NaN"):
        decode_image_analog(np.full_like(encoded.symbols, np.nan), encoded)
    with pytest.raises(ValueError, match="jpeg_quality"):
        jpeg_bits(image, 0)
