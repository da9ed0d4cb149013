"""Int8 post-training quantization of the diffusion model, and how far its images move from fp32.

Calibrates on CamVid train maps sent through the real link (codec, AWGN at the training SNRs in
turn, FDS) while the fp32 model samples them (DDPM over 50 steps by default: it visits more noise
levels than a few-step sampler), writes an int8 checkpoint that `SemanticImageGenerator.load` (and
so the receiver and the evaluation) reads like any other, then samples val maps with both models
from the same seeds and conditions (the model's default sampler unless --sampler) and prints the
mean absolute pixel difference and the PSNR between them. For scale, it prints the same between
two fp32 samples of one condition with different seeds.

    python -m scripts.quantize_model --checkpoint models/diffusion-camvid.pt \
        --out var/diffusion-camvid-int8.pt --calibration 4 --compare 8
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from shared.channels import ChannelConfig
from shared.checkpoints import save_checkpoint
from shared.codec import CodecConfig
from shared.data import CAMVID_INFO, camvid
from shared.diffusion.generator import CHECKPOINT_KIND, SemanticImageGenerator
from shared.diffusion.quantization import quantize_generator
from shared.link import simulate_link

SENDER_MAP_SIZE = (96, 128)  # the sender's default semantic size
TRAINING_SNRS_DB = (1.0, 5.0, 10.0, 15.0, 20.0, 30.0, 100.0)


def link_conditions(data_root: str | None, split: str, count: int, size: tuple[int, int], seed: int,
                    snrs_db: tuple[float, ...]) -> torch.Tensor:
    """(count, K, H, W) conditions of `count` evenly spread scenes, the i-th at snrs_db[i % len]."""
    pairs = camvid(data_root, split, size=SENDER_MAP_SIZE)
    picks = np.linspace(0, len(pairs) - 1, count).round().astype(int)
    codec = CodecConfig(num_classes=CAMVID_INFO.num_classes)
    return torch.from_numpy(np.stack([
        simulate_link(pairs.labels[i], codec, ChannelConfig(snr_db=snrs_db[n % len(snrs_db)]), seed=seed + int(i),
                      out_size=size).condition
        for n, i in enumerate(picks)
    ]))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="models/diffusion-camvid.pt")
    parser.add_argument("--out", default="var/diffusion-camvid-int8.pt")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--calibration", type=int, default=4, help="train scenes sampled to calibrate")
    parser.add_argument("--compare", type=int, default=8, help="val scenes sampled by both models (0: none)")
    parser.add_argument("--compare-snr-db", type=float, default=10.0)
    parser.add_argument("--calibration-sampler", default="ddpm")
    parser.add_argument("--calibration-steps", type=int, default=50)
    parser.add_argument("--sampler", default="", help="sampler of the comparison ('': the model's default)")
    parser.add_argument("--steps", type=int, default=0, help="its steps (0: the sampler's default)")
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    fp32 = SemanticImageGenerator.load(args.checkpoint, "cpu")
    size = (fp32.info.image_height, fp32.info.image_width)
    calibration = link_conditions(args.data_root, "train", args.calibration, size, args.seed, TRAINING_SNRS_DB)
    started = time.perf_counter()
    int8 = quantize_generator(fp32, calibration, [args.seed + i for i in range(args.calibration)],
                              args.calibration_sampler, args.calibration_steps, args.guidance)
    print(f"calibrated on {args.calibration} train scenes ({args.calibration_sampler} {args.calibration_steps} "
          f"steps, guidance {args.guidance:g}) in {time.perf_counter() - started:.0f} s")
    meta = {"name": int8.info.name, "step": fp32.info.training_steps, "quantization": int8.info.quantization,
            "quantized_from": args.checkpoint, "calibration_scenes": args.calibration}
    save_checkpoint(args.out, CHECKPOINT_KIND, fp32.config, int8.network.state_dict(), meta, half=False)
    print(f"wrote {args.out}")
    if not args.compare:
        return

    sampler = args.sampler or fp32.default_sampler
    steps = args.steps or fp32.default_steps(sampler)
    conditions = link_conditions(args.data_root, "val", args.compare, size, args.seed, (args.compare_snr_db,))
    seeds = [args.seed + i for i in range(args.compare)]
    loaded = SemanticImageGenerator.load(args.out, "cpu")
    images = {name: g.generate(conditions, sampler, steps, args.guidance, seeds)
              for name, g in (("fp32", fp32), ("int8", loaded))}
    reseeded = fp32.generate(conditions, sampler, steps, args.guidance, [s + 1000 for s in seeds])
    for label, a, b in (("int8 vs fp32, same seeds", images["int8"], images["fp32"]),
                        ("fp32 vs fp32, other seeds", reseeded, images["fp32"])):
        mad = [float(np.abs(x.astype(np.int16) - y.astype(np.int16)).mean()) for x, y in zip(a, b)]
        db = [psnr(x, y) for x, y in zip(a, b)]
        print(f"{label}: mean |difference| {np.mean(mad):.2f} / 255 (max over images {np.max(mad):.2f}), "
              f"PSNR {np.mean(db):.1f} dB (min {np.min(db):.1f}) over {args.compare} val scenes at "
              f"{args.compare_snr_db:g} dB, {sampler} {steps} steps")


if __name__ == "__main__":
    main()
