"""The names and defaults users choose from: links, channel models, SNR definitions, samplers, guidance.

Each one lives here once, and every front door reads it from here: the channel simulator
(shared/semantic/channels.py), the sampler registry (shared/semantic/diffusion/samplers.py), the
wire format, the sender's REST and gRPC parameters, its `GET /v1/options` (which the web page
builds its lists from), the command line client and the launcher. Standard library only: the
command line client is installed with this package alone, and the sender imports no torch.
"""
from __future__ import annotations

import enum


class ChannelModel(str, enum.Enum):
    """Channel between sender and receiver."""

    AWGN = "awgn"
    RAYLEIGH = "rayleigh"
    RICIAN = "rician"
    TDL_OFDM = "tdl_ofdm"


class SnrDefinition(str, enum.Enum):
    """Which power the SNR in dB refers to (docs/snr-definitions.md)."""

    AVERAGE_POWER = "average_power"  # 10 log10(P / sigma^2), P measured on the transmitted symbols
    PAPER_PSNR = "paper_psnr"  # peak 1 of the un-normalised 0/1 maps: sigma_maps = 10**(-PSNR/20)


class Link(str, enum.Enum):
    """How a scene travels (docs/rate-quality.md compares them at equal channel uses)."""

    MAPS = "maps"  # the paper's present-class maps, sent value by value as analog symbols
    DIGITAL = "digital"  # the label map coded losslessly (LZMA), 5G LDPC + QAM
    LEARNED = "learned"  # the learned map encoder (deep JSCC over the one-hot maps)
    AUTO = "auto"  # with a budget: the representation the rate-quality table expects to do best


LINK_TITLES = {
    Link.MAPS: "present-class maps, analog (the paper)",
    Link.DIGITAL: "label map, LZMA + 5G LDPC + QAM",
    Link.LEARNED: "learned map encoder (deep JSCC)",
    Link.AUTO: "best for the budget and SNR",
}
DEFAULT_LINK = Link.MAPS

CHANNEL_TITLES = {
    ChannelModel.AWGN: "AWGN",
    ChannelModel.RAYLEIGH: "Rayleigh block fading",
    ChannelModel.RICIAN: "Rician block fading",
    ChannelModel.TDL_OFDM: "TDL-OFDM (5G NR)",
}
SNR_DEFINITION_TITLES = {
    SnrDefinition.PAPER_PSNR: "paper's PSNR (peak of the 0/1 maps)",
    SnrDefinition.AVERAGE_POWER: "average power of the symbols",
}
DEFAULT_CHANNEL = ChannelModel.AWGN
DEFAULT_SNR_DEFINITION = SnrDefinition.PAPER_PSNR
DEFAULT_RICIAN_K_DB = 6.0
# The SNR of a request that gives none: a practically noiseless channel.
DEFAULT_SNR_DB = 100.0

# The samplers of shared/semantic/diffusion/samplers.py by name, with their default steps; each
# sampler class there takes its steps from here.
# The distilled sampler's one step scores at least as high as its two on every report (mIoU and FSD;
# docs/sampler-sweep.md, docs/distillation.md) in half the time.
SAMPLER_DEFAULT_STEPS = {"ddim": 10, "dpmpp2m": 20, "ddpm": 50, "distilled": 1}
SAMPLER_TITLES = {"ddim": "DDIM", "dpmpp2m": "DPM-Solver++(2M)", "ddpm": "DDPM",
                  "distilled": "Distilled student (1-2 steps)"}
# Samplers that cannot run more steps than this, whatever the model's chain.
SAMPLER_STEP_LIMITS = {"distilled": 2}
# What a distilled student learns (shared/semantic/diffusion/distilled.py): the trajectory of this
# sampler over this many steps, guided at DEFAULT_GUIDANCE.
DISTILLATION_TEACHER = ("ddim", 10)
# The distilled student, one step: within the bounds of DDIM 10 at every SNR (higher mIoU,
# lower FSD: docs/distillation.md) at a tenth of its sampling time. Where no student serves a job
# (its downsample factor has none, another guidance, no student file) it runs the trajectory the
# student imitates, DISTILLATION_TEACHER: DDIM over 10 steps, the fewest whose mIoU at 10 dB is within
# 0.02 of 1000-step DDPM (docs/sampler-sweep.md: 0.550 against 0.549, about 150x faster).
DEFAULT_SAMPLER = "distilled"
# Classifier-free guidance scale of a request that gives none.
DEFAULT_GUIDANCE = 2.0

# The downsample factors offered in lists (any factor the limits allow is accepted); the receiver
# has condition adapters for some of them (models/diffusion-camvid.md).
DOWNSAMPLE_FACTORS = (1, 2, 4, 8)


def names(choices: type[enum.Enum]) -> tuple[str, ...]:
    """The names of an option's choices, as requests spell them."""
    return tuple(member.value for member in choices)
