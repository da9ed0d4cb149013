"""Semantic U-Net: GroupNorm ResBlocks in the encoder, SPADE ResBlocks in the middle and decoder.

After SDM (Wang et al. 2022) as the gesco paper describes it: the timestep scales and shifts the
normalised activations, the semantic map modulates the decoder through spatially-adaptive
normalisation, and self-attention runs at the low resolutions. The network only maps
(x_t, t, y) to (prediction, variance interpolation), the prediction being what the diffusion
process is configured for (`DiffusionConfig.prediction`: the velocity for the shipped models,
or epsilon); it knows nothing about the noise schedule.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class UNetConfig:
    """Sizes of the network; the defaults fit a 2-core CPU at 48x64."""

    num_classes: int = 12
    image_height: int = 48
    image_width: int = 64
    in_channels: int = 3
    model_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 1
    attention_downsample: tuple[int, ...] = (4, 8)  # resolutions (as downsampling factors) with attention
    head_channels: int = 64
    spade_hidden: int = 32
    dropout: float = 0.0
    learn_sigma: bool = True

    def __post_init__(self) -> None:
        levels = len(self.channel_mult) - 1
        if self.image_height % (2**levels) or self.image_width % (2**levels):
            raise ValueError(
                f"image size {self.image_height}x{self.image_width} must be divisible by {2**levels} "
                f"for {len(self.channel_mult)} resolution levels"
            )
        if self.num_classes < 1:
            raise ValueError("num_classes must be at least 1")

    @property
    def out_channels(self) -> int:
        return self.in_channels * (2 if self.learn_sigma else 1)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, as in the Transformer."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=timesteps.device, dtype=torch.float32) / half)
    args = timesteps.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def group_norm(channels: int, affine: bool = True) -> nn.GroupNorm:
    groups = 32 if channels % 32 == 0 else math.gcd(channels, 32)
    return nn.GroupNorm(groups, channels, affine=affine)


def zero_module(module: nn.Module) -> nn.Module:
    """Start a residual branch at zero so every block begins as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class SpadeGroupNorm(nn.Module):
    """GroupNorm whose scale and bias are predicted per pixel from the semantic map (SPADE)."""

    def __init__(self, channels: int, num_classes: int, hidden: int) -> None:
        super().__init__()
        self.norm = group_norm(channels, affine=False)
        self.shared = nn.Sequential(nn.Conv2d(num_classes, hidden, 3, padding=1), nn.ReLU())
        self.gamma = nn.Conv2d(hidden, channels, 3, padding=1)
        self.beta = nn.Conv2d(hidden, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, semantic: torch.Tensor) -> torch.Tensor:
        if semantic.shape[-2:] != x.shape[-2:]:
            # Area averaging keeps soft (noisy, FDS-cleaned) maps faithful when shrinking them.
            semantic = F.adaptive_avg_pool2d(semantic, x.shape[-2:])
        features = self.shared(semantic)
        return self.norm(x) * (1 + self.gamma(features)) + self.beta(features)


class ResBlock(nn.Module):
    """Residual block; timestep scale-shift; GroupNorm (encoder) or SPADE (middle, decoder)."""

    def __init__(self, cfg: UNetConfig, channels: int, out_channels: int, emb_channels: int, spade: bool) -> None:
        super().__init__()
        self.spade = spade
        if spade:
            self.in_norm = SpadeGroupNorm(channels, cfg.num_classes, cfg.spade_hidden)
            self.out_norm = SpadeGroupNorm(out_channels, cfg.num_classes, cfg.spade_hidden)
        else:
            self.in_norm = group_norm(channels)
            self.out_norm = group_norm(out_channels)
        self.in_conv = nn.Conv2d(channels, out_channels, 3, padding=1)
        self.emb = nn.Linear(emb_channels, 2 * out_channels)
        self.dropout = nn.Dropout(cfg.dropout)
        self.out_conv = zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)

    def _norm(self, norm: nn.Module, h: torch.Tensor, semantic: torch.Tensor) -> torch.Tensor:
        return norm(h, semantic) if self.spade else norm(h)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, semantic: torch.Tensor) -> torch.Tensor:
        h = self.in_conv(F.silu(self._norm(self.in_norm, x, semantic)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self._norm(self.out_norm, h, semantic) * (1 + scale) + shift
        h = self.out_conv(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all pixels, `head_channels` channels a head."""

    def __init__(self, channels: int, head_channels: int) -> None:
        super().__init__()
        self.heads = max(1, channels // head_channels)
        self.norm = group_norm(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x).reshape(b, c, h * w))
        q, k, v = qkv.reshape(b, 3, self.heads, c // self.heads, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)  # (b, heads, hw, c/heads)
        out = out.transpose(-1, -2).reshape(b, c, h * w)
        return x + self.proj(out).reshape(b, c, h, w)


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """Blocks applied at one resolution: ResBlock then optional attention."""

    def __init__(self, res: ResBlock, attention: AttentionBlock | None) -> None:
        super().__init__()
        self.res = res
        self.attention = attention

    def forward(self, x: torch.Tensor, emb: torch.Tensor, semantic: torch.Tensor) -> torch.Tensor:
        x = self.res(x, emb, semantic)
        return self.attention(x) if self.attention is not None else x


class SemanticUNet(nn.Module):
    """Maps a noisy image x_t, timestep t and K-channel semantic map y to (velocity or epsilon, variance frac)."""

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        ch = cfg.model_channels
        emb_ch = 4 * ch
        self.time_embed = nn.Sequential(nn.Linear(ch, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        self.input_conv = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)

        def attention(channels: int, factor: int) -> AttentionBlock | None:
            return AttentionBlock(channels, cfg.head_channels) if factor in cfg.attention_downsample else None

        self.down = nn.ModuleList()
        skip_channels = [ch]
        factor = 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                self.down.append(Level(ResBlock(cfg, ch, mult * cfg.model_channels, emb_ch, spade=False),
                                       attention(mult * cfg.model_channels, factor)))
                ch = mult * cfg.model_channels
                skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.down.append(Downsample(ch))
                skip_channels.append(ch)
                factor *= 2

        self.middle = nn.ModuleList([
            Level(ResBlock(cfg, ch, ch, emb_ch, spade=True), AttentionBlock(ch, cfg.head_channels)),
            Level(ResBlock(cfg, ch, ch, emb_ch, spade=True), None),
        ])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                out_ch = mult * cfg.model_channels
                self.up.append(Level(ResBlock(cfg, ch + skip_channels.pop(), out_ch, emb_ch, spade=True),
                                     attention(out_ch, factor)))
                ch = out_ch
                if level and i == cfg.num_res_blocks:
                    self.up.append(Upsample(ch))
                    factor //= 2

        self.out = nn.Sequential(group_norm(ch), nn.SiLU(), zero_module(nn.Conv2d(ch, cfg.out_channels, 3, padding=1)))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, semantic: torch.Tensor) -> torch.Tensor:
        """Return (B, out_channels, H, W): the prediction (velocity or epsilon), then the variance
        interpolation in [-1, 1]."""
        emb = self.time_embed(timestep_embedding(timesteps, self.cfg.model_channels))
        h = self.input_conv(x)
        skips = [h]
        for block in self.down:
            h = block(h) if isinstance(block, Downsample) else block(h, emb, semantic)
            skips.append(h)
        for block in self.middle:
            h = block(h, emb, semantic)
        for block in self.up:
            if isinstance(block, Upsample):
                h = block(h)
            else:
                h = block(torch.cat([h, skips.pop()], dim=1), emb, semantic)
        return self.out(h)
