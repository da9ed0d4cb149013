"""The whole semantic link (codec -> channel -> inverse codec -> FDS) as training and the receiver
use it, and its batched tensor form for training checked against it."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from shared.semantic.batched_link import SNR_DEFINITIONS, batched_conditions, draw_snr_db
from shared.semantic.channels import ChannelConfig, SnrDefinition, apply_channel
from shared.semantic.codec import CodecConfig, Compression, encode_label_map
from shared.semantic.fds import FdsVariant
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


@pytest.mark.parametrize("snr_db, decided", [(1.0, True), (5.0, True), (10.0, False), (100.0, False)])
def test_the_receivers_fds_decides_only_at_low_snr(snr_db: float, decided: bool) -> None:
    """The link's FDS is the receiver's adaptive one: the maps' own noise estimate picks eq. 2 twice
    with a decision between (below 7.5 dB of PSNR) or eq. 2 alone, with no SNR given to it."""
    labels = blocky_label_map()
    encoded = encode_label_map(labels, CodecConfig(num_classes=12))
    received = apply_channel(encoded.symbols, ChannelConfig(snr_db=snr_db), seed=4, map_scale=encoded.header.scale)
    served = received_views(received.symbols, encoded.header).fds_maps
    expected = FdsVariant.TWO_PASS if decided else FdsVariant.PAPER
    other = FdsVariant.PAPER if decided else FdsVariant.TWO_PASS
    np.testing.assert_array_equal(served, received_views(received.symbols, encoded.header, fds_variant=expected).fds_maps)
    assert not np.array_equal(served, received_views(received.symbols, encoded.header, fds_variant=other).fds_maps)


def test_resize_maps_area_and_bilinear() -> None:
    maps = np.zeros((2, 4, 4), dtype=np.float32)
    maps[0, :2] = 1.0
    small = resize_maps(maps, (2, 2))
    np.testing.assert_allclose(small[0], [[1, 1], [0, 0]])
    assert resize_maps(maps, (8, 8)).shape == (2, 8, 8)


def test_link_rejects_bad_snr() -> None:
    with pytest.raises(ValueError, match="snr_db"):
        simulate_link(blocky_label_map(), CodecConfig(num_classes=12), ChannelConfig(snr_db=120.0), 0, (32, 48))


# --- the batched link (shared/semantic/batched_link.py) against simulate_link, the reference ----------


def _label_batch(n: int = 6, height: int = 32, width: int = 48) -> np.ndarray:
    """Blocky maps with different present classes per example (one with a single class)."""
    rng = np.random.default_rng(1)
    maps = []
    for i in range(n):
        classes = (7,) if i == 0 else tuple(rng.choice(12, size=2 + i % 5, replace=False))
        coarse = rng.choice(classes, size=(height // 8, width // 8))
        maps.append(np.kron(coarse, np.ones((8, 8), dtype=np.int64)).astype(np.uint8))
    return np.stack(maps)


def _reference(labels: np.ndarray, codec: CodecConfig, snr_db: float, out_size: tuple[int, int], use_fds: bool,
               definition: str = "paper_psnr", seed: int = 0) -> np.ndarray:
    channel = ChannelConfig(snr_db=snr_db, snr_definition=SnrDefinition(definition))
    return np.stack([simulate_link(m, codec, channel, seed=seed + i, out_size=out_size, use_fds=use_fds).condition
                     for i, m in enumerate(labels)])


@pytest.mark.parametrize("factor", [1, 2])
@pytest.mark.parametrize("use_fds", [True, False])
@pytest.mark.parametrize("out_size", [(16, 24), (32, 48), (64, 96)])
def test_batched_link_equals_reference_without_noise(factor: int, use_fds: bool, out_size: tuple[int, int]) -> None:
    """At 100 dB the only noise is 1e-5 on the 0/1 maps: both paths give the same condition (10
    maps: more than one CPU chunk)."""
    labels = _label_batch(10)
    codec = CodecConfig(num_classes=12, downsample_factor=factor)
    ref = _reference(labels, codec, 100.0, out_size, use_fds)
    got = batched_conditions(torch.from_numpy(labels), codec, torch.full((len(labels),), 100.0), out_size,
                             use_fds=use_fds, generator=torch.Generator().manual_seed(0))
    assert got.shape == ref.shape and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), ref, atol=2e-4)


def test_batched_link_jpeg_falls_back_to_the_reference_codec() -> None:
    labels = _label_batch(3)
    codec = CodecConfig(num_classes=12, downsample_factor=2, compression=Compression.JPEG, jpeg_quality=50)
    ref = _reference(labels, codec, 100.0, (32, 48), True)
    got = batched_conditions(torch.from_numpy(labels), codec, torch.full((3,), 100.0), (32, 48))
    np.testing.assert_allclose(got.numpy(), ref, atol=2e-4)


@pytest.mark.parametrize("definition", ["paper_psnr", "average_power"])
def test_batched_link_noise_matches_reference_statistics(definition: str) -> None:
    """Without FDS the condition is the one-hot maps plus the channel noise (divided by the codec
    scale): per present map the noise std must match the reference's, absent maps stay zero, and
    every map and example gets its own noise (no field shared between maps)."""
    labels = np.repeat(_label_batch(4, 64, 96)[1:], 8, axis=0)  # 24 maps, each label set 8 times
    codec = CodecConfig(num_classes=12)
    snr = 5.0
    clean = np.eye(12, dtype=np.float32)[labels].transpose(0, 3, 1, 2)
    ref = _reference(labels, codec, snr, (64, 96), False, definition) - clean
    got = batched_conditions(torch.from_numpy(labels), codec, torch.full((len(labels),), snr), (64, 96),
                             snr_definition=definition, use_fds=False, generator=torch.Generator().manual_seed(5)).numpy() - clean
    for b, label_map in enumerate(labels):
        present = np.unique(label_map)
        absent = np.setdiff1d(np.arange(12), present)
        assert np.all(got[b, absent] == 0.0)
        ref_std, got_std = ref[b, present].std(axis=(1, 2)), got[b, present].std(axis=(1, 2))
        np.testing.assert_allclose(got_std, ref_std, rtol=0.05)  # 6144 samples a map: ~1 % sampling error
        np.testing.assert_allclose(got[b, present].mean(axis=(1, 2)), 0.0, atol=0.05)
        flat = got[b, present].reshape(len(present), -1)
        corr = np.corrcoef(flat)[~np.eye(len(present), dtype=bool)]
        assert np.abs(corr).max() < 0.06, corr  # independent between maps
    first = np.unique(labels[0])
    between = np.corrcoef(got[0, first].ravel(), got[1, first].ravel())[0, 1]
    assert abs(between) < 0.05  # and between examples with the same labels
    if definition == "paper_psnr":  # the noise on the 0/1 maps is 10^(-SNR/20) whatever the classes
        np.testing.assert_allclose(got[0, first].std(), 10 ** (-snr / 20), rtol=0.03)


def test_draw_snr_db_follows_the_weights() -> None:
    values, weights = (1, 5, 10, 100), (1, 1, 1, 3)
    draws = draw_snr_db(6000, values, weights, torch.Generator().manual_seed(0))
    shares = np.array([(draws == v).float().mean().item() for v in values])
    np.testing.assert_allclose(shares, np.array(weights) / 6, atol=0.02)
    with pytest.raises(ValueError, match="weights"):
        draw_snr_db(4, (1, 5), (1,))


def test_snr_definitions_are_the_channel_modules() -> None:
    assert set(SNR_DEFINITIONS) == {d.value for d in SnrDefinition}


def test_batched_link_rejects_bad_input() -> None:
    codec = CodecConfig(num_classes=12)
    good = torch.from_numpy(_label_batch(2))
    with pytest.raises(ValueError, match="snr_db"):
        batched_conditions(good, codec, torch.tensor([5.0, 120.0]), (16, 24))
    with pytest.raises(ValueError, match="one SNR per label map"):
        batched_conditions(good, codec, torch.tensor([5.0]), (16, 24))
    with pytest.raises(ValueError, match="label ids"):
        batched_conditions(good + 12, codec, torch.tensor([5.0, 5.0]), (16, 24))
    with pytest.raises(ValueError, match="integer"):
        batched_conditions(good.float(), codec, torch.tensor([5.0, 5.0]), (16, 24))
    with pytest.raises(ValueError, match="snr_definition"):
        batched_conditions(good, codec, torch.tensor([5.0, 5.0]), (16, 24), snr_definition="psnr")
    with pytest.raises(ValueError, match="downsample_factor"):
        batched_conditions(good, CodecConfig(num_classes=12, downsample_factor=5), torch.tensor([5.0, 5.0]), (16, 24))
