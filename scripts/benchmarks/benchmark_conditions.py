"""Time the training conditions: the reference link (`simulate_link`, one map at a time) against
the batched link (shared/semantic/batched_link.py), for one batch of CamVid train label maps.

    python -m scripts.benchmarks.benchmark_conditions --batch 64 --threads 1 --out docs/conditions-timing.md

Both paths draw the SNR per map as training does (training/train_diffusion.py's defaults). The
median of `--repeats` runs is reported, after one warm-up run.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from shared.semantic.batched_link import batched_conditions, draw_snr_db
from shared.semantic.data import camvid
from shared.semantic.device import select_device
from training.train_diffusion import TrainConfig, codec_config, reference_conditions


def median_seconds(fn, repeats: int, device: torch.device) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default="../shared/data/camvid")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="", help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    device = select_device(args.device)
    cfg = TrainConfig()
    labels = torch.from_numpy(camvid(args.data_root, "train", (cfg.link_height, cfg.link_width)).labels[: args.batch].copy())
    rows = []
    for out_size in ((48, 64), (96, 128)):
        cfg = TrainConfig(image_height=out_size[0], image_width=out_size[1])
        rng = np.random.default_rng(0)
        gen = torch.Generator(device).manual_seed(0)
        on_device = labels.to(device)

        def batched() -> torch.Tensor:
            snr = draw_snr_db(len(on_device), cfg.snr_values_db, cfg.snr_weights, gen, device)
            return batched_conditions(on_device, codec_config(cfg), snr, out_size, cfg.snr_definition, generator=gen)

        reference = median_seconds(lambda: reference_conditions(labels, cfg, rng), args.repeats, device)
        fast = median_seconds(batched, args.repeats, device)
        rows.append(f"| {labels.shape[1]}x{labels.shape[2]} -> {out_size[0]}x{out_size[1]} | {len(labels)} "
                    f"| {reference:.3f} | {fast:.4f} | {reference / fast:.2f}x |")
    lines = [
        "# Training conditions: reference link vs batched link",
        "",
        f"One batch of CamVid train label maps through codec, AWGN (SNR drawn per map), inverse codec, FDS and resize. "
        f"Device {device}, {args.threads} torch thread(s), {platform.processor() or platform.machine()}; "
        f"median of {args.repeats} runs; load average {load:.1f} on {os.cpu_count()} cores at the start. Produced by `python -m scripts.benchmarks.benchmark_conditions "
        f"--batch {args.batch} --threads {args.threads} --device {args.device}`.",
        "",
        "| maps -> condition | batch | reference `simulate_link`, s | batched, s | speed-up |",
        "|---|---:|---:|---:|---:|",
        *rows,
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
