"""What a busy Python thread costs the generator's forward, eager against traced (a benchmark).

A receiver samples on one thread while its gRPC event loop, a Python thread of the same process,
writes the watches' messages. The eager network takes the interpreter lock back after each of its
few hundred operations, so while another thread runs Python it waits for the lock at every
operation; a TorchScript trace (`SemanticImageGenerator.trace`) takes it only to start and return.
This times forwards of the network (a guided batch: 2 x --jobs rows) while a thread runs pure Python
for a share (--duties) of every 100 ms and sleeps the rest: the loop's load, without gRPC.

    python -m scripts.benchmarks.benchmark_interpreter_lock --checkpoint models/diffusion-camvid.pt \\
        --out docs/benchmark-runs/interpreter-lock.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import threading
import time
from pathlib import Path

import numpy as np
import torch

from shared.semantic.diffusion.generator import SemanticImageGenerator

PERIOD_S = 0.1


def busy_python(duty: float, stop: threading.Event) -> None:
    """Run Python (holding the interpreter lock) for `duty` of every PERIOD_S until `stop`."""
    while not stop.is_set():
        end = time.perf_counter() + duty * PERIOD_S
        count = 0
        while time.perf_counter() < end:
            count += 1
        time.sleep((1 - duty) * PERIOD_S)


def forward_ms(network: torch.nn.Module, inputs: tuple[torch.Tensor, ...], runs: int, duty: float) -> float:
    """Median milliseconds of a forward while a thread runs Python `duty` of the time."""
    stop = threading.Event()
    thread = threading.Thread(target=busy_python, args=(duty, stop), daemon=True) if duty > 0 else None
    if thread is not None:
        thread.start()
    times = []
    try:
        with torch.inference_mode():
            for _ in range(runs):
                started = time.perf_counter()
                network(*inputs)
                times.append(1000 * (time.perf_counter() - started))
    finally:
        stop.set()
        if thread is not None:
            thread.join()
    return float(np.median(times))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="models/diffusion-camvid.pt")
    p.add_argument("--jobs", type=int, default=4, help="jobs in a batch; the guided forward has twice the rows")
    p.add_argument("--duties", default="0,0.15,0.5", help="shares of the time the other thread runs Python")
    p.add_argument("--runs", type=int, default=15)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the receivers' runs use one)")
    p.add_argument("--out", default=None, help="write the result as JSON here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    eager = SemanticImageGenerator.load(args.checkpoint, "cpu")
    eager.use_channels_last()
    traced = SemanticImageGenerator.load(args.checkpoint, "cpu")
    traced.use_channels_last()
    traced.trace()
    cfg = eager.config.unet
    rows = 2 * args.jobs
    gen = torch.Generator().manual_seed(0)
    inputs = (torch.randn(rows, cfg.in_channels, cfg.image_height, cfg.image_width, generator=gen),
              torch.randint(0, 1000, (rows,), generator=gen),
              torch.rand(rows, cfg.num_classes, cfg.image_height, cfg.image_width, generator=gen))
    with torch.inference_mode():
        difference = float((eager.network(*inputs) - traced.network(*inputs)).abs().max())
        for _ in range(3):
            eager.network(*inputs)
            traced.network(*inputs)
    rows_out = []
    for duty in (float(d) for d in args.duties.split(",")):
        row = {"python_duty": duty, "eager_ms": round(forward_ms(eager.network, inputs, args.runs, duty), 1),
               "traced_ms": round(forward_ms(traced.network, inputs, args.runs, duty), 1)}
        rows_out.append(row)
        print(json.dumps(row), flush=True)
    for row in rows_out:
        row["eager_slowdown"] = round(row["eager_ms"] / rows_out[0]["eager_ms"] - 1, 3)
        row["traced_slowdown"] = round(row["traced_ms"] / rows_out[0]["traced_ms"] - 1, 3)
    result = {"checkpoint": args.checkpoint, "rows_per_forward": rows, "torch_threads": args.threads,
              "runs": args.runs, "max_abs_difference": difference, "machine": f"{platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} CPUs", "torch": torch.__version__, "results": rows_out}
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
