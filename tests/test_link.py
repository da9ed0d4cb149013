"""The whole semantic link (codec -> channel -> inverse codec -> FDS) as training and the receiver use it."""
from __future__ import annotations

import numpy as np
import pytest

from shared.semantic.channels import ChannelConfig
from shared.semantic.codec import CodecConfig, encode_label_map
from shared.semantic.link import received_condition, received_views, resize_maps, simulate_link


def blocky_label_map(height: int = 32, width: int = 48, block: int = 8, classes: tuple[int, ...] = (0, 3, 5, 8)) -> np.ndarray:
    rng = np.random.default_rng(0)
    coarse = rng.choice(classes, size=(height // block, width // block))
    return np.kron(coarse, np.ones((block, block), dtype=np.int64)).astype(np.uint8)


def test_noiseless_link_keeps_the_label_map() -> None:
    labels = blocky_label_map()
    result = simulate_link(labels, CodecConfig(num_classes=12), ChannelConfig(snr_db=100.0), seed=0, out_size=labels.shape)
    assert result.condition.shape == (12, *labels.shape)
    np.testing.assert_array_equal(result.condition.argmax(0), labels)
    absent = sorted(set(range(12)) - set(np.unique(labels).tolist()))
    assert np.all(result.condition[absent] == 0)


def test_fds_recovers_most_pixels_at_low_snr() -> None:
    labels = blocky_label_map()
    codec = CodecConfig(num_classes=12)
    encoded = encode_label_map(labels, codec)
    noisy = simulate_link(labels, codec, ChannelConfig(snr_db=5.0), seed=3, out_size=labels.shape, use_fds=False)
    cleaned = simulate_link(labels, codec, ChannelConfig(snr_db=5.0), seed=3, out_size=labels.shape, use_fds=True)
    accuracy_noisy = (noisy.condition.argmax(0) == labels).mean()
    accuracy_fds = (cleaned.condition.argmax(0) == labels).mean()
    assert accuracy_fds > accuracy_noisy + 0.05
    assert accuracy_fds > 0.9
    assert encoded.header.num_symbols == 4 * labels.size


def test_received_views_and_condition_sizes() -> None:
    labels = blocky_label_map()
    encoded = encode_label_map(labels, CodecConfig(num_classes=12))
    views = received_views(encoded.symbols, encoded.header)
    assert views.noisy_maps.shape == views.fds_maps.shape == (12, 32, 48)
    condition = received_condition(encoded.symbols, encoded.header, out_size=(16, 24))
    assert condition.shape == (12, 16, 24)
    assert condition.min() >= 0.0 and condition.max() <= 1.0 + 1e-6
    # FDS's max pooling dilates every class by a pixel: away from edges the argmax is the label.
    np.testing.assert_array_equal(views.fds_maps.argmax(0)[8:24, 8:40], labels[8:24, 8:40])


def test_resize_maps_area_and_bilinear() -> None:
    maps = np.zeros((2, 4, 4), dtype=np.float32)
    maps[0, :2] = 1.0
    small = resize_maps(maps, (2, 2))
    np.testing.assert_allclose(small[0], [[1, 1], [0, 0]])
    assert resize_maps(maps, (8, 8)).shape == (2, 8, 8)


def test_link_rejects_bad_snr() -> None:
    with pytest.raises(ValueError, match="snr_db"):
        simulate_link(blocky_label_map(), CodecConfig(num_classes=12), ChannelConfig(snr_db=120.0), 0, (32, 48))
