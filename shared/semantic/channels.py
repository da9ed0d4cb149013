"""Physical channels between sender and receiver, built on Sionna (PyTorch backend).

The sender transmits a 1-D array of real symbols; this module pairs them into complex channel
uses, passes them through AWGN, flat block fading (Rayleigh or Rician) or a 3GPP TDL channel over
OFDM, optionally equalises with perfect channel knowledge, and returns real symbols in the
original order. The SNR can be set in two definitions (see docs/snr-definitions.md) because the
paper's PSNR refers to the un-normalised 0/1 maps, not to the transmitted power.
"""
from __future__ import annotations

import contextlib
import functools
import math
import operator
import threading
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple

import numpy as np
import torch
from sionna.phy import config as sionna_config
from sionna.phy.channel import (
    AWGN,
    ApplyOFDMChannel,
    GenerateOFDMChannel,
    RayleighBlockFading,
)
from sionna.phy.channel.tr38901 import TDL
from sionna.phy.mimo import StreamManagement, zf_equalizer
from sionna.phy.ofdm import ResourceGrid, ResourceGridDemapper, ResourceGridMapper, ZFEqualizer
from sionna.phy.utils import uniform

from gesco.options import (
    DEFAULT_CHANNEL,
    DEFAULT_RICIAN_K_DB,
    DEFAULT_SNR_DB,
    DEFAULT_SNR_DEFINITION,
    ChannelModel,
    SnrDefinition,
    names,
)
from shared.limits import MAX_SNR_DB, MIN_SNR_DB, InvalidRequestError

TDL_PROFILES = ("A", "B", "C", "D", "E")

# The channel runs on the CPU in single precision whatever Sionna's global defaults are, so a
# seed gives the same output on every machine and small requests pay no device transfers.
_DEVICE = "cpu"
_PRECISION = "single"
# 5G NR normal cyclic prefix: 144 samples per 2048-point FFT.
_NR_CP_FRACTION = 144 / 2048

# Sionna blocks draw from its process-wide generator; this lock makes a seeded call atomic.
_RNG_LOCK = threading.Lock()


@dataclass(frozen=True)
class ChannelConfig:
    """One channel condition; validated on construction so a bad request fails before any work."""

    model: ChannelModel = DEFAULT_CHANNEL
    snr_db: float = DEFAULT_SNR_DB
    snr_definition: SnrDefinition = DEFAULT_SNR_DEFINITION
    equalize: bool = True
    coherence_symbols: int = 256
    rician_k_db: float = DEFAULT_RICIAN_K_DB
    tdl_profile: str = "A"
    delay_spread_ns: float = 100.0
    fft_size: int = 256
    subcarrier_spacing_hz: float = 30e3
    num_ofdm_symbols: int = 14
    carrier_frequency_hz: float = 3.5e9

    def __post_init__(self) -> None:
        # Services build configs from request strings; unknown names are the request's mistake.
        for name, choices in (("model", ChannelModel), ("snr_definition", SnrDefinition)):
            value = getattr(self, name)
            _require(value in names(choices), f"{name} must be one of {list(names(choices))}, got {value!r}")
            object.__setattr__(self, name, choices(value))
        _require(
            _is_real(self.snr_db) and MIN_SNR_DB <= self.snr_db <= MAX_SNR_DB,
            f"snr_db must lie in [{MIN_SNR_DB:g}, {MAX_SNR_DB:g}], got {self.snr_db!r}",
        )
        _require(isinstance(self.equalize, bool), f"equalize must be a bool, got {self.equalize!r}")
        _require(
            _is_real(self.rician_k_db) and math.isfinite(self.rician_k_db),
            f"rician_k_db must be finite, got {self.rician_k_db!r}",
        )
        _require(
            self.tdl_profile in TDL_PROFILES,
            f"tdl_profile must be one of {TDL_PROFILES}, got {self.tdl_profile!r}",
        )
        for name in ("coherence_symbols", "fft_size", "num_ofdm_symbols"):
            _require_count(name, getattr(self, name))
        for name in ("delay_spread_ns", "subcarrier_spacing_hz", "carrier_frequency_hz"):
            _require_positive(name, getattr(self, name))


@dataclass(frozen=True)
class ChannelOutput:
    """What the receiver gets, plus the SNR actually realised, for logging and tests."""

    symbols: np.ndarray  # float32, same length and order as the transmitted real symbols
    measured_snr_db: float  # same definition as requested; fading: received SNR before equalisation
    channel_uses: int  # complex channel uses: ceil(len(symbols) / 2)


def noise_std_per_real_symbol(
    config: ChannelConfig, signal_power: float, map_scale: float
) -> float:
    """Noise std per real transmitted symbol for the requested SNR.

    PAPER_PSNR fixes the noise on the 0/1 maps, so on the transmitted symbols (maps * map_scale)
    it is map_scale * 10**(-PSNR/20) whatever the power; AVERAGE_POWER scales with the power.
    """
    _require_positive("signal_power", signal_power)
    _require_positive("map_scale", map_scale)
    if config.snr_definition is SnrDefinition.PAPER_PSNR:
        return float(map_scale * 10.0 ** (-config.snr_db / 20.0))
    return float(math.sqrt(signal_power / 10.0 ** (config.snr_db / 10.0)))


def apply_channel(
    symbols: np.ndarray, config: ChannelConfig, seed: int, map_scale: float = 1.0
) -> ChannelOutput:
    """Send real symbols through the configured channel.

    The same (symbols, config, seed) always gives the same output, so experiments and service
    requests can be replayed.
    """
    real = _validated_symbols(symbols)
    seed = _validated_seed(seed)
    power = float(np.mean(np.square(real, dtype=np.float64)))
    _require(power > 0, "symbols carry no power (all zeros)")
    sigma = noise_std_per_real_symbol(config, power, map_scale)
    uses = _to_complex(real)
    with _seeded_sionna_rng(seed), torch.inference_mode():
        rx_clean, rx_noisy, out = _MODELS[config.model](uses, 2.0 * sigma**2, config)
    n = real.size
    signal = _to_real(rx_clean)[:n].astype(np.float64)
    noise = _to_real(rx_noisy)[:n].astype(np.float64) - signal
    avg_power_snr_db = 10.0 * math.log10(np.mean(signal**2) / np.mean(noise**2))
    if config.snr_definition is SnrDefinition.PAPER_PSNR:
        # Same conversion as the request: noise referred to map amplitude 1 instead of power P.
        measured = avg_power_snr_db + 10.0 * math.log10(map_scale**2 / power)
    else:
        measured = avg_power_snr_db
    return ChannelOutput(
        symbols=_to_real(out)[:n], measured_snr_db=float(measured), channel_uses=uses.numel()
    )


# Each model returns (noiseless received uses h*c, received uses y = h*c + n, receiver output).
_Received = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _awgn(uses: torch.Tensor, no: float, config: ChannelConfig) -> _Received:
    """The paper's channel: y = c + n."""
    received = _awgn_block()(uses, no)
    return uses, received, received


def _flat_fading(uses: torch.Tensor, no: float, config: ChannelConfig) -> _Received:
    """y = h c + n with h constant over coherence_symbols uses; ZF with perfect CSI if asked."""
    gains = _block_gains(config, uses.numel())
    rx_clean = gains * uses
    received = _awgn_block()(rx_clean, no)
    if not config.equalize:
        return rx_clean, received, received
    noise_cov = torch.full((1, 1), no, dtype=torch.complex64).expand(uses.numel(), 1, 1)
    equalized, _ = zf_equalizer(
        received[:, None], gains[:, None, None], noise_cov, precision=_PRECISION
    )
    return rx_clean, received, equalized[:, 0]


def _block_gains(config: ChannelConfig, num_uses: int) -> torch.Tensor:
    """One CN(0,1) gain per block (Rayleigh), or LoS + scattered with E|h|^2 = 1 (Rician).

    Sionna has no Rician model; the LoS phase is drawn uniformly per block because independent
    blocks stand for independent geometries.
    """
    num_blocks = -(-num_uses // config.coherence_symbols)
    scattered, _ = _rayleigh_block()(batch_size=num_blocks, num_time_steps=1)
    gains = scattered.reshape(num_blocks)
    if config.model is ChannelModel.RICIAN:
        k = 10.0 ** (config.rician_k_db / 10.0)
        # Without a generator argument Sionna draws from its seeded per-device generator.
        phase = uniform([num_blocks], high=2 * math.pi, dtype=torch.float32, device=_DEVICE)
        los = torch.polar(torch.full_like(phase, math.sqrt(k / (k + 1))), phase)
        gains = los + math.sqrt(1 / (k + 1)) * gains
    return gains.repeat_interleave(config.coherence_symbols)[:num_uses]


def _tdl_ofdm(uses: torch.Tensor, no: float, config: ChannelConfig) -> _Received:
    """3GPP TDL on an OFDM grid, one independent channel per slot; ZF per subcarrier if asked."""
    link = _ofdm_link(
        config.tdl_profile, config.delay_spread_ns, config.fft_size, config.subcarrier_spacing_hz,
        config.num_ofdm_symbols, config.carrier_frequency_hz,
    )
    per_slot = link.grid.num_data_symbols
    num_slots = -(-uses.numel() // per_slot)
    # Zero-pad the last slot; the padding is stripped again below.
    data = torch.nn.functional.pad(uses, (0, num_slots * per_slot - uses.numel()))
    tx_grid = link.mapper(data.reshape(num_slots, 1, 1, per_slot))
    h_freq = link.generate(num_slots)
    rx_grid = link.apply(tx_grid, h_freq)
    received_grid = _awgn_block()(rx_grid, no)
    n = uses.numel()
    rx_clean = link.demapper(rx_grid).reshape(-1)[:n]
    received = link.demapper(received_grid).reshape(-1)[:n]
    if not config.equalize:
        return rx_clean, received, received
    # Perfect CSI: the true frequency response is the estimate, with zero error variance.
    equalized, _ = link.equalizer(received_grid, h_freq, 0.0, no)
    return rx_clean, received, equalized.reshape(-1)[:n]


class _OfdmLink(NamedTuple):
    grid: ResourceGrid
    mapper: ResourceGridMapper
    demapper: ResourceGridDemapper
    generate: GenerateOFDMChannel
    apply: ApplyOFDMChannel
    equalizer: ZFEqualizer


@functools.lru_cache(maxsize=16)
def _ofdm_link(
    profile: str, delay_spread_ns: float, fft_size: int, subcarrier_spacing_hz: float,
    num_ofdm_symbols: int, carrier_frequency_hz: float,
) -> _OfdmLink:
    """Build the Sionna OFDM chain once per numerology; building TDL tables per request is slow.

    The frequency-domain channel assumes no inter-symbol interference, so the cyclic prefix is
    made at least as long as the TDL's longest tap (and never shorter than NR's normal prefix).
    """
    tdl = TDL(
        model=profile, delay_spread=delay_spread_ns * 1e-9, carrier_frequency=carrier_frequency_hz,
        precision=_PRECISION, device=_DEVICE,
    )
    sample_rate = fft_size * subcarrier_spacing_hz
    longest_tap = math.ceil(float(tdl.delays.max()) * sample_rate)
    cp_length = max(math.ceil(fft_size * _NR_CP_FRACTION), longest_tap)
    grid = ResourceGrid(
        num_ofdm_symbols=num_ofdm_symbols,
        fft_size=fft_size,
        subcarrier_spacing=subcarrier_spacing_hz,
        cyclic_prefix_length=cp_length,
        precision=_PRECISION,
        device=_DEVICE,
    )
    streams = StreamManagement(np.ones([1, 1], dtype=int), 1)
    return _OfdmLink(
        grid=grid,
        mapper=ResourceGridMapper(grid, precision=_PRECISION, device=_DEVICE),
        demapper=ResourceGridDemapper(grid, streams, precision=_PRECISION, device=_DEVICE),
        generate=GenerateOFDMChannel(
            tdl, grid, normalize_channel=False, precision=_PRECISION, device=_DEVICE
        ),
        apply=ApplyOFDMChannel(precision=_PRECISION, device=_DEVICE),
        equalizer=ZFEqualizer(grid, streams, precision=_PRECISION, device=_DEVICE),
    )


@functools.lru_cache(maxsize=1)
def _awgn_block() -> AWGN:
    return AWGN(precision=_PRECISION, device=_DEVICE)


@functools.lru_cache(maxsize=1)
def _rayleigh_block() -> RayleighBlockFading:
    return RayleighBlockFading(
        num_rx=1, num_rx_ant=1, num_tx=1, num_tx_ant=1, precision=_PRECISION, device=_DEVICE
    )


_MODELS: dict[ChannelModel, Callable[[torch.Tensor, float, ChannelConfig], _Received]] = {
    ChannelModel.AWGN: _awgn,
    ChannelModel.RAYLEIGH: _flat_fading,
    ChannelModel.RICIAN: _flat_fading,
    ChannelModel.TDL_OFDM: _tdl_ofdm,
}


@contextlib.contextmanager
def _seeded_sionna_rng(seed: int) -> Iterator[None]:
    """Seed Sionna's CPU generator for one call and restore it afterwards.

    Sionna blocks take no generator argument; they draw from sionna.phy.config's per-device
    generator. Seeding that generator (not config.seed, which also reseeds torch's global one)
    under a lock keeps concurrent requests reproducible and leaves other Sionna users' streams as
    they were.
    """
    with _RNG_LOCK:
        generator = sionna_config.torch_rng(_DEVICE)
        saved = generator.get_state()
        generator.manual_seed(seed)
        try:
            yield
        finally:
            generator.set_state(saved)


def _to_complex(real: np.ndarray) -> torch.Tensor:
    """Pair real symbols into complex uses z[2i] + j z[2i+1], zero-padding an odd length."""
    padded = np.zeros(real.size + real.size % 2, dtype=np.float32)
    padded[: real.size] = real
    return torch.view_as_complex(torch.from_numpy(padded).reshape(-1, 2))


def _to_real(uses: torch.Tensor) -> np.ndarray:
    """Inverse of _to_complex, keeping the padding (callers strip it)."""
    return torch.view_as_real(uses).reshape(-1).numpy().copy()


def _validated_symbols(symbols: np.ndarray) -> np.ndarray:
    array = np.asarray(symbols)
    _require(array.ndim == 1, f"symbols must be a 1-D array, got shape {array.shape}")
    _require(array.size > 0, "symbols must not be empty")
    _require(array.dtype.kind in "fiu", f"symbols must be real numbers, got dtype {array.dtype}")
    _require(bool(np.all(np.isfinite(array))), "symbols contain NaN or infinite values")
    return array.astype(np.float32, copy=False)


def _validated_seed(seed: int) -> int:
    is_int = isinstance(seed, (int, np.integer)) and not isinstance(seed, bool)
    _require(is_int, f"seed must be an integer, got {seed!r}")
    seed = operator.index(seed)
    _require(0 <= seed < 2**64, f"seed must lie in [0, 2**64), got {seed}")
    return seed


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _require_count(name: str, value: object) -> None:
    is_int = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    _require(is_int and value >= 1, f"{name} must be an integer >= 1, got {value!r}")


def _require_positive(name: str, value: object) -> None:
    _require(
        _is_real(value) and 0 < value < math.inf, f"{name} must be positive and finite, got {value!r}"
    )


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise InvalidRequestError(message)
