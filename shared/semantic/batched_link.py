"""The semantic link of `shared.semantic.link.simulate_link`, over a batch, as tensor operations.

Diffusion training draws a fresh channel realisation for every example of every step. Built one
map at a time on the CPU (`simulate_link`, the reference), 64 conditions take about as long as a
GPU training step, so the GPU waits. Here the whole batch goes through the same steps on the
training device, drawn from the same distribution:

1. codec: one-hot maps of the classes present in each label map (a (B, K) mask: absent maps are
   never sent), area-downsampled by the codec's factor, scaled to unit mean power over the
   present maps' values (`scale_b = 1 / sqrt(mean m^2)`, as `codec._normalise_power`);
2. AWGN: independent N(0, sigma_b^2) noise on every transmitted value of every present map, with
   sigma_b from the SNR as `channels.noise_std_per_real_symbol` computes it (PAPER_PSNR:
   scale_b * 10^(-SNR/20); AVERAGE_POWER: sqrt(P_b / 10^(SNR/10)), P_b the symbols' mean power);
3. inverse codec: divide by scale_b, bilinear back to the label map size when downsampled;
4. FDS (`fds.fds_batched`, absent classes zero) or, without FDS, the noisy maps with absent zeros;
5. resize to the model's resolution (`link.resize_maps`: area when shrinking, bilinear when enlarging).

Only the AWGN channel (the paper's, and the one training uses) is covered. JPEG compression has no
tensor form: with `Compression.JPEG` step 1 runs per example through the reference codec on the
CPU and the rest stays batched. This module imports neither Sionna nor the channel module, so it
runs on machines that only have PyTorch.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from gesco.options import DEFAULT_SNR_DEFINITION, SnrDefinition, names
from shared.limits import MAX_SNR_DB, MIN_SNR_DB
from shared.semantic.codec import CodecConfig, Compression, encode_label_map
from shared.semantic.fds import DEFAULT_FDS_VARIANT, FdsVariant, fds_batched

SNR_DEFINITIONS = names(SnrDefinition)
# On the CPU, batches go through in chunks of this many maps: a 64-map batch's (B, K, H, W)
# tensors are 38 MB at 96x128, far beyond the caches (docs/conditions-timing.md times the batched
# path with these chunks; nothing in the repository times it whole).
CPU_CHUNK = 8


def draw_snr_db(batch_size: int, values_db: Sequence[float], weights: Sequence[float],
                generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """(B,) SNRs drawn independently from `values_db` with probabilities proportional to `weights`."""
    if len(values_db) == 0 or len(values_db) != len(weights):
        raise ValueError(f"need as many weights as SNR values, got {len(weights)} for {len(values_db)}")
    probs = torch.tensor([float(w) for w in weights], dtype=torch.float64)  # checked on the host: no device sync
    if bool((probs < 0).any()) or float(probs.sum()) <= 0:
        raise ValueError(f"SNR weights must be non-negative with a positive sum, not {list(weights)}")
    picks = torch.multinomial((probs / probs.sum()).to(device), batch_size, replacement=True, generator=generator)
    return torch.tensor([float(v) for v in values_db], dtype=torch.float32, device=device)[picks]


def present_maps(labels: torch.Tensor, codec: CodecConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Codec step before power normalisation: (B, K, h, w) float maps (absent classes zero) and the
    (B, K) bool mask of present classes."""
    k, factor = codec.num_classes, codec.downsample_factor
    ids = torch.arange(k, device=labels.device)[None, :, None, None]
    one_hot = (labels[:, None].long() == ids).to(torch.float32)  # contiguous (B, K, H, W)
    present = one_hot.flatten(2).amax(2) > 0
    if codec.compression is Compression.JPEG:
        return _reference_codec_maps(labels, codec).to(labels.device), present
    maps = F.avg_pool2d(one_hot, factor) if factor > 1 else one_hot
    return maps, present


def _reference_codec_maps(labels: torch.Tensor, codec: CodecConfig) -> torch.Tensor:
    """The reference codec's maps per example (JPEG round trip included), un-normalised."""
    out = []
    for label_map in labels.cpu().numpy():
        enc = encode_label_map(label_map, codec)
        h = enc.header
        maps = (enc.symbols.astype(np.float64) / h.scale).astype(np.float32)
        full = np.zeros((codec.num_classes, h.map_height, h.map_width), dtype=np.float32)
        full[list(h.present_class_ids)] = maps.reshape(-1, h.map_height, h.map_width)
        out.append(torch.from_numpy(full))
    return torch.stack(out)


def noise_std(snr_db: torch.Tensor, snr_definition: str, scale: torch.Tensor, power: torch.Tensor) -> torch.Tensor:
    """(B,) noise std per transmitted real symbol, as `channels.noise_std_per_real_symbol`."""
    if snr_definition == SnrDefinition.PAPER_PSNR:
        return scale * torch.pow(10.0, -snr_db / 20.0)
    return torch.sqrt(power / torch.pow(10.0, snr_db / 10.0))


def resize_batch(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """`link.resize_maps` over a batch: area averaging when shrinking, bilinear when enlarging."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    if size[0] <= maps.shape[-2] and size[1] <= maps.shape[-1]:
        return F.interpolate(maps, size=size, mode="area")
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


def batched_conditions(
    labels: torch.Tensor,
    codec: CodecConfig,
    snr_db: torch.Tensor,
    out_size: tuple[int, int],
    snr_definition: str = DEFAULT_SNR_DEFINITION.value,
    use_fds: bool = True,
    fds_variant: FdsVariant = DEFAULT_FDS_VARIANT,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(B, H, W) integer label maps -> (B, K, h, w) float32 model conditions on the labels' device.

    `snr_db` (B,) holds each example's SNR; `generator` (on the labels' device) draws the noise.
    """
    if labels.dim() != 3 or labels.numel() == 0 or labels.is_floating_point():
        raise ValueError(f"labels must be a non-empty (B, H, W) integer tensor, got {labels.dtype} {tuple(labels.shape)}")
    if int(labels.min()) < 0 or int(labels.max()) >= codec.num_classes:
        raise ValueError(f"label ids must lie in [0, {codec.num_classes}), got [{int(labels.min())}, {int(labels.max())}]")
    height, width = labels.shape[-2:]
    if height % codec.downsample_factor or width % codec.downsample_factor:
        raise ValueError(f"downsample_factor {codec.downsample_factor} must divide the label map size {height}x{width}")
    snr_db = torch.as_tensor(snr_db, dtype=torch.float32, device=labels.device).reshape(-1)
    if snr_db.numel() != labels.shape[0]:
        raise ValueError(f"need one SNR per label map, got {snr_db.numel()} for {labels.shape[0]}")
    if not bool(((snr_db >= MIN_SNR_DB) & (snr_db <= MAX_SNR_DB)).all()):
        raise ValueError(f"snr_db must lie in [{MIN_SNR_DB:g}, {MAX_SNR_DB:g}], got {snr_db.tolist()}")
    if snr_definition not in SNR_DEFINITIONS:
        raise ValueError(f"snr_definition must be one of {SNR_DEFINITIONS}, not {snr_definition!r}")

    if labels.device.type == "cpu" and labels.shape[0] > CPU_CHUNK:
        return torch.cat([
            _conditions(labels[i : i + CPU_CHUNK], codec, snr_db[i : i + CPU_CHUNK], out_size, snr_definition, use_fds,
                        fds_variant, generator)
            for i in range(0, labels.shape[0], CPU_CHUNK)
        ])
    return _conditions(labels, codec, snr_db, out_size, snr_definition, use_fds, fds_variant, generator)


def _conditions(labels: torch.Tensor, codec: CodecConfig, snr_db: torch.Tensor, out_size: tuple[int, int],
                snr_definition: str, use_fds: bool, fds_variant: FdsVariant,
                generator: torch.Generator | None) -> torch.Tensor:
    """`batched_conditions` on checked inputs, the whole batch at once."""
    height, width = labels.shape[-2:]
    maps, present = present_maps(labels, codec)
    mask = present[:, :, None, None].to(maps.dtype)
    num_values = present.sum(1).to(maps.dtype) * maps.shape[-2] * maps.shape[-1]  # transmitted values
    scale = torch.rsqrt(maps.square().sum((1, 2, 3)) / num_values)
    symbols = maps * scale[:, None, None, None]
    power = symbols.square().sum((1, 2, 3)) / num_values
    sigma = noise_std(snr_db, snr_definition, scale, power)
    noise = torch.randn(symbols.shape, generator=generator, device=symbols.device, dtype=symbols.dtype)
    received = (symbols + noise * sigma[:, None, None, None]) * mask
    decoded = received / scale[:, None, None, None]
    if codec.downsample_factor > 1:
        decoded = F.interpolate(decoded, size=(height, width), mode="bilinear", align_corners=False)
    cleaned = fds_batched(decoded, present, variant=fds_variant) if use_fds else decoded
    return resize_batch(cleaned, out_size)

