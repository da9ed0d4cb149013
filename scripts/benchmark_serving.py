"""Serving benchmark of the three real services over loopback (not a test: the numbers are the machine's).

Starts channel_sim, receiver_service and sender_service on free loopback ports twice, with dynamic
batching on (--max-batch-size) and off (batch size 1), and sends label maps (and, for the stage
breakdown, a photo) with one fixed sampler, steps and guidance. Per run it measures

- the latency of single requests per stage: the sender's decode/segment/encode and its channel
  RPC, the channel's own stages (from the services' /metrics), the receiver's queue wait, FDS
  decoding, sampling and PNG encoding (from the transmission's status) and the client's end to end;
- the throughput at each --concurrency, with p50/p95/p99 of the end-to-end latency; each level
  stops sending after --requests requests or --max-seconds, whichever comes first.

Then, with the services stopped, the compute bound: steps x the best per-image forward time over
batch sizes (a guided step runs the network on cond + uncond, twice the batch). It prints a
Markdown report with the machine and the command, and writes it to --output when given.

    python -m scripts.benchmark_serving                                       # the recorded run
    python -m scripts.benchmark_serving --steps 2 --concurrency 1 2 --requests 4 --stage-requests 1
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from shared.limits import MAX_STEPS, SamplingOptions
from tests.service_procs import REPO_ROOT, free_port, service_log, start_service, stop_service

EXAMPLES = {"label_map": REPO_ROOT / "examples" / "street_labels.png",
            "photo": REPO_ROOT / "examples" / "street_photo.jpg"}
SENDER_STAGES = ("decode", "segment", "encode", "channel_rpc")
CHANNEL_STAGES = ("assemble", "channel", "forward")
RECEIVER_STAGES = ("queue_wait", "decode_fds", "sample", "png", "total")
FORWARD_BATCH_SIZES = (1, 2, 4, 8, 16)


@dataclass
class Stack:
    """The three running services of one configuration."""

    label: str
    sender_url: str
    receiver_url: str
    channel_metrics_url: str
    processes: list = field(default_factory=list)

    def stop(self) -> None:
        for proc in reversed(self.processes):
            stop_service(proc)


@dataclass
class Level:
    """The outcome of one concurrency level."""

    concurrency: int
    latencies_s: list[float]
    failures: int
    wall_s: float

    @property
    def throughput(self) -> float:
        return len(self.latencies_s) / self.wall_s if self.wall_s > 0 else 0.0

    def percentile_s(self, q: float) -> float:
        return float(np.percentile(self.latencies_s, q)) if self.latencies_s else float("nan")


def start_stack(args: argparse.Namespace, label: str, max_batch_size: int, store_dir: Path) -> Stack:
    """Receiver, channel and sender on fresh loopback ports, wired to each other, all ready."""
    receiver_grpc, receiver_http, channel_port, channel_metrics, sender_port = (free_port() for _ in range(5))
    receiver_url = f"http://127.0.0.1:{receiver_http}"
    stack = Stack(label, f"http://127.0.0.1:{sender_port}", receiver_url, f"http://127.0.0.1:{channel_metrics}/metrics")
    receiver_env = {
        "GESCO_RECEIVER_GRPC_PORT": str(receiver_grpc),
        "GESCO_RECEIVER_HTTP_PORT": str(receiver_http),
        "GESCO_RECEIVER_PUBLIC_URL": receiver_url,
        "GESCO_RECEIVER_STORE_DIR": str(store_dir),
        "GESCO_RECEIVER_CHECKPOINT": args.checkpoint,
        "GESCO_RECEIVER_DEVICE": args.device,
        "GESCO_RECEIVER_TORCH_THREADS": str(args.threads),
        "GESCO_RECEIVER_CHANNELS_LAST": str(args.channels_last),
        "GESCO_RECEIVER_QUEUE_SIZE": str(max(64, 2 * max(args.concurrency))),
        "GESCO_RECEIVER_MAX_BATCH_SIZE": str(max_batch_size),
        "GESCO_RECEIVER_MAX_QUEUE_DELAY_MS": str(args.max_queue_delay_ms),
        "GESCO_RECEIVER_LOG_LEVEL": "WARNING",
    }
    channel_env = {
        "GESCO_CHANNEL_PORT": str(channel_port),
        "GESCO_CHANNEL_METRICS_PORT": str(channel_metrics),
        "GESCO_CHANNEL_RECEIVER_ADDRESS": f"127.0.0.1:{receiver_grpc}",
        "GESCO_CHANNEL_LOG_LEVEL": "WARNING",
    }
    sender_env = {
        "GESCO_SENDER_PORT": str(sender_port),
        "GESCO_SENDER_CHANNEL_ADDRESS": f"127.0.0.1:{channel_port}",
        "GESCO_SENDER_RECEIVER_PUBLIC_URL": receiver_url,
        "GESCO_SENDER_POLL_INTERVAL_S": str(args.poll_interval_s),
        "GESCO_SENDER_STATUS_LONG_POLL_S": str(args.long_poll_s),
        "GESCO_SENDER_API_KEY": "",
        "GESCO_SENDER_LOG_LEVEL": "WARNING",
    }
    try:
        stack.processes.append(start_service("receiver_service", receiver_env, f"{receiver_url}/readyz",
                                             receiver_grpc, timeout=args.start_timeout_s))
        stack.processes.append(start_service("channel_sim", channel_env, grpc_port=channel_port,
                                             timeout=args.start_timeout_s))
        stack.processes.append(start_service("sender_service", sender_env, f"{stack.sender_url}/readyz",
                                             timeout=args.start_timeout_s))
    except BaseException:
        stack.stop()
        raise
    return stack


def send(client: httpx.Client, stack: Stack, args: argparse.Namespace, kind: str, seed: int) -> tuple[float, str]:
    """One transmission with wait=true: (end-to-end seconds, transmission id); raises on an error."""
    form = {"kind": kind, "snr_db": str(args.snr_db), "sampler": args.sampler, "steps": str(args.steps),
            "guidance": str(args.guidance), "seed": str(seed), "wait": "true"}
    path = EXAMPLES[kind]
    started = time.perf_counter()
    response = client.post(f"{stack.sender_url}/v1/transmissions", data=form,
                           files={"file": (path.name, path.read_bytes())})
    elapsed = time.perf_counter() - started
    if response.status_code != 200:
        raise RuntimeError(f"{response.status_code}: {response.text[:300]}")
    return elapsed, response.headers["X-Transmission-Id"]


def stage_totals(url: str) -> dict[str, tuple[float, float]]:
    """(sum of seconds, count) per stage of a service's gesco_stage_duration_seconds histogram."""
    totals: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(httpx.get(url, timeout=10).text):
        if family.name != "gesco_stage_duration_seconds":
            continue
        for sample in family.samples:
            slot = totals.setdefault(sample.labels.get("stage", ""), [0.0, 0.0])
            if sample.name.endswith("_sum"):
                slot[0] = sample.value
            elif sample.name.endswith("_count"):
                slot[1] = sample.value
    return {stage: (total, count) for stage, (total, count) in totals.items()}


def stage_latency(client: httpx.Client, stack: Stack, args: argparse.Namespace, kind: str) -> dict[str, float]:
    """Median milliseconds per stage over --stage-requests requests sent one at a time."""
    samples: dict[str, list[float]] = {}
    metric_sources = [("sender", f"{stack.sender_url}/metrics", SENDER_STAGES),
                      ("channel", stack.channel_metrics_url, CHANNEL_STAGES)]
    for index in range(args.stage_requests):
        before = {name: stage_totals(url) for name, url, _ in metric_sources}
        elapsed, transmission_id = send(client, stack, args, kind, seed=10_000 + index)
        after = {name: stage_totals(url) for name, url, _ in metric_sources}
        for name, _, stages in metric_sources:
            for stage in stages:
                total, count = after[name].get(stage, (0.0, 0.0))
                old_total, old_count = before[name].get(stage, (0.0, 0.0))
                if count > old_count:
                    samples.setdefault(f"{name} {stage}", []).append((total - old_total) * 1000.0)
        status = client.get(f"{stack.receiver_url}/v1/transmissions/{transmission_id}").json()
        for stage in RECEIVER_STAGES:
            if stage in status["timings_ms"]:
                samples.setdefault(f"receiver {stage}", []).append(float(status["timings_ms"][stage]))
        samples.setdefault("client end to end", []).append(elapsed * 1000.0)
    return {stage: statistics.median(values) for stage, values in samples.items()}


def run_level(stack: Stack, args: argparse.Namespace, concurrency: int) -> Level:
    """`concurrency` clients sending label maps back to back until the request or time budget ends."""
    lock = threading.Lock()
    issued, latencies, failures = 0, [], []
    deadline = time.monotonic() + args.max_seconds

    def client_loop() -> None:
        nonlocal issued
        with httpx.Client(timeout=args.request_timeout_s) as client:
            while True:
                with lock:
                    if issued >= args.requests or time.monotonic() > deadline:
                        return
                    issued += 1
                    seed = issued
                try:
                    elapsed, _ = send(client, stack, args, "label_map", seed)
                except (RuntimeError, httpx.HTTPError) as error:
                    with lock:
                        failures.append(str(error))
                    continue
                with lock:
                    latencies.append(elapsed)

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(client_loop) for _ in range(concurrency)]:
            future.result()
    wall = time.perf_counter() - started
    if failures:
        print(f"[{stack.label}, concurrency {concurrency}] {len(failures)} failed, e.g. {failures[0]}", file=sys.stderr)
    return Level(concurrency, latencies, len(failures), wall)


def benchmark_stack(args: argparse.Namespace, label: str, max_batch_size: int) -> tuple[dict, list[Level], dict]:
    """Start one configuration, warm it up, measure stages and levels, stop it."""
    with tempfile.TemporaryDirectory(prefix="gesco-bench-") as store_dir:
        print(f"[{label}] starting the services (max batch size {max_batch_size})", file=sys.stderr)
        stack = start_stack(args, label, max_batch_size, Path(store_dir))
        try:
            with httpx.Client(timeout=args.request_timeout_s) as client:
                model = client.get(f"{stack.receiver_url}/readyz").json().get("model", {})
                for kind in ("photo", "label_map"):  # first calls pay for lazy initialisation
                    send(client, stack, args, kind, seed=0)
                stages = {kind: stage_latency(client, stack, args, kind) for kind in ("photo", "label_map")}
            levels = []
            for concurrency in args.concurrency:
                print(f"[{label}] concurrency {concurrency}", file=sys.stderr)
                levels.append(run_level(stack, args, concurrency))
        except BaseException:
            for proc in stack.processes:
                if proc.poll() is not None:
                    print(service_log(proc)[-3000:], file=sys.stderr)
            raise
        finally:
            stack.stop()
    return stages, levels, model


def compute_bound(args: argparse.Namespace) -> tuple[dict[int, float], float]:
    """Per-image milliseconds of one (guided) network step at each batch size, and images/s."""
    import torch

    from shared.semantic.diffusion.generator import SemanticImageGenerator

    if args.threads:
        torch.set_num_threads(args.threads)
    checkpoint = Path(args.checkpoint)
    generator = SemanticImageGenerator.load(checkpoint if checkpoint.is_file() else None, args.device)
    if args.channels_last:  # as the receiver runs it
        generator.use_channels_last()
    cfg = generator.config.unet
    passes = 1 if args.guidance == 0 else 2
    per_image_ms = {}
    with torch.inference_mode():
        for batch in FORWARD_BATCH_SIZES:
            rows = passes * batch
            x = torch.randn(rows, cfg.in_channels, cfg.image_height, cfg.image_width, device=generator.device)
            t = torch.full((rows,), 500, device=generator.device)
            condition = torch.zeros(rows, cfg.num_classes, cfg.image_height, cfg.image_width, device=generator.device)
            condition[:, 0] = 1
            generator.network(x, t, condition)  # warm-up
            times = []
            for _ in range(args.forward_repeats):
                started = time.perf_counter()
                generator.network(x, t, condition)
                times.append(time.perf_counter() - started)
            per_image_ms[batch] = statistics.median(times) * 1000.0 / batch
    return per_image_ms, 1000.0 / (args.steps * min(per_image_ms.values()))


def machine_summary(args: argparse.Namespace) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = args.threads or torch.get_num_threads()
    return (f"{cpu}; {usable} usable cores of {os.cpu_count()}; {platform.system()} {platform.release()}; "
            f"Python {platform.python_version()}, torch {torch.__version__}; receiver torch threads: {threads}")


def report(args: argparse.Namespace, runs: dict[str, tuple[dict, list[Level], dict]],
           forward_ms: dict[int, float], bound: float) -> str:
    on, off = runs["batching on"], runs["batching off"]
    model = on[2]
    lines = [
        "## Serving benchmark",
        "",
        f"- machine: {machine_summary(args)}",
        f"- command: `{shlex.join(['python', '-m', 'scripts.benchmark_serving', *sys.argv[1:]])}`",
        f"- model: {model.get('name')} (trained: {model.get('trained')}), {model.get('image_height')}x"
        f"{model.get('image_width')}, {model.get('parameters', 0) / 1e6:.2f} M parameters",
        f"- requests: sampler {args.sampler}, {args.steps} steps, guidance {args.guidance:g}, AWGN at "
        f"{args.snr_db:g} dB, `wait=true` (the sender's status requests: long polls of up to {args.long_poll_s:g} s, "
        f"{args.poll_interval_s:g} s apart when one comes back unfinished); batching on: max batch "
        f"size {args.max_batch_size}, max queue delay {args.max_queue_delay_ms:g} ms; off: batch size 1; "
        f"channels_last weights: {args.channels_last}",
        "",
        f"### Latency of one request by stage (ms, median of {args.stage_requests})",
        "",
        "| stage | photo, batching off | label map, batching off | label map, batching on |",
        "| --- | ---: | ---: | ---: |",
    ]
    columns = [off[0]["photo"], off[0]["label_map"], on[0]["label_map"]]
    for stage in dict.fromkeys(key for column in columns for key in column):
        cells = [f"{column[stage]:.1f}" if stage in column else "-" for column in columns]
        lines.append(f"| {stage} | {' | '.join(cells)} |")
    lines += [
        "",
        "### Throughput (label maps)",
        "",
        "| concurrency | batching | requests | failed | images/s | p50 s | p95 s | p99 s | of compute bound |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for level_on, level_off in zip(on[1], off[1]):
        for name, level in (("on", level_on), ("off", level_off)):
            lines.append(
                f"| {level.concurrency} | {name} | {len(level.latencies_s)} | {level.failures} | "
                f"{level.throughput:.3f} | {level.percentile_s(50):.2f} | {level.percentile_s(95):.2f} | "
                f"{level.percentile_s(99):.2f} | {level.throughput / bound:.0%} |")
    lines += ["", "Batching on / off:", "",
              "| concurrency | throughput ratio | p50 latency ratio |", "| ---: | ---: | ---: |"]
    for level_on, level_off in zip(on[1], off[1]):
        ratio = level_on.throughput / level_off.throughput if level_off.throughput else float("nan")
        latency = level_on.percentile_s(50) / level_off.percentile_s(50)
        lines.append(f"| {level_on.concurrency} | {ratio:.2f}x | {latency:.2f}x |")
    best = min(forward_ms, key=forward_ms.get)
    lines += [
        "",
        "### Compute bound",
        "",
        "Per-image time of one network step (the guided step's cond + uncond forward), by batch size, "
        "measured in process with the services stopped:",
        "",
        "| batch | " + " | ".join(str(batch) for batch in forward_ms) + " |",
        "| --- | " + " | ".join("---:" for _ in forward_ms) + " |",
        "| ms per image | " + " | ".join(f"{ms:.1f}" for ms in forward_ms.values()) + " |",
        "",
        f"Compute bound: 1 / ({args.steps} steps x {forward_ms[best]:.1f} ms at batch {best}) = "
        f"**{bound:.3f} images/s** (network only: no sampler arithmetic, FDS, PNG or transport).",
    ]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sampler", default="", help="empty: the receiver's default (docs/sampler-sweep.md)")
    parser.add_argument("--steps", type=int, default=0, help="0: the sampler's default")
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--snr-db", type=float, default=10.0, help="channel SNR in dB (the paper's PSNR)")
    parser.add_argument("--checkpoint", default=str(REPO_ROOT / "models" / "diffusion-camvid.pt"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="receiver torch threads (0: torch's default)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                        help="the receiver's GESCO_RECEIVER_CHANNELS_LAST, also used for the compute bound")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--requests", type=int, default=48, help="most requests per concurrency level")
    parser.add_argument("--max-seconds", type=float, default=300.0, help="stop sending after this long per level")
    parser.add_argument("--stage-requests", type=int, default=3, help="single requests per stage breakdown")
    parser.add_argument("--max-batch-size", type=int, default=8, help="the receiver's batch size with batching on")
    parser.add_argument("--max-queue-delay-ms", type=float, default=10.0)
    parser.add_argument("--poll-interval-s", type=float, default=0.02, help="the sender's wait=true polling")
    parser.add_argument("--long-poll-s", type=float, default=20.0,
                        help="the sender's GESCO_SENDER_STATUS_LONG_POLL_S (0: plain polling every --poll-interval-s)")
    parser.add_argument("--forward-repeats", type=int, default=5)
    parser.add_argument("--request-timeout-s", type=float, default=900.0)
    parser.add_argument("--start-timeout-s", type=float, default=300.0)
    parser.add_argument("--output", type=Path, help="also write the report here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_batch_size < 2:
        raise SystemExit("--max-batch-size must be at least 2 (the off run uses 1)")
    from shared.semantic.diffusion.samplers import resolve  # torch, as the compute bound needs it anyway

    # Named in every request and the report: what the receiver runs by default, said explicitly.
    sampling = resolve(SamplingOptions(sampler=args.sampler, steps=args.steps, guidance=args.guidance), MAX_STEPS)
    args.sampler, args.steps = sampling.sampler, sampling.steps
    runs = {"batching on": benchmark_stack(args, "batching on", args.max_batch_size),
            "batching off": benchmark_stack(args, "batching off", 1)}
    print("[compute bound] timing the network in process", file=sys.stderr)
    forward_ms, bound = compute_bound(args)
    text = report(args, runs, forward_ms, bound)
    print(text)
    if args.output:
        args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
