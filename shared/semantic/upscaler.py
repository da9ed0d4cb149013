"""The receiver's upscaling stage: a generated 48x64 image and its label map in, 192x256 out.

A cascade, as in cascaded diffusion, SR3 and Imagen: the base generator makes a small image, a
second model conditioned on the same semantic map makes it larger. This one is feed-forward so it
fits the CPU: a residual network at 48x64, two x2 pixel-shuffle stages to 96x128 and 192x256, and
SPADE norms (`shared.semantic.diffusion.unet.SpadeGroupNorm`, the base's) conditioned on the
received map resized to each scale, so the edges of small objects come from the map and not from
blur. It predicts a residual over the bicubic enlargement, and starts as bicubic (zero output).

`ImageStage` is the interface a receiver stage implements; `Upscaler` is this network's
implementation, and a few-step diffusion upscaler can be another one.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from shared.semantic.batched_link import resize_batch
from shared.semantic.checkpoints import load_checkpoint
from shared.semantic.device import select_device
from shared.semantic.diffusion.unet import SpadeGroupNorm, zero_module

CHECKPOINT_KIND = "upscaler"


@runtime_checkable
class ImageStage(Protocol):
    """A stage after the generator: images (B, 3, h, w) in [-1, 1] and the received condition
    maps (B, K, h', w') in, images (B, 3, H, W) in [-1, 1] out."""

    name: str  # what the stage does, e.g. "upscale-x4"
    model_name: str  # the model it runs, as its checkpoint names it

    def __call__(self, images: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class UpscalerConfig:
    """Sizes of the network, chosen for a CPU: the shipped defaults take a median of 141 ms (88 ms of
    CPU) an image at batch 1 on one busy thread (docs/upscaler.md; two threads not yet measured idle)."""

    num_classes: int = 12
    in_height: int = 48
    in_width: int = 64
    channels: int = 32  # at the input resolution
    blocks: int = 4  # SPADE residual blocks at the input resolution
    mid_channels: int = 24  # after the first x2
    mid_blocks: int = 2
    out_channels: int = 12  # after the second x2
    spade_hidden: int = 32
    out_spade_hidden: int = 8  # the full-resolution SPADE norm's hidden width (the costly one)

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ValueError("num_classes must be at least 1")
        if min(self.channels, self.mid_channels, self.out_channels, self.spade_hidden, self.out_spade_hidden) < 1:
            raise ValueError("channel counts must be positive")

    @property
    def out_height(self) -> int:
        return 4 * self.in_height

    @property
    def out_width(self) -> int:
        return 4 * self.in_width

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "UpscalerConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"upscaler config has unknown fields {sorted(unknown)}")
        return cls(**data)


class SpadeResBlock(nn.Module):
    """x + conv(silu(conv(silu(SPADE(x, map))))): one SPADE norm a block keeps it cheap."""

    def __init__(self, channels: int, num_classes: int, hidden: int) -> None:
        super().__init__()
        self.norm = SpadeGroupNorm(channels, num_classes, hidden)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = zero_module(nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x: torch.Tensor, semantic: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.silu(self.conv1(F.silu(self.norm(x, semantic)))))


class PixelShuffleUp(nn.Module):
    """x2: a 3x3 convolution to 4x the channels at the low resolution, then pixel shuffle."""

    def __init__(self, channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 4 * out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(F.pixel_shuffle(self.conv(x), 2))


class UpscalerNet(nn.Module):
    """(B, 3, h, w) in [-1, 1] and (B, K, *, *) maps -> (B, 3, 4h, 4w): bicubic plus a learned residual.

    Fully convolutional: it runs on any input size (training uses crops) and any map size (the map
    is resized to each of the three scales: area when shrinking, bilinear when enlarging)."""

    def __init__(self, cfg: UpscalerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        k = cfg.num_classes
        self.input_conv = nn.Conv2d(3, cfg.channels, 3, padding=1)
        self.low = nn.ModuleList(SpadeResBlock(cfg.channels, k, cfg.spade_hidden) for _ in range(cfg.blocks))
        self.up1 = PixelShuffleUp(cfg.channels, cfg.mid_channels)
        self.mid = nn.ModuleList(SpadeResBlock(cfg.mid_channels, k, cfg.spade_hidden) for _ in range(cfg.mid_blocks))
        self.up2 = PixelShuffleUp(cfg.mid_channels, cfg.out_channels)
        self.out_norm = SpadeGroupNorm(cfg.out_channels, k, cfg.out_spade_hidden)
        self.out_conv = zero_module(nn.Conv2d(cfg.out_channels, 3, 3, padding=1))

    def forward(self, images: torch.Tensor, semantic: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2:]
        maps = [resize_batch(semantic, (h * s, w * s)) for s in (1, 2, 4)]
        x = self.input_conv(images)
        for block in self.low:
            x = block(x, maps[0])
        x = self.up1(x)
        for block in self.mid:
            x = block(x, maps[1])
        x = self.up2(x)
        residual = self.out_conv(F.silu(self.out_norm(x, maps[2])))
        return bicubic(images, 4) + residual


def bicubic(images: torch.Tensor, scale: int) -> torch.Tensor:
    """The baseline enlargement (and the network's starting point): bicubic, corners not aligned."""
    return F.interpolate(images, scale_factor=scale, mode="bicubic", align_corners=False)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class Upscaler:
    """The shipped upscaler as an `ImageStage`: float32, eval mode, no gradients."""

    name = "upscale-x4"

    def __init__(self, net: UpscalerNet, device: str | torch.device = "cpu", meta: dict[str, Any] | None = None) -> None:
        self.device = device if isinstance(device, torch.device) else select_device(device)
        self.net = net.to(self.device).float().eval()
        self.config: UpscalerConfig = net.cfg
        self.meta: dict[str, Any] = dict(meta or {})
        self.model_name: str = str(self.meta.get("name", "untrained-upscaler"))

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu") -> "Upscaler":
        payload = load_checkpoint(path, CHECKPOINT_KIND)
        net = UpscalerNet(UpscalerConfig.from_dict(payload["config"]))
        net.load_state_dict(payload["state_dict"])
        return cls(net, device, payload.get("meta", {}))

    def __call__(self, images: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
        """images (B, 3, 48, 64) in [-1, 1] and the received condition maps (B, K, h, w), any h, w
        (after FDS, at the map size the sender used) -> (B, 3, 192, 256) in [-1, 1], on the input's device."""
        cfg = self.config
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, cfg.in_height, cfg.in_width):
            raise ValueError(f"images must be (B, 3, {cfg.in_height}, {cfg.in_width}), got {tuple(images.shape)}")
        if conditions.ndim != 4 or conditions.shape[0] != images.shape[0] or conditions.shape[1] != cfg.num_classes:
            raise ValueError(f"conditions must be (B={images.shape[0]}, {cfg.num_classes}, h, w), got {tuple(conditions.shape)}")
        with torch.inference_mode():
            out = self.net(images.to(self.device, torch.float32), conditions.to(self.device, torch.float32))
            return out.clamp_(-1.0, 1.0).to(images.device)
