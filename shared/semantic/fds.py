"""Fast Denoising Semantic (FDS) block, paper eq. 2: y = Pad(MaxPool(AvgPool(y_hat))).

The received one-hot maps are large 0/1 regions buried in channel noise. AvgPool removes noise
spikes, MaxPool keeps the 1-regions (whose values dominate after averaging), and Pad re-inserts
the absent classes as clean zeros, since the sender never transmitted them.

At a PSNR near 1 dB one pass leaves noise the generator reads as texture and clutter. The
ADAPTIVE variant (the receiver's) estimates the noise from the maps themselves, blind to the
channel as the paper's receiver is, and above `DECIDE_ABOVE_NOISE_STD` lets every pixel decide its
class (the argmax over the present maps) and applies eq. 2 again to that clean one-hot map: the
generator then sees the shape of map it was trained on at high SNR, with the low SNR's errors.
Below the threshold it is eq. 2 as published, which keeps one- and two-pixel-wide classes that a
decision after pooling would drop. docs/fds.md has the measurements behind the threshold.
"""
from __future__ import annotations

import enum
import numbers
from collections.abc import Sequence

import torch
import torch.nn.functional as F


class FdsVariant(str, enum.Enum):
    """PAPER is eq. 2 as published; ARGMAX re-binarises its output one-hot over present classes;
    TWO_PASS applies eq. 2 again to that one-hot map; ADAPTIVE is PAPER, or TWO_PASS for maps whose
    estimated noise std exceeds DECIDE_ABOVE_NOISE_STD."""

    PAPER = "paper"
    ARGMAX = "argmax"
    TWO_PASS = "two_pass"
    ADAPTIVE = "adaptive"


# The noise std per map value (maps in 0/1 units) above which ADAPTIVE decides: midway in dB (7.5
# dB of the paper's PSNR) between 10 dB (std 0.32), where deciding left the generated scenes' mIoU
# where it was, and 5 dB (std 0.56), where it raised it; at 100 dB it lowers it (docs/fds.md).
DECIDE_ABOVE_NOISE_STD = 0.42
# What the receiver, the evaluation and the trainers' links use unless told otherwise.
DEFAULT_FDS_VARIANT = FdsVariant.ADAPTIVE


def fds(
    present_maps: torch.Tensor,
    present_class_ids: Sequence[int] | torch.Tensor,
    num_classes: int,
    avg_kernel: int = 3,
    max_kernel: int = 3,
    variant: FdsVariant = DEFAULT_FDS_VARIANT,
) -> torch.Tensor:
    """Denoise received present maps (C_present, H, W) -> (K, H, W), absent classes zero.

    A 4-D (B, C_present, H, W) input is accepted when every example shares `present_class_ids`;
    batches with per-example classes go through `fds_batched`.
    """
    if present_maps.dim() not in (3, 4):
        raise ValueError(
            "present_maps must be (C_present, H, W) or (B, C_present, H, W), "
            f"got {tuple(present_maps.shape)}"
        )
    batch = present_maps if present_maps.dim() == 4 else present_maps.unsqueeze(0)
    ids = _class_id_list(present_class_ids, num_classes)
    if len(ids) != batch.shape[1]:
        raise ValueError(f"got {len(ids)} present_class_ids for {batch.shape[1]} present maps")
    batch_size, _, height, width = batch.shape
    maps_full = batch.new_zeros(batch_size, num_classes, height, width)
    maps_full[:, ids] = batch
    present_mask = torch.zeros(batch_size, num_classes, dtype=torch.bool, device=batch.device)
    present_mask[:, ids] = True
    denoised = fds_batched(maps_full, present_mask, avg_kernel, max_kernel, variant)
    return denoised if present_maps.dim() == 4 else denoised[0]


def fds_batched(
    maps_full: torch.Tensor,
    present_mask: torch.Tensor,
    avg_kernel: int = 3,
    max_kernel: int = 3,
    variant: FdsVariant = DEFAULT_FDS_VARIANT,
) -> torch.Tensor:
    """Denoise (B, K, H, W) maps whose present classes are `present_mask` (B, K) bool.

    All K maps are pooled at once (pure tensor ops, no loop over the batch) and the absent ones
    are then zeroed, so whatever the absent slots held does not matter.
    """
    _check_batched_inputs(maps_full, present_mask)
    avg_kernel = _checked_kernel(avg_kernel, "avg_kernel")
    max_kernel = _checked_kernel(max_kernel, "max_kernel")
    variant = FdsVariant(variant)
    mask = present_mask[:, :, None, None]
    pooled = _eq2(maps_full, avg_kernel, max_kernel)
    if variant is FdsVariant.PAPER:
        return pooled * mask.to(pooled.dtype)
    if variant is FdsVariant.ARGMAX:
        return _one_hot_over_present(pooled, mask)
    if variant is FdsVariant.TWO_PASS:
        return _eq2(_one_hot_over_present(pooled, mask), avg_kernel, max_kernel) * mask.to(pooled.dtype)
    # ADAPTIVE: the second pass only for the maps whose noise calls for a decision.
    out = pooled * mask.to(pooled.dtype)
    noisy = _noise_std(maps_full, present_mask) > DECIDE_ABOVE_NOISE_STD
    if bool(noisy.any()):
        decided = _one_hot_over_present(pooled[noisy], mask[noisy])
        out[noisy] = _eq2(decided, avg_kernel, max_kernel) * mask[noisy].to(pooled.dtype)
    return out


def estimate_noise_std(maps_full: torch.Tensor, present_mask: torch.Tensor) -> torch.Tensor:
    """(B,) noise std per value of the present maps, from the maps alone.

    The sent maps of a label map sum to 1 at every pixel (one-hot, and still after area
    downsampling and bilinear upsampling), so the sum of the C present received maps minus 1 is the
    sum of C noise values: its mean square over the pixels is C sigma^2, whatever the scene.
    """
    _check_batched_inputs(maps_full, present_mask)
    return _noise_std(maps_full, present_mask)


def _noise_std(maps_full: torch.Tensor, present_mask: torch.Tensor) -> torch.Tensor:
    """`estimate_noise_std` on checked inputs."""
    mask = present_mask[:, :, None, None].to(maps_full.dtype)
    excess = (maps_full * mask).sum(dim=1) - 1.0
    return torch.sqrt(excess.square().mean(dim=(1, 2)) / present_mask.sum(dim=1).to(maps_full.dtype))


def _eq2(maps: torch.Tensor, avg_kernel: int, max_kernel: int) -> torch.Tensor:
    """MaxPool(AvgPool(maps)), 'same'-size; the absent slots are the caller's to zero."""
    averaged = F.avg_pool2d(maps, avg_kernel, stride=1, padding=avg_kernel // 2, count_include_pad=False)
    return F.max_pool2d(averaged, max_kernel, stride=1, padding=max_kernel // 2)


def _one_hot_over_present(maps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Binarise by argmax, never picking an absent class (their zeros could beat noisy maps)."""
    masked = maps.masked_fill(~mask, float("-inf"))
    winners = masked.argmax(dim=1, keepdim=True)
    return torch.zeros_like(maps).scatter_(1, winners, 1.0)


def _check_batched_inputs(maps_full: torch.Tensor, present_mask: torch.Tensor) -> None:
    if maps_full.dim() != 4 or maps_full.numel() == 0:
        raise ValueError(
            f"maps_full must be a non-empty (B, K, H, W) tensor, got {tuple(maps_full.shape)}"
        )
    if not maps_full.is_floating_point():
        raise ValueError(f"maps_full must be a float tensor, got {maps_full.dtype}")
    if present_mask.dtype != torch.bool or tuple(present_mask.shape) != tuple(maps_full.shape[:2]):
        raise ValueError(
            f"present_mask must be a bool (B, K) = {tuple(maps_full.shape[:2])} tensor, "
            f"got {present_mask.dtype} {tuple(present_mask.shape)}"
        )
    if present_mask.device != maps_full.device:
        raise ValueError(
            f"present_mask is on {present_mask.device} but maps_full on {maps_full.device}"
        )
    if not bool(present_mask.any(dim=1).all()):
        raise ValueError("every example needs at least one present class")
    if not bool(torch.isfinite(maps_full).all()):
        raise ValueError("maps_full contains NaN or inf")


def _checked_kernel(kernel: int, name: str) -> int:
    """Odd sizes only: 'same'-size stride-1 pooling needs a centred window."""
    if not _is_int(kernel) or kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"{name} must be an odd integer >= 1, not {kernel!r}")
    return int(kernel)


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _class_id_list(present_class_ids: Sequence[int] | torch.Tensor, num_classes: int) -> list[int]:
    if not _is_int(num_classes) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, not {num_classes!r}")
    if isinstance(present_class_ids, torch.Tensor):
        if present_class_ids.dim() != 1:
            shape = tuple(present_class_ids.shape)
            raise ValueError(f"present_class_ids must be a 1-D tensor of ids, got shape {shape}")
        present_class_ids = present_class_ids.tolist()
    if not all(_is_int(class_id) for class_id in present_class_ids):
        raise ValueError(f"present_class_ids must be integer ids, got {list(present_class_ids)!r}")
    ids = [int(class_id) for class_id in present_class_ids]
    if not ids:
        raise ValueError("present_class_ids is empty")
    if min(ids) < 0 or max(ids) >= num_classes:
        raise ValueError(f"present_class_ids must lie in [0, {num_classes}), got {ids}")
    if len(set(ids)) != len(ids):
        raise ValueError(f"present_class_ids must be unique, got {ids}")
    return ids
