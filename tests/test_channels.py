"""Tests for shared.semantic.channels: SNR calibration, fading statistics, equalisation, reproducibility."""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sionna.phy import config as sionna_config

from shared.semantic.channels import (
    ChannelConfig,
    ChannelModel,
    SnrDefinition,
    apply_channel,
    noise_std_per_real_symbol,
)

N = 100_000
NUM_CLASSES = 5
MAP_SCALE = math.sqrt(NUM_CLASSES)
FADING = (ChannelModel.RAYLEIGH, ChannelModel.RICIAN, ChannelModel.TDL_OFDM)


def one_hot_symbols(num_symbols: int = N, num_classes: int = NUM_CLASSES, seed: int = 0) -> np.ndarray:
    """What the sender transmits: one-hot 0/1 maps of the present classes, scaled to power 1."""
    labels = np.random.default_rng(seed).integers(num_classes, size=num_symbols // num_classes)
    maps = np.zeros((num_classes, labels.size), dtype=np.float32)
    maps[labels, np.arange(labels.size)] = 1.0
    return (maps.reshape(-1) * math.sqrt(num_classes)).astype(np.float32)


def unit_uses(num_uses: int) -> np.ndarray:
    """Real symbols that pair into the complex use 1 + 0j, so an unequalised output is h."""
    symbols = np.zeros(2 * num_uses, dtype=np.float32)
    symbols[0::2] = 1.0
    return symbols


def gains(model: ChannelModel, num_uses: int, seed: int = 3, **kwargs) -> np.ndarray:
    """Channel gains read off a noiseless, unequalised channel."""
    config = ChannelConfig(model=model, snr_db=100.0, equalize=False, **kwargs)
    out = apply_channel(unit_uses(num_uses), config, seed=seed).symbols
    return out[0::2].astype(np.float64) + 1j * out[1::2]


@pytest.fixture(scope="module")
def symbols() -> np.ndarray:
    x = one_hot_symbols()
    assert x.size == N and abs(float(np.mean(x.astype(np.float64) ** 2)) - 1.0) < 1e-6
    return x


@pytest.mark.parametrize("definition", list(SnrDefinition))
@pytest.mark.parametrize("snr_db", [0.0, 10.0, 30.0])
def test_awgn_measured_snr_matches_request(
    symbols: np.ndarray, definition: SnrDefinition, snr_db: float
) -> None:
    config = ChannelConfig(snr_db=snr_db, snr_definition=definition)
    out = apply_channel(symbols, config, seed=11, map_scale=MAP_SCALE)
    assert abs(out.measured_snr_db - snr_db) < 0.1
    # The noise itself, not only the reported number, has the requested std.
    expected_std = noise_std_per_real_symbol(config, 1.0, MAP_SCALE)
    assert np.std(out.symbols.astype(np.float64) - symbols) == pytest.approx(expected_std, rel=0.01)


@pytest.mark.parametrize("snr_db", [1.0, 10.0, 30.0])
def test_paper_psnr_is_average_power_snr_plus_ten_log_c(symbols: np.ndarray, snr_db: float) -> None:
    paper = ChannelConfig(snr_db=snr_db, snr_definition=SnrDefinition.PAPER_PSNR)
    average = ChannelConfig(snr_db=snr_db, snr_definition=SnrDefinition.AVERAGE_POWER)
    assert noise_std_per_real_symbol(average, 1.0, MAP_SCALE) == pytest.approx(10 ** (-snr_db / 20))
    assert noise_std_per_real_symbol(paper, 1.0, MAP_SCALE) == pytest.approx(MAP_SCALE * 10 ** (-snr_db / 20))

    out = apply_channel(symbols, paper, seed=5, map_scale=MAP_SCALE)
    noise = out.symbols.astype(np.float64) - symbols
    # On the power-normalised symbols a PAPER_PSNR of X dB is an average-power SNR of X - 10 log10 C.
    average_power_snr_db = 10 * math.log10(1.0 / np.mean(noise**2))
    assert average_power_snr_db == pytest.approx(snr_db - 10 * math.log10(NUM_CLASSES), abs=0.1)
    # After the receiver undoes map_scale, the noise on the 0/1 maps has std 10**(-PSNR/20).
    assert np.std(noise / MAP_SCALE) == pytest.approx(10 ** (-snr_db / 20), rel=0.01)


def test_average_power_definition_measures_the_power_instead_of_assuming_one() -> None:
    x = one_hot_symbols() * 3.0  # power 9
    config = ChannelConfig(snr_db=10.0, snr_definition=SnrDefinition.AVERAGE_POWER)
    out = apply_channel(x, config, seed=2)
    assert np.var(out.symbols.astype(np.float64) - x) == pytest.approx(9.0 / 10.0, rel=0.02)
    assert abs(out.measured_snr_db - 10.0) < 0.1


def test_snr_100_is_nearly_noiseless(symbols: np.ndarray) -> None:
    out = apply_channel(symbols, ChannelConfig(snr_db=100.0), seed=1, map_scale=MAP_SCALE)
    assert np.max(np.abs(out.symbols - symbols)) < 1e-3
    assert out.measured_snr_db == pytest.approx(100.0, abs=0.1)


def test_awgn_noise_is_independent_per_symbol(symbols: np.ndarray) -> None:
    config = ChannelConfig(snr_db=0.0, snr_definition=SnrDefinition.AVERAGE_POWER)
    noise = apply_channel(symbols, config, seed=8).symbols.astype(np.float64) - symbols
    assert abs(np.corrcoef(noise[:-1], noise[1:])[0, 1]) < 0.02  # neighbours, incl. re/im of one use
    assert abs(np.corrcoef(noise[0::2], noise[1::2])[0, 1]) < 0.02  # re vs im of each complex use
    assert abs(np.mean(noise)) < 0.02


@pytest.mark.parametrize(
    ("model", "fourth_moment"),
    [
        (ChannelModel.RAYLEIGH, 2.0),
        # Rician K: E|h|^4 = (K^2 + 4K + 2) / (K + 1)^2 with K = 10**(6/10).
        (ChannelModel.RICIAN, (10**1.2 + 4 * 10**0.6 + 2) / (10**0.6 + 1) ** 2),
    ],
)
def test_fading_gain_has_unit_power_and_the_right_distribution(
    model: ChannelModel, fourth_moment: float
) -> None:
    h = gains(model, 50_000, coherence_symbols=1)
    power = np.abs(h) ** 2
    assert np.mean(power) == pytest.approx(1.0, rel=0.03)
    assert np.mean(power**2) == pytest.approx(fourth_moment, rel=0.05)
    assert abs(np.mean(h)) < 0.03  # zero-mean: the LoS phase is uniform per block


def test_rician_with_large_k_approaches_a_constant_magnitude() -> None:
    h = gains(ChannelModel.RICIAN, 5_000, coherence_symbols=1, rician_k_db=30.0)
    assert np.std(np.abs(h)) < 0.03
    assert np.mean(np.abs(h) ** 2) == pytest.approx(1.0, rel=0.02)


@pytest.mark.parametrize("model", [ChannelModel.RAYLEIGH, ChannelModel.RICIAN])
def test_block_fading_holds_the_gain_for_coherence_symbols_uses(model: ChannelModel) -> None:
    h = gains(model, 8 * 50 + 3, coherence_symbols=8)
    full_blocks = h[:400].reshape(50, 8)
    assert np.allclose(full_blocks, full_blocks[:, :1], atol=1e-4)
    assert np.allclose(h[400:], h[400], atol=1e-4)  # the partial last block too
    assert np.min(np.abs(np.diff(full_blocks[:, 0]))) > 1e-4  # independent gains per block


@pytest.mark.parametrize("model", [ChannelModel.RAYLEIGH, ChannelModel.RICIAN])
def test_fading_measured_snr_is_received_snr_and_averages_to_the_request(model: ChannelModel) -> None:
    x = one_hot_symbols()
    # Measured before equalisation, so equalize=False reports the same number more cheaply.
    config = ChannelConfig(model=model, snr_db=10.0, coherence_symbols=1, equalize=False)
    out = apply_channel(x, config, seed=4, map_scale=MAP_SCALE)
    assert abs(out.measured_snr_db - 10.0) < 0.15  # E|h|^2 = 1 over 5e4 independent gains
    equalised = apply_channel(x, replace(config, equalize=True), seed=4, map_scale=MAP_SCALE)
    assert equalised.measured_snr_db == out.measured_snr_db
    few_blocks = replace(config, coherence_symbols=25_000)
    # Two blocks: the realised gain moves the received SNR away from the request.
    measured = [apply_channel(x, few_blocks, seed=s, map_scale=MAP_SCALE).measured_snr_db for s in range(4)]
    assert max(abs(m - 10.0) for m in measured) > 0.3


@pytest.mark.parametrize("model", FADING)
def test_equalised_fading_at_100_db_recovers_the_symbols(symbols: np.ndarray, model: ChannelModel) -> None:
    out = apply_channel(symbols, ChannelConfig(model=model, snr_db=100.0), seed=6, map_scale=MAP_SCALE)
    assert np.mean((out.symbols - symbols) ** 2) < 1e-6
    assert np.max(np.abs(out.symbols - symbols)) < 2e-2


@pytest.mark.parametrize("model", FADING)
def test_unequalised_fading_does_not_recover_the_symbols(symbols: np.ndarray, model: ChannelModel) -> None:
    config = ChannelConfig(model=model, snr_db=100.0, equalize=False)
    out = apply_channel(symbols, config, seed=6, map_scale=MAP_SCALE)
    assert np.mean((out.symbols - symbols) ** 2) > 0.1
    # What the receiver sees is h*c: the received power still averages to the sent power.
    assert np.mean(out.symbols.astype(np.float64) ** 2) == pytest.approx(1.0, rel=0.5)


def test_tdl_ofdm_is_frequency_selective_within_a_slot() -> None:
    h = gains(ChannelModel.TDL_OFDM, 256, num_ofdm_symbols=1, fft_size=256, delay_spread_ns=300.0)
    assert np.ptp(np.abs(h)) > 0.3  # subcarriers see different gains
    assert np.abs(np.diff(h)).max() < 0.5  # but the response is smooth across neighbours


def test_tdl_ofdm_measured_snr_is_near_the_request() -> None:
    config = ChannelConfig(
        model=ChannelModel.TDL_OFDM, snr_db=20.0, snr_definition=SnrDefinition.AVERAGE_POWER
    )
    out = apply_channel(one_hot_symbols(), config, seed=9)
    assert abs(out.measured_snr_db - 20.0) < 2.0  # 14 slots: only the slot gains' spread remains


@pytest.mark.parametrize("model", list(ChannelModel))
@pytest.mark.parametrize("length", [1, 7, 10_001])
def test_odd_and_even_lengths_keep_order_and_length(model: ChannelModel, length: int) -> None:
    x = np.linspace(-1.0, 1.0, length, dtype=np.float32) + 0.5
    out = apply_channel(x, ChannelConfig(model=model, snr_db=100.0), seed=0)
    assert out.symbols.dtype == np.float32 and out.symbols.shape == (length,)
    assert out.channel_uses == math.ceil(length / 2)
    np.testing.assert_allclose(out.symbols, x, atol=2e-2)


@settings(max_examples=20, deadline=None)
@given(
    model=st.sampled_from(list(ChannelModel)),
    x=st.lists(st.floats(-10, 10, width=32), min_size=1, max_size=40).filter(lambda v: any(v)),
)
def test_equalised_high_snr_round_trip_property(model: ChannelModel, x: list[float]) -> None:
    symbols = np.asarray(x, dtype=np.float32)
    out = apply_channel(symbols, ChannelConfig(model=model, snr_db=100.0), seed=1)
    np.testing.assert_allclose(out.symbols, symbols, atol=1e-2 * max(1.0, float(np.abs(symbols).max())))


@pytest.mark.parametrize("model", list(ChannelModel))
def test_same_seed_same_output_different_seed_different_noise(model: ChannelModel) -> None:
    x = one_hot_symbols(20_000)
    config = ChannelConfig(model=model, snr_db=10.0)
    first = apply_channel(x, config, seed=123, map_scale=MAP_SCALE)
    second = apply_channel(x, config, seed=123, map_scale=MAP_SCALE)
    other = apply_channel(x, config, seed=124, map_scale=MAP_SCALE)
    np.testing.assert_array_equal(first.symbols, second.symbols)
    assert first.measured_snr_db == second.measured_snr_db
    assert np.mean(first.symbols != other.symbols) > 0.99


def test_seeding_leaves_torch_and_sionna_generators_untouched() -> None:
    torch_state = torch.get_rng_state()
    sionna_state = sionna_config.torch_rng("cpu").get_state()
    apply_channel(one_hot_symbols(1_000), ChannelConfig(model=ChannelModel.RICIAN, snr_db=5.0), seed=7)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert torch.equal(sionna_config.torch_rng("cpu").get_state(), sionna_state)


def test_concurrent_requests_match_sequential_ones() -> None:
    x = one_hot_symbols(10_000)
    requests = [(ChannelConfig(model=model, snr_db=5.0), seed) for model in ChannelModel for seed in (1, 2)]
    sequential = [apply_channel(x, config, seed).symbols for config, seed in requests]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(lambda request: apply_channel(x, *request).symbols, requests))
    for expected, got in zip(sequential, concurrent):
        np.testing.assert_array_equal(expected, got)


@pytest.mark.parametrize("snr_db", [-10.0, 100.0])
def test_snr_range_edges_are_accepted(snr_db: float) -> None:
    assert ChannelConfig(snr_db=snr_db).snr_db == snr_db


def test_string_values_are_coerced_to_enums() -> None:
    config = ChannelConfig(model="rician", snr_definition="average_power")
    assert config.model is ChannelModel.RICIAN and config.snr_definition is SnrDefinition.AVERAGE_POWER


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"snr_db": -10.5}, "snr_db"),
        ({"snr_db": 100.5}, "snr_db"),
        ({"snr_db": float("nan")}, "snr_db"),
        ({"snr_db": float("inf")}, "snr_db"),
        ({"coherence_symbols": 0}, "coherence_symbols"),
        ({"coherence_symbols": -3}, "coherence_symbols"),
        ({"coherence_symbols": 2.5}, "coherence_symbols"),
        ({"model": "satellite"}, "satellite"),
        ({"snr_definition": "peak"}, "peak"),
        ({"tdl_profile": "Z"}, "tdl_profile"),
        ({"delay_spread_ns": 0.0}, "delay_spread_ns"),
        ({"rician_k_db": float("nan")}, "rician_k_db"),
        ({"fft_size": 0}, "fft_size"),
        ({"equalize": "yes"}, "equalize"),
    ],
)
def test_bad_config_raises_value_error(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ChannelConfig(**kwargs)


@pytest.mark.parametrize(
    ("symbols", "match"),
    [
        (np.array([1.0, np.nan], dtype=np.float32), "NaN or infinite"),
        (np.array([1.0, np.inf], dtype=np.float32), "NaN or infinite"),
        (np.ones((2, 3), dtype=np.float32), "1-D"),
        (np.ones((), dtype=np.float32), "1-D"),
        (np.zeros(0, dtype=np.float32), "empty"),
        (np.ones(4, dtype=np.complex64), "real"),
        (np.zeros(6, dtype=np.float32), "no power"),
    ],
)
def test_bad_symbols_raise_value_error(symbols: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        apply_channel(symbols, ChannelConfig(), seed=0)


@pytest.mark.parametrize("seed", [-1, 2**64, 1.5, True])
def test_bad_seed_raises_value_error(seed: object) -> None:
    with pytest.raises(ValueError, match="seed"):
        apply_channel(np.ones(4, dtype=np.float32), ChannelConfig(), seed=seed)


@pytest.mark.parametrize("map_scale", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_map_scale_raises_value_error(map_scale: float) -> None:
    with pytest.raises(ValueError, match="map_scale"):
        apply_channel(np.ones(4, dtype=np.float32), ChannelConfig(), seed=0, map_scale=map_scale)
    with pytest.raises(ValueError, match="map_scale"):
        noise_std_per_real_symbol(ChannelConfig(), 1.0, map_scale)


@pytest.mark.parametrize("signal_power", [0.0, -1.0, float("nan")])
def test_bad_signal_power_raises_value_error(signal_power: float) -> None:
    with pytest.raises(ValueError, match="signal_power"):
        noise_std_per_real_symbol(ChannelConfig(), signal_power, 1.0)
