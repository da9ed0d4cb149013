"""Size and CPU latency of segmenter checkpoints: parameters, file size, and milliseconds per
192x256 photo at batch 1, through `Segmenter.segment` (what the sender calls: resize to the
network's input size, predict, resize the label map back) and through the network alone.

    python -m scripts.benchmarks.benchmark_segmenter --checkpoints models/segmenter-camvid.pt --threads 2,1 \
        --out docs/benchmarks-segmenter.md

Each number is the median of `--repeats` timed calls after `--warmup` untimed ones. The last
column is what the channels-last memory format (the `Segmenter`'s) saves against the default
contiguous one: forward pass plus per-pixel argmax, the two formats called alternately so that
both see the same machine load, as the mean paired difference and its standard error. The load
average at the start is printed with the table: on a machine shared with other jobs, a run with
as many threads as busy cores is slowed by the other jobs and the median says so.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from shared.semantic.segmenter import Segmenter, count_parameters

PHOTO_SIZE = (192, 256)  # CamVid's resolution in this project, the size of the benchmark photo


def median_ms(fn: Callable[[], object], repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def channels_last_gain(seg: Segmenter, x: torch.Tensor, repeats: int, warmup: int) -> tuple[float, float]:
    """Mean and standard error, in ms, of (channels-last - contiguous) over interleaved calls."""
    contiguous = copy.deepcopy(seg.net).to(memory_format=torch.contiguous_format)
    diffs = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            t0 = time.perf_counter()
            seg.logits(x).argmax(1)
            t1 = time.perf_counter()
            contiguous(x).argmax(1)
            t2 = time.perf_counter()
            if i >= warmup:
                diffs.append(1000 * ((t1 - t0) - (t2 - t1)))
    return statistics.mean(diffs), statistics.stdev(diffs) / math.sqrt(len(diffs))


def benchmark(path: Path, threads: list[int], repeats: int, warmup: int) -> list[str]:
    """Markdown table rows for one checkpoint, one row per thread count."""
    seg = Segmenter.from_checkpoint(path, device="cpu")
    cfg = seg.config
    photo = np.random.default_rng(0).integers(0, 256, (*PHOTO_SIZE, 3), dtype=np.uint8)
    x = torch.rand(1, 3, cfg.input_height, cfg.input_width) * 2 - 1
    rows = []
    for n in threads:
        torch.set_num_threads(n)
        net_ms = median_ms(lambda: seg.logits(x), repeats, warmup)
        segment_ms = median_ms(lambda: seg.segment(photo), repeats, warmup)
        gain, gain_se = channels_last_gain(seg, x, repeats, warmup)
        rows.append(
            f"| `{path}` | {cfg.architecture} | {cfg.input_height}x{cfg.input_width} | {count_parameters(seg.net):,} "
            f"| {path.stat().st_size / 1e6:.1f} | {n} | {segment_ms:.1f} | {net_ms:.1f} "
            f"| {gain:+.1f} ± {gain_se:.1f} |"
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", default="models/segmenter-camvid.pt", help="comma-separated checkpoint paths")
    parser.add_argument("--threads", default="2,1", help="comma-separated torch thread counts")
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--out", default="", help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]
    paths = [Path(p) for p in args.checkpoints.split(",")]
    load = os.getloadavg()[0]
    rows = [row for path in paths for row in benchmark(path, threads, args.repeats, args.warmup)]
    command = (f"python -m scripts.benchmarks.benchmark_segmenter --checkpoints {args.checkpoints} --threads {args.threads} "
               f"--repeats {args.repeats} --warmup {args.warmup}")
    lines = [
        "# Segmenter size and CPU latency",
        "",
        f"Produced by `{command}`. One random {PHOTO_SIZE[0]}x{PHOTO_SIZE[1]} photo at batch 1, CPU, "
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"load average {load:.1f} at the start; median of {args.repeats} calls after {args.warmup} warm-up calls. "
        "`segment` is the sender's call (resize to the input size, predict, resize the label map back); "
        "`net` is the network's forward pass alone at its input size.",
        "",
        "| checkpoint | architecture | input | parameters | file, MB | threads | `segment`, ms | `net`, ms "
        "| channels-last - contiguous, ms |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
        *rows,
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
