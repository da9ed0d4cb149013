"""Int8 post-training quantization of the diffusion model, and how far its images move from fp32.

Calibrates on CamVid train maps sent through the real link (codec, AWGN at the training SNRs in
turn, FDS) while the fp32 model samples them (DDPM over 50 steps by default: it visits more noise
levels than a few-step sampler), writes an int8 checkpoint that `SemanticImageGenerator.load` (and
so the receiver and the evaluation) reads like any other, then samples val maps with both models
from the same seeds and conditions (the model's default sampler unless --sampler) and prints the
mean absolute pixel difference and the PSNR between them. For scale, it prints the same between
two fp32 samples of one condition with different seeds. It also prints the convolutions' share of
the weights and the relative RMS error of one int8 forward against fp32.

    python -m scripts.models.quantize_model --checkpoint models/diffusion-camvid.pt \
        --out var/diffusion-camvid-int8.pt --calibration 4 --compare 8

--reduce-range and --all-convolutions measure the recipe's two choices (7-bit activations; the
signal-carrying convolutions in int8 too) on the model in memory and write no checkpoint.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from evaluation.image_quality import psnr
from gesco.options import DEFAULT_GUIDANCE
from shared.limits import SamplingOptions
from shared.semantic.channels import ChannelConfig
from shared.semantic.checkpoints import save_checkpoint
from shared.semantic.codec import CodecConfig
from shared.semantic.data import CAMVID_INFO, camvid
from shared.semantic.diffusion.generator import CHECKPOINT_KIND, SemanticImageGenerator
from shared.semantic.diffusion.quantization import keeps_fp32, quantize_generator
from shared.semantic.link import simulate_link
from training.train_diffusion import TrainConfig

TRAINING = TrainConfig()  # the link the model was trained behind: map size and SNRs
TRAINING_SNRS_DB = tuple(float(snr) for snr in TRAINING.snr_values_db)


def link_conditions(data_root: str | None, split: str, count: int, size: tuple[int, int], seed: int,
                    snrs_db: tuple[float, ...]) -> torch.Tensor:
    """(count, K, H, W) conditions of `count` evenly spread scenes, the i-th at snrs_db[i % len]."""
    pairs = camvid(data_root, split, size=(TRAINING.link_height, TRAINING.link_width))
    picks = np.linspace(0, len(pairs) - 1, count).round().astype(int)
    codec = CodecConfig(num_classes=CAMVID_INFO.num_classes)
    return torch.from_numpy(np.stack([
        simulate_link(pairs.labels[i], codec, ChannelConfig(snr_db=snrs_db[n % len(snrs_db)]), seed=seed + int(i),
                      out_size=size).condition
        for n, i in enumerate(picks)
    ]))


def convolution_shares(network: torch.nn.Module) -> tuple[float, float]:
    """Shares of all weights held by the convolutions, and by those the recipe keeps in fp32."""
    total = sum(p.numel() for p in network.parameters())
    convolutions = {name: module.weight.numel() + (module.bias.numel() if module.bias is not None else 0)
                    for name, module in network.named_modules() if isinstance(module, torch.nn.Conv2d | torch.nn.Conv1d)}
    kept = sum(n for name, n in convolutions.items() if keeps_fp32(name))
    return sum(convolutions.values()) / total, kept / total


def forward_relative_rms(fp32: torch.nn.Module, int8: torch.nn.Module, conditions: torch.Tensor, seed: int) -> float:
    """RMS of the int8 output's error over the RMS of the fp32 output, for one forward at t = 500."""
    x = torch.randn(len(conditions), 3, *conditions.shape[-2:], generator=torch.Generator().manual_seed(seed))
    t = torch.full((len(conditions),), 500)
    with torch.inference_mode():
        reference, quantized = fp32(x, t, conditions), int8(x, t, conditions)
    return float(((quantized - reference).pow(2).mean() / reference.pow(2).mean()).sqrt())


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
    parser.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--reduce-range", action="store_true", help="7-bit activations (no checkpoint written)")
    parser.add_argument("--all-convolutions", action="store_true",
                        help="the input, output and skip convolutions in int8 too (no checkpoint written)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    fp32 = SemanticImageGenerator.load(args.checkpoint, "cpu")
    size = (fp32.info.image_height, fp32.info.image_width)
    conv_share, kept_share = convolution_shares(fp32.network)
    print(f"convolutions hold {100 * conv_share:.1f}% of the weights; the ones kept in fp32 "
          f"{'(none: --all-convolutions)' if args.all_convolutions else f'{100 * kept_share:.1f}%'}")
    calibration = link_conditions(args.data_root, "train", args.calibration, size, args.seed, TRAINING_SNRS_DB)
    started = time.perf_counter()
    int8 = quantize_generator(fp32, calibration, [args.seed + i for i in range(args.calibration)],
                              args.calibration_sampler, args.calibration_steps, args.guidance,
                              reduce_range=args.reduce_range, all_convolutions=args.all_convolutions)
    print(f"calibrated on {args.calibration} train scenes ({args.calibration_sampler} {args.calibration_steps} "
          f"steps, guidance {args.guidance:g}) in {time.perf_counter() - started:.0f} s")
    if args.reduce_range or args.all_convolutions:
        print("an experimental recipe: no checkpoint written; the comparison uses the model in memory")
    else:
        meta = {"name": int8.info.name, "step": fp32.info.training_steps, "quantization": int8.info.quantization,
                "quantized_from": args.checkpoint, "calibration_scenes": args.calibration}
        save_checkpoint(args.out, CHECKPOINT_KIND, fp32.config, int8.network.state_dict(), meta, half=False)
        print(f"wrote {args.out}")
        int8 = SemanticImageGenerator.load(args.out, "cpu")  # compare what the file holds
    if not args.compare:
        return

    sampling = fp32.resolve(SamplingOptions(sampler=args.sampler, steps=args.steps, guidance=args.guidance))
    conditions = link_conditions(args.data_root, "val", args.compare, size, args.seed, (args.compare_snr_db,))
    print(f"one forward at t = 500 on {args.compare} val conditions: relative RMS error of int8 "
          f"{forward_relative_rms(fp32.network, int8.network, conditions, args.seed):.3f}")
    seeds = [args.seed + i for i in range(args.compare)]
    images = {name: g.generate(conditions, sampling, seeds)
              for name, g in (("fp32", fp32), ("int8", int8))}
    reseeded = fp32.generate(conditions, sampling, [s + 1000 for s in seeds])
    for label, a, b in (("int8 vs fp32, same seeds", images["int8"], images["fp32"]),
                        ("fp32 vs fp32, other seeds", reseeded, images["fp32"])):
        mad = [float(np.abs(x.astype(np.int16) - y.astype(np.int16)).mean()) for x, y in zip(a, b)]
        db = psnr(a, b)
        print(f"{label}: mean |difference| {np.mean(mad):.2f} / 255 (max over images {np.max(mad):.2f}), "
              f"PSNR {np.mean(db):.1f} dB (min {np.min(db):.1f}) over {args.compare} val scenes at "
              f"{args.compare_snr_db:g} dB, {sampling.sampler} {sampling.steps} steps")


if __name__ == "__main__":
    main()
