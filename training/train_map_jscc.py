"""Train the learned map encoder (shared/semantic/map_jscc.py) with an AWGN channel in the loop.

    python -m training.train_map_jscc --ratio 1/24 --cpu-minutes 10 --threads 1 --out models/map-jscc-1-24.pt
    python -m training.train_map_jscc --ratio 1/48 --cpu-minutes 10 --threads 1 --out models/map-jscc-1-48.pt

The encoder takes the one-hot CamVid train label maps at the sender's size (96x128), sends
`MapJscc.encode`'s unit-power symbols through AWGN at an average-power SNR drawn per example
uniformly from [--snr-min, --snr-max] dB, and the decoder is trained with cross-entropy against
the label map at the generator's 48x64 (majority over 2x2 blocks). The ratio fixes the latent's
channels: ratio x 2 x 36,864 / 192 positions. Adam, a cosine schedule over a budget of the
process's CPU time (so a shared, busy machine gets the same training as a quiet one), horizontal
flips. At the end the val split is scored at a few SNRs (decoded-map pixel accuracy and mIoU, void
excluded) and the weights are written in fp16 with that in the meta (models/map-jscc.md).
"""
from __future__ import annotations

import argparse
import math
import shlex
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from shared.semantic.checkpoints import save_checkpoint
from shared.semantic.data import CAMVID_INFO, camvid
from shared.semantic.map_jscc import CHECKPOINT_KIND, MapJscc, MapJsccConfig
from shared.semantic.rate_quality import parse_ratio, ratio_text, source_values
from shared.semantic.segmenter import confusion_matrix, miou


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, H, W) labels -> (B, K, H, W) one-hot maps, the encoder's input."""
    return F.one_hot(labels.long(), num_classes).permute(0, 3, 1, 2).float()


def majority_labels(labels: torch.Tensor, num_classes: int, size: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) labels -> (B, h, w): the most frequent class of each block (ties: the lowest id)."""
    return F.adaptive_avg_pool2d(one_hot(labels, num_classes), size).argmax(1)


def noise_std(snr_db: torch.Tensor) -> torch.Tensor:
    """Noise std per real symbol at an average-power SNR, for unit-power symbols."""
    return torch.pow(10.0, -snr_db / 20.0)


@torch.inference_mode()
def score(model: MapJscc, labels: torch.Tensor, snr_db: float, seed: int) -> dict[str, float]:
    """Decoded-map pixel accuracy and mIoU (void excluded) on `labels` at one SNR."""
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    target = majority_labels(labels, config.num_classes, (config.out_height, config.out_width))
    predictions = []
    for start in range(0, len(labels), 32):
        symbols = model.encode(one_hot(labels[start:start + 32], config.num_classes))
        noisy = symbols + noise_std(torch.tensor(snr_db)) * torch.randn(symbols.shape, generator=generator)
        predictions.append(model.decode(noisy).argmax(1))
    predicted = torch.cat(predictions)
    conf = confusion_matrix(predicted.numpy(), target.numpy(), config.num_classes, CAMVID_INFO.ignore_index)
    return {"pixel_accuracy": float((predicted == target).float().mean()),
            "miou": float(miou(conf, exclude=[CAMVID_INFO.ignore_index]))}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratio", type=parse_ratio, default=parse_ratio("1/24"),
                        help="complex channel uses per source value (fractions allowed)")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--cpu-minutes", type=float, default=10.0, help="training budget in CPU time of this process")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--width", type=int, default=MapJsccConfig.width)
    parser.add_argument("--snr-min", type=float, default=-2.0)
    parser.add_argument("--snr-max", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    base = MapJsccConfig(width=args.width)
    positions = (base.map_height // 8) * (base.map_width // 8)
    channels = args.ratio * 2 * source_values(base.map_height, base.map_width) / positions
    if abs(channels - round(channels)) > 1e-6 or round(channels) < 1:
        parser.error(f"ratio {ratio_text(args.ratio)} needs {channels:g} symbols a position; choose a ratio "
                     f"that is a multiple of 1/{2 * source_values(base.map_height, base.map_width) // positions}")
    config = MapJsccConfig(width=args.width, channels=round(channels))
    size = (config.map_height, config.map_width)
    train = torch.from_numpy(np.asarray(camvid(args.data_root, "train", size=size).labels)).long()
    val = torch.from_numpy(np.asarray(camvid(args.data_root, "val", size=size).labels)).long()
    targets = majority_labels(train, config.num_classes, (config.out_height, config.out_width))
    model = MapJscc(config)
    optimiser = torch.optim.Adam(model.parameters(), lr=args.lr)
    budget_s = args.cpu_minutes * 60
    started, cpu_started = time.monotonic(), time.process_time()
    step, losses = 0, []
    while (elapsed := time.process_time() - cpu_started) < budget_s:
        for group in optimiser.param_groups:  # cosine over the CPU-time budget
            group["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * elapsed / budget_s))
        batch = torch.from_numpy(rng.choice(len(train), args.batch_size, replace=False))
        labels, target = train[batch], targets[batch]
        if rng.random() < 0.5:
            labels, target = labels.flip(-1), target.flip(-1)
        snr = torch.from_numpy(rng.uniform(args.snr_min, args.snr_max, args.batch_size)).float()
        logits = model(one_hot(labels, config.num_classes), noise_std(snr))
        loss = F.cross_entropy(logits, target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
        step += 1
        if step % 100 == 0:
            print(f"step {step}, {elapsed / 60:.1f} CPU min, {(time.monotonic() - started) / 60:.1f} min, "
                  f"loss {np.mean(losses[-100:]):.4f}", file=sys.stderr, flush=True)
    model.eval()
    scores = {f"{snr:g}": score(model, val, snr, args.seed) for snr in (1.0, 5.0, 10.0, 20.0)}
    meta = {"name": f"map-jscc-{ratio_text(args.ratio).replace('/', '-')}", "ratio": ratio_text(args.ratio),
            "steps": step, "cpu_minutes": round((time.process_time() - cpu_started) / 60, 1),
            "wall_minutes": round((time.monotonic() - started) / 60, 1), "batch_size": args.batch_size,
            "snr_db_range": [args.snr_min, args.snr_max], "final_loss": float(np.mean(losses[-100:])),
            "val_decoded_maps_average_power_snr": scores,
            "command": "python -m training.train_map_jscc " + shlex.join(sys.argv[1:] if argv is None else argv)}
    save_checkpoint(args.out, CHECKPOINT_KIND, config, model.state_dict(), meta)
    print(f"wrote {args.out}: {meta}", file=sys.stderr, flush=True)
    return meta


if __name__ == "__main__":
    main()
