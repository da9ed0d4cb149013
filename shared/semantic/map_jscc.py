"""A learned map encoder: deep joint source-channel coding of the one-hot label maps.

Beyond the paper: instead of sending the present-class maps value by value, a small convolutional
encoder turns the K one-hot maps into a fixed number of real symbols (unit mean power per image,
like every other transmission), the channel adds its noise, and a decoder returns K soft maps at
the generator's resolution. Trained with an AWGN channel in the loop (training/train_map_jscc.py),
it feeds the same diffusion model as ours. The number of symbols is fixed by the architecture: a
map of H x W gives (H/8) x (W/8) positions of `channels` real symbols, so with 96x128 maps and
`channels` c the bandwidth ratio is c * 192 / 2 / 36,864 = c / 384 (16: 1/24, 8: 1/48).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shared.semantic.checkpoints import load_checkpoint

CHECKPOINT_KIND = "map-jscc"
TRAINING_COMMAND = "python -m training.train_map_jscc"


@dataclass(frozen=True)
class MapJsccConfig:
    num_classes: int = 12
    map_height: int = 96  # the sender's map size the encoder takes
    map_width: int = 128
    out_height: int = 48  # the generator's resolution the decoder returns
    out_width: int = 64
    channels: int = 16  # real symbols per position of the (H/8) x (W/8) latent
    width: int = 64  # feature channels of the hidden layers

    def __post_init__(self) -> None:
        if self.map_height % 8 or self.map_width % 8:
            raise ValueError(f"the map size must be a multiple of 8, not {self.map_height}x{self.map_width}")
        up_h, up_w = self.out_height * 8 / self.map_height, self.out_width * 8 / self.map_width
        if up_h != up_w or up_h < 1 or not float(up_h).is_integer() or int(up_h) & (int(up_h) - 1):
            raise ValueError(f"the output size {self.out_height}x{self.out_width} must be the latent size "
                             f"{self.map_height // 8}x{self.map_width // 8} times a power of two")

    @property
    def num_symbols(self) -> int:
        """Real symbols per image."""
        return self.channels * (self.map_height // 8) * (self.map_width // 8)


def _block(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.GroupNorm(8, c_out), nn.GELU())


class MapJscc(nn.Module):
    """Encoder (one-hot maps -> unit-power symbols) and decoder (noisy symbols -> class logits).

    The encoder first averages 2x2 blocks (the generator sees 48x64 anyway), then two strided
    convolutions reach the latent at 1/8 of the map size; the decoder doubles it back to the
    generator's resolution. Small on purpose: the shipped ones trained for 10 CPU minutes of one
    thread each (models/map-jscc.md).
    """

    def __init__(self, config: MapJsccConfig) -> None:
        super().__init__()
        self.config = config
        w = config.width
        self.encoder = nn.Sequential(
            nn.AvgPool2d(2), _block(config.num_classes, w, 2), _block(w, w), _block(w, w, 2), _block(w, w),
            nn.Conv2d(w, config.channels, 3, padding=1),
        )
        ups = []
        size = config.map_height // 8
        while size < config.out_height:
            ups += [nn.Upsample(scale_factor=2, mode="nearest"), _block(w, w)]
            size *= 2
        self.decoder = nn.Sequential(_block(config.channels, w), _block(w, w), *ups,
                                     nn.Conv2d(w, config.num_classes, 3, padding=1))

    def encode(self, one_hot: torch.Tensor) -> torch.Tensor:
        """(B, K, H, W) one-hot maps -> (B, num_symbols) real symbols of mean power 1 per image."""
        expected = (self.config.num_classes, self.config.map_height, self.config.map_width)
        if one_hot.ndim != 4 or tuple(one_hot.shape[1:]) != expected:
            raise ValueError(f"maps must have shape (B, {expected[0]}, {expected[1]}, {expected[2]}), "
                             f"got {tuple(one_hot.shape)}")
        latent = self.encoder(one_hot).flatten(1)
        return latent * torch.rsqrt(latent.square().mean(1, keepdim=True) + 1e-12)

    def decode(self, symbols: torch.Tensor) -> torch.Tensor:
        """(B, num_symbols) received symbols -> (B, K, out_h, out_w) class logits."""
        if symbols.ndim != 2 or symbols.shape[1] != self.config.num_symbols:
            raise ValueError(f"symbols must have shape (B, {self.config.num_symbols}), got {tuple(symbols.shape)}")
        c = self.config
        return self.decoder(symbols.reshape(-1, c.channels, c.map_height // 8, c.map_width // 8))

    def forward(self, one_hot: torch.Tensor, noise_std: torch.Tensor) -> torch.Tensor:
        """Training pass: encode, add AWGN of std `noise_std` (B,) per real symbol, decode."""
        symbols = self.encode(one_hot)
        return self.decode(symbols + noise_std[:, None] * torch.randn_like(symbols))

    @torch.inference_mode()
    def condition(self, symbols: torch.Tensor) -> torch.Tensor:
        """Received symbols -> the generator's condition: the decoder's class probabilities."""
        return F.softmax(self.decode(symbols), dim=1)


def load_map_jscc(path: str | Path, shown_as: str | None = None) -> tuple[MapJscc, dict[str, Any]]:
    """The trained encoder and decoder with their meta; FileNotFoundError that says how to make it."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"the learned map encoder's checkpoint {shown_as or path} is missing: "
                                f"train one with `{TRAINING_COMMAND}` (models/map-jscc.md)")
    payload = load_checkpoint(path, CHECKPOINT_KIND)
    config = MapJsccConfig(**{f.name: payload["config"][f.name] for f in dataclasses.fields(MapJsccConfig)})
    model = MapJscc(config)
    model.load_state_dict(payload["state_dict"])
    return model.eval(), payload["meta"]
