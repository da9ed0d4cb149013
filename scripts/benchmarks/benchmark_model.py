"""Micro-benchmark of the semantic diffusion model on this machine (not a test: numbers vary).

Prints the parameter count, forward latency at batch 1 and 2 (one guided step runs the network
on 2x the batch), and the time to sample one image with DDIM at 10, 25 and 50 steps and with the default sampler.

    python -m scripts.benchmarks.benchmark_model [--checkpoint models/diffusion-camvid.pt] [--threads 2]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from gesco.options import DEFAULT_GUIDANCE
from shared.limits import SamplingOptions
from shared.semantic.diffusion.generator import SemanticImageGenerator


def timed(fn, repeats: int) -> float:
    """Median wall time of `fn` in milliseconds, after one warm-up call."""
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="models/diffusion-camvid.pt")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    generator = SemanticImageGenerator.load(args.checkpoint, args.device)
    info = generator.info
    cfg = generator.config.unet
    print(f"machine: {platform.machine()} {platform.processor() or ''}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {generator.device}")
    print(f"model: {info.name} (trained: {info.trained}), {info.parameters / 1e6:.2f} M parameters, "
          f"{cfg.image_height}x{cfg.image_width}, K={cfg.num_classes}")

    condition = torch.zeros(2, cfg.num_classes, cfg.image_height, cfg.image_width, device=generator.device)
    condition[:, 0, : cfg.image_height // 2] = 1
    condition[:, 3, cfg.image_height // 2 :] = 1
    with torch.inference_mode():
        for batch in (1, 2):
            x = torch.randn(batch, cfg.in_channels, cfg.image_height, cfg.image_width, device=generator.device)
            t = torch.full((batch,), 500, device=generator.device)
            ms = timed(lambda: generator.network(x, t, condition[:batch]), args.repeats)
            print(f"forward, batch {batch}: {ms:.1f} ms")
    default = generator.resolve(SamplingOptions(guidance=args.guidance))
    for sampling in [SamplingOptions(sampler="ddim", steps=steps, guidance=args.guidance) for steps in (10, 25, 50)] + [default]:
        ms = timed(lambda: generator.generate(condition[:1], sampling, [0]), max(1, args.repeats // 2))
        print(f"{sampling.sampler.upper()} {sampling.steps} steps, guidance {args.guidance} (cond+uncond in one batch-2 forward), "
              f"1 image: {ms / 1000:.2f} s")


if __name__ == "__main__":
    main()
