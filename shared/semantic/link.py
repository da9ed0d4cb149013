"""The semantic link end to end: codec -> channel -> inverse codec -> FDS -> model condition.

The receiver service and diffusion training both call these functions, so the model is trained on
exactly the conditions the receiver will hand it (same codec, same channel, same FDS).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from shared.semantic.channels import ChannelConfig, ChannelOutput, apply_channel
from shared.semantic.codec import CodecConfig, EncodedMaps, SemanticHeader, decode_present_maps, encode_label_map, reinsert_absent_classes
from shared.semantic.fds import DEFAULT_FDS_VARIANT, FdsVariant, fds


@dataclass(frozen=True)
class ReceivedViews:
    """The receiver's maps at the transmitted resolution, before and after FDS."""

    noisy_maps: np.ndarray  # (K, H, W): decoded symbols, absent classes re-inserted as zeros
    fds_maps: np.ndarray  # (K, H, W): after FDS, or the noisy maps when FDS is off


def received_views(symbols: np.ndarray, header: SemanticHeader, use_fds: bool = True,
                   fds_variant: FdsVariant = DEFAULT_FDS_VARIANT) -> ReceivedViews:
    """Invert the codec on received symbols and clean the maps with FDS."""
    present = decode_present_maps(symbols, header)
    noisy = reinsert_absent_classes(present, header.present_class_ids, header.num_classes)
    if not use_fds:
        return ReceivedViews(noisy_maps=noisy, fds_maps=noisy)
    cleaned = fds(torch.from_numpy(present), header.present_class_ids, header.num_classes, variant=fds_variant)
    return ReceivedViews(noisy_maps=noisy, fds_maps=cleaned.numpy())


def resize_maps(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize (K, H, W) soft maps: area averaging when shrinking, bilinear when enlarging."""
    if maps.shape[1:] == tuple(size):
        return maps.astype(np.float32, copy=False)
    tensor = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))[None]
    shrinking = size[0] <= maps.shape[1] and size[1] <= maps.shape[2]
    mode = "area" if shrinking else "bilinear"
    resized = F.interpolate(tensor, size=size, mode=mode, **({} if shrinking else {"align_corners": False}))
    return resized[0].numpy()


def received_condition(symbols: np.ndarray, header: SemanticHeader, out_size: tuple[int, int],
                       use_fds: bool = True, fds_variant: FdsVariant = DEFAULT_FDS_VARIANT) -> np.ndarray:
    """The (K, h, w) condition the diffusion model gets for these received symbols."""
    return resize_maps(received_views(symbols, header, use_fds, fds_variant).fds_maps, out_size)


@dataclass(frozen=True)
class LinkResult:
    encoded: EncodedMaps
    channel: ChannelOutput
    condition: np.ndarray  # (K, h, w) float32


def simulate_link(label_map: np.ndarray, codec_config: CodecConfig, channel_config: ChannelConfig, seed: int,
                  out_size: tuple[int, int], use_fds: bool = True,
                  fds_variant: FdsVariant = DEFAULT_FDS_VARIANT) -> LinkResult:
    """Send a label map through codec and channel and return what the model will be conditioned on."""
    encoded = encode_label_map(label_map, codec_config)
    received = apply_channel(encoded.symbols, channel_config, seed=seed, map_scale=encoded.header.scale)
    condition = received_condition(received.symbols, encoded.header, out_size, use_fds, fds_variant)
    return LinkResult(encoded=encoded, channel=received, condition=condition)
