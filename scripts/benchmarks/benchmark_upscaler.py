"""Latency of the upscaling stage on this machine (a benchmark, not a test: numbers vary with load).

Times `Upscaler.__call__` at batch 1 (a 48x64 image and a 96x128 map, the sender's default map
size) and, for comparison, bicubic alone: the median, minimum and 10th/90th percentiles of `--runs`
calls after `--warm-up` calls, with `--threads` torch threads, and the median CPU time a call. The untrained network (same config) is
timed when no checkpoint is given; the weights do not change the cost.

    python -m scripts.benchmarks.benchmark_upscaler --checkpoint models/upscaler-camvid.pt --threads 2 --runs 200
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch

from shared.semantic.upscaler import Upscaler, UpscalerConfig, UpscalerNet, bicubic, count_parameters


def timed(fn, runs: int, warm_up: int) -> dict[str, float]:
    """Wall-clock percentiles, and the median CPU time of the process a call (all threads): on a
    machine shared with other jobs the wall time includes waiting for a core, the CPU time does not."""
    for _ in range(warm_up):
        fn()
    times, cpu = [], []
    for _ in range(runs):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        times.append(1000 * (time.perf_counter() - t0))
        cpu.append(1000 * (time.process_time() - c0))
    p10, p50, p90 = np.percentile(times, [10, 50, 90])
    return {"median_ms": round(float(p50), 2), "p10_ms": round(float(p10), 2), "p90_ms": round(float(p90), 2),
            "min_ms": round(min(times), 2), "median_cpu_ms": round(float(np.median(cpu)), 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--warm-up", type=int, default=20)
    p.add_argument("--map-height", type=int, default=96)
    p.add_argument("--map-width", type=int, default=128)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    up = Upscaler.from_checkpoint(args.checkpoint, "cpu") if args.checkpoint else Upscaler(UpscalerNet(UpscalerConfig()), "cpu")
    cfg = up.config
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, cfg.in_height, cfg.in_width, generator=g) * 2 - 1
    cond = torch.rand(1, cfg.num_classes, args.map_height, args.map_width, generator=g)
    with torch.inference_mode():
        report = {
            "model": up.model_name, "parameters": count_parameters(up.net), "threads": args.threads,
            "batch": 1, "map_size": [args.map_height, args.map_width], "runs": args.runs,
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "load_average_1min": round(os.getloadavg()[0], 2), "torch": torch.__version__,
            "upscaler": timed(lambda: up(image, cond), args.runs, args.warm_up),
            "bicubic": timed(lambda: bicubic(image, 4), args.runs, args.warm_up),
        }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
