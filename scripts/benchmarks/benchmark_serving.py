"""Serving benchmark of the three real services over loopback (not a test: the numbers are the machine's).

Starts channel_sim, receiver_service and sender_service on free loopback ports once per receiver
configuration (--configs): `request` (request-level dynamic batching up to --max-batch-size),
`continuous` (jobs join and leave one running batch at every step, same size) and `off` (request
batching with batch size 1). It sends label maps (and, for the stage breakdown, a photo) with one
fixed sampler, steps and guidance. Per configuration it measures

- the latency of single requests per stage: the sender's decode/segment/encode and its channel
  RPC, the channel's own stages (from the services' /metrics), the receiver's queue wait, FDS
  decoding, sampling and PNG encoding (from the transmission's status) and the client's end to end;
- the throughput at each --concurrency, with p50/p95/p99 of the end-to-end latency; each level
  stops sending after --requests requests or --max-seconds, whichever comes first. The load
  average beside each level says how busy the machine was.

With --profile-dir, py-spy samples each service (all threads, 50 Hz) through the highest
concurrency level of every configuration, that is at saturation; the report lists where each
spent its samples and the raw stacks (flamegraph.pl's collapsed format) stay in the folder.

Then, with the services stopped, the compute bound: the per-image time of one guided network step
at doubling batch sizes until the throughput plateaus (a guided step runs the network on
cond + uncond, twice the batch), and the in-process generator's images/s at the best of them. It
prints a Markdown report with the machine and the command, and writes it to --output when given.

    python -m scripts.benchmarks.benchmark_serving                                       # the recorded run
    python -m scripts.benchmarks.benchmark_serving --steps 2 --concurrency 1 2 --requests 4 --stage-requests 1
    python -m scripts.benchmarks.benchmark_serving --device cuda --receiver-env GESCO_RECEIVER_PRESET=gpu ...
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from gesco.options import DEFAULT_GUIDANCE
from gesco.stack import Ports, RunningStack, free_port, services
from shared.limits import MAX_STEPS, SamplingOptions
from shared.paths import REPO_ROOT

EXAMPLES = {"label_map": REPO_ROOT / "examples" / "street_labels.png",
            "photo": REPO_ROOT / "examples" / "street_photo.jpg"}
SENDER_STAGES = ("decode", "segment", "encode", "channel_rpc")
CHANNEL_STAGES = ("assemble", "channel", "forward")
RECEIVER_STAGES = ("queue_wait", "decode_fds", "sample", "png", "total")
# Receiver configurations: (label, batching mode, whether it uses --max-batch-size or batch 1).
CONFIGS = {"request": ("request batching", "request", True),
           "continuous": ("continuous batching", "continuous", True),
           "off": ("batching off", "request", False)}
SERVICES = ("sender", "channel", "receiver")


@dataclass
class Stack:
    """The three running services of one configuration."""

    label: str
    running: RunningStack
    channel_metrics_url: str

    @property
    def sender_url(self) -> str:
        return self.running.url("sender")

    @property
    def receiver_url(self) -> str:
        return self.running.url("receiver")

    @property
    def processes(self) -> dict[str, subprocess.Popen]:
        return self.running.procs

    def stop(self) -> None:
        self.running.stop()


@dataclass
class Level:
    """The outcome of one concurrency level."""

    concurrency: int
    latencies_s: list[float]
    failures: int
    wall_s: float
    load_average: tuple[float, float]  # 1-minute load average before and after the level

    @property
    def throughput(self) -> float:
        return len(self.latencies_s) / self.wall_s if self.wall_s > 0 else 0.0

    def percentile_s(self, q: float) -> float:
        return float(np.percentile(self.latencies_s, q)) if self.latencies_s else float("nan")


def start_stack(args: argparse.Namespace, label: str, batching: str, max_batch_size: int, folder: Path) -> Stack:
    """Receiver, channel and sender on fresh loopback ports, wired by gesco.stack, all ready."""
    channel_metrics = free_port()
    running = RunningStack(services(Ports.free(), settings={
        "receiver": {
            "GESCO_RECEIVER_STORE_DIR": str(folder / "store"),
            "GESCO_RECEIVER_CHECKPOINT": args.checkpoint,
            "GESCO_RECEIVER_DEVICE": args.device,
            "GESCO_RECEIVER_TORCH_THREADS": str(args.threads),
            "GESCO_RECEIVER_CHANNELS_LAST": str(args.channels_last),
            "GESCO_RECEIVER_QUEUE_SIZE": str(max(64, 2 * max(args.concurrency))),
            "GESCO_RECEIVER_MAX_BATCH_SIZE": str(max_batch_size),
            "GESCO_RECEIVER_MAX_QUEUE_DELAY_MS": str(args.max_queue_delay_ms),
            "GESCO_RECEIVER_BATCHING": batching,
            "GESCO_RECEIVER_LOG_LEVEL": "WARNING",
            **dict(setting.split("=", 1) for setting in args.receiver_env),
        },
        "channel": {"GESCO_CHANNEL_METRICS_PORT": str(channel_metrics), "GESCO_CHANNEL_LOG_LEVEL": "WARNING"},
        "sender": {
            "GESCO_SENDER_POLL_INTERVAL_S": str(args.poll_interval_s),
            "GESCO_SENDER_STATUS_LONG_POLL_S": str(args.long_poll_s),
            "GESCO_SENDER_API_KEY": "",
            "GESCO_SENDER_LOG_LEVEL": "WARNING",
        },
    }), folder / "logs", timeout_s=args.start_timeout_s)
    return Stack(label, running, f"http://127.0.0.1:{channel_metrics}/metrics")


def send(client: httpx.Client, stack: Stack, args: argparse.Namespace, kind: str, seed: int) -> tuple[float, str]:
    """One transmission with wait=true: (end-to-end seconds, transmission id); raises on an error."""
    form = {"kind": kind, "snr_db": str(args.snr_db), "sampler": args.sampler, "steps": str(args.steps),
            "guidance": str(args.guidance), "seed": str(seed), "wait": "true"}
    if args.downsample_factor:
        form["downsample_factor"] = str(args.downsample_factor)
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
    load_before = os.getloadavg()[0]
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
    return Level(concurrency, latencies, len(failures), wall, (load_before, os.getloadavg()[0]))


@dataclass
class Run:
    """What one receiver configuration measured."""

    stages: dict[str, dict[str, float]]
    levels: list[Level]
    model: dict
    profiles: dict[str, Path] = field(default_factory=dict)  # service -> py-spy's collapsed stacks


def start_profilers(stack: Stack, folder: Path) -> dict[str, tuple[subprocess.Popen, Path]]:
    """py-spy sampling every thread of each service until stopped (SIGINT writes its file)."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    slug = stack.label.replace(" ", "-")
    profilers = {}
    for name, proc in stack.processes.items():
        path = folder / f"{slug}-{name}.txt"
        profilers[name] = (subprocess.Popen(
            [py_spy, "record", "--pid", str(proc.pid), "--rate", "50", "--threads", "--format", "raw",
             "--output", str(path), "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE), path)
    return profilers


def stop_profilers(profilers: dict[str, tuple[subprocess.Popen, Path]]) -> dict[str, Path]:
    written = {}
    for name, (proc, path) in profilers.items():
        proc.send_signal(signal.SIGINT)
        try:
            _, errors = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, errors = proc.communicate()
        if path.is_file():
            written[name] = path
        else:
            print(f"[profile] py-spy wrote nothing for {name}: {errors.decode(errors='replace')[-500:]}", file=sys.stderr)
    return written


def benchmark_stack(args: argparse.Namespace, config: str) -> Run:
    """Start one configuration, warm it up, measure stages and levels (profiling the last), stop it."""
    label, batching, batched = CONFIGS[config]
    max_batch_size = args.max_batch_size if batched else 1
    with tempfile.TemporaryDirectory(prefix="gesco-bench-") as store_dir:
        print(f"[{label}] starting the services (max batch size {max_batch_size})", file=sys.stderr)
        stack = start_stack(args, label, batching, max_batch_size, Path(store_dir))
        try:
            with httpx.Client(timeout=args.request_timeout_s) as client:
                model = client.get(f"{stack.receiver_url}/readyz").json().get("model", {})
                for kind in ("photo", "label_map"):  # first calls pay for lazy initialisation
                    send(client, stack, args, kind, seed=0)
                stages = {kind: stage_latency(client, stack, args, kind) for kind in ("photo", "label_map")}
            run = Run(stages, [], model)
            for concurrency in args.concurrency:
                print(f"[{label}] concurrency {concurrency}", file=sys.stderr)
                profiling = args.profile_dir is not None and concurrency == max(args.concurrency)
                profilers = start_profilers(stack, args.profile_dir) if profiling else {}
                try:
                    run.levels.append(run_level(stack, args, concurrency))
                finally:
                    run.profiles.update(stop_profilers(profilers))
        except BaseException:
            for name, proc in stack.processes.items():
                if proc.poll() is not None:
                    print(stack.running.log(name)[-3000:], file=sys.stderr)
            raise
        finally:
            stack.stop()
    return run


def forward_ms(generator, rows: int, repeats: int) -> float:
    """Median milliseconds of one network call on `rows` rows (after a warm-up call)."""
    import torch

    cfg = generator.config.unet
    device = generator.device
    x = torch.randn(rows, cfg.in_channels, cfg.image_height, cfg.image_width, device=device)
    t = torch.full((rows,), 500, device=device)
    condition = torch.zeros(rows, cfg.num_classes, cfg.image_height, cfg.image_width, device=device)
    condition[:, 0] = 1
    return median_ms(lambda: generator.network(x, t, condition), device, repeats)


def median_ms(fn, device, repeats: int) -> float:
    """Median milliseconds of `fn()` over `repeats` calls after a warm-up call, each timed to the
    end of its device work."""
    fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000.0


def synchronize(device) -> None:
    """Wait for the device's queued work, so that a wall-clock time covers it (CUDA is asynchronous)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Bound:
    """The compute bound: per-image ms of a guided network step by batch, and what it allows."""

    per_image_ms: dict[int, float]
    best_batch: int
    images_per_s: float  # steps x the best per-image step: the network alone
    generator_images_per_s: float  # the in-process generator (sampler maths included) at best_batch


def compute_bound(args: argparse.Namespace) -> Bound:
    """Per-image milliseconds of one (guided) network step at doubling batch sizes, until more
    batch stops paying (the throughput plateau), then the generator itself at the best batch."""
    import torch

    from shared.semantic.diffusion.distilled import load_student
    from shared.semantic.diffusion.generator import SemanticImageGenerator
    from shared.semantic.diffusion.samplers import DistilledSampler

    if args.threads:
        torch.set_num_threads(args.threads)
    checkpoint = Path(args.checkpoint)
    generator = SemanticImageGenerator.load(checkpoint if checkpoint.is_file() else None, args.device)
    if args.sampler == DistilledSampler.name:  # the receiver runs its student, one unguided pass a step
        generator = load_student(generator)
        if generator is None:
            raise SystemExit(f"the {DistilledSampler.name} sampler needs a student beside {checkpoint}")
    if args.channels_last:  # as the receiver runs it
        generator.use_channels_last()
    passes = 1 if args.guidance == 0 or generator.is_student else 2
    per_image_ms: dict[int, float] = {}
    flat, batch = 0, 1
    with torch.inference_mode():
        while batch <= args.max_forward_batch and flat < args.plateau_batches:
            try:
                per_image_ms[batch] = forward_ms(generator, passes * batch, args.forward_repeats) / batch
            except torch.OutOfMemoryError:
                break
            best_before = min((ms for size, ms in per_image_ms.items() if size < batch), default=float("inf"))
            # Less than plateau_gain faster per image than the best smaller batch: one more flat doubling.
            flat = flat + 1 if per_image_ms[batch] > best_before * (1 - args.plateau_gain) else 0
            print(f"[compute bound] batch {batch}: {per_image_ms[batch]:.3f} ms per image", file=sys.stderr)
            batch *= 2
        best = min(per_image_ms, key=per_image_ms.get)
        cfg = generator.config.unet
        conditions = torch.zeros(best, cfg.num_classes, cfg.image_height, cfg.image_width)
        conditions[:, 0] = 1
        sampling = SamplingOptions(sampler=args.sampler, steps=args.steps, guidance=args.guidance)
        generated = best / median_ms(lambda: generator.generate(conditions, sampling, list(range(best))),
                                     generator.device, 1) * 1000.0
    return Bound(per_image_ms, best, 1000.0 / (args.steps * per_image_ms[best]), generated)


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


# Frames of this repository's own code (py-spy names files relative to the service's directory).
OWN_CODE = ("receiver_service/", "sender_service/", "channel_sim/", "shared/")


@dataclass
class Profile:
    """A py-spy raw file summed up: samples per thread, per function on top of the stack (self
    time) and per function of this repository anywhere on the stack (inclusive time)."""

    samples: int
    threads: Counter
    self_time: Counter
    own_inclusive: Counter


def read_profile(path: Path) -> Profile:
    profile = Profile(0, Counter(), Counter(), Counter())
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        thread, *frames = stack.split(";")
        samples = int(count)
        profile.samples += samples
        profile.threads[thread.partition("): ")[2] or thread] += samples
        profile.self_time[_short_frame(frames[-1]) if frames else "(no Python frame)"] += samples
        for frame in {_short_frame(frame, line=False) for frame in frames if any(own in frame for own in OWN_CODE)}:
            profile.own_inclusive[frame] += samples
    return profile


def _short_frame(frame: str, line: bool = True) -> str:
    """`function (path/to/file.py:line)` as `function (file.py:line)`, or `function (file.py)`."""
    name, _, where = frame.partition(" (")
    where = Path(where.rstrip(")")).name
    return f"{name} ({where if line else where.rpartition(':')[0]})" if where else name


def report(args: argparse.Namespace, runs: dict[str, Run], bound: Bound, command: str | None = None) -> str:
    """The Markdown report; `command` is the command line it names (default: this process's)."""
    first = next(iter(runs.values()))
    model = first.model
    labels = {config: CONFIGS[config][0] for config in runs}
    lines = [
        "## Serving benchmark",
        "",
        f"- machine: {machine_summary(args)}",
        f"- command: `{command or shlex.join(['python', '-m', 'scripts.benchmarks.benchmark_serving', *sys.argv[1:]])}`",
        f"- model: {model.get('name')} (trained: {model.get('trained')}), {model.get('image_height')}x"
        f"{model.get('image_width')}, {model.get('parameters', 0) / 1e6:.2f} M parameters",
        f"- requests: sampler {args.sampler}, {args.steps} steps, guidance {args.guidance:g}, AWGN at "
        f"{args.snr_db:g} dB, maps downsampled by {args.downsample_factor or 'the sender default'}, "
        f"`wait=true` (the sender's status requests: long polls of up to {args.long_poll_s:g} s, "
        f"{args.poll_interval_s:g} s apart when one comes back unfinished); request and continuous batching: "
        f"max batch size {args.max_batch_size} (request: max queue delay {args.max_queue_delay_ms:g} ms); "
        f"off: batch size 1; channels_last weights: {args.channels_last}"
        + (f"; receiver settings: {', '.join(f'`{setting}`' for setting in args.receiver_env)}" if args.receiver_env else ""),
        "",
        f"### Latency of one request by stage (ms, median of {args.stage_requests})",
        "",
    ]
    columns = [(f"photo, {labels[config]}", run.stages["photo"]) for config, run in runs.items() if config == "off"]
    columns += [(f"label map, {labels[config]}", run.stages["label_map"]) for config, run in runs.items()]
    lines += ["| stage | " + " | ".join(name for name, _ in columns) + " |",
              "| --- |" + " ---: |" * len(columns)]
    for stage in dict.fromkeys(key for _, column in columns for key in column):
        cells = [f"{column[stage]:.1f}" if stage in column else "-" for _, column in columns]
        lines.append(f"| {stage} | {' | '.join(cells)} |")
    lines += [
        "",
        "### Throughput (label maps)",
        "",
        "| concurrency | batching | requests | failed | images/s | p50 s | p95 s | p99 s | of compute bound | load average before, after |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for index, concurrency in enumerate(args.concurrency):
        for config, run in runs.items():
            level = run.levels[index]
            lines.append(
                f"| {concurrency} | {labels[config]} | {len(level.latencies_s)} | {level.failures} | "
                f"{level.throughput:.3f} | {level.percentile_s(50):.2f} | {level.percentile_s(95):.2f} | "
                f"{level.percentile_s(99):.2f} | {level.throughput / bound.images_per_s:.0%} | "
                f"{level.load_average[0]:.1f}, {level.load_average[1]:.1f} |")
    pairs = [(a, b) for a, b in (("request", "off"), ("continuous", "off"), ("continuous", "request"))
             if a in runs and b in runs]
    if pairs:
        lines += ["", "Ratios (throughput, p50 latency):", "",
                  "| concurrency | " + " | ".join(f"{labels[a]} / {labels[b]}" for a, b in pairs) + " |",
                  "| ---: |" + " ---: |" * len(pairs)]
        for index, concurrency in enumerate(args.concurrency):
            cells = []
            for a, b in pairs:
                mine, theirs = runs[a].levels[index], runs[b].levels[index]
                ratio = mine.throughput / theirs.throughput if theirs.throughput else float("nan")
                cells.append(f"{ratio:.2f}x, {mine.percentile_s(50) / theirs.percentile_s(50):.2f}x")
            lines.append(f"| {concurrency} | {' | '.join(cells)} |")
    lines += [
        "",
        "### Compute bound",
        "",
        "Per-image time of one network step (the guided step's cond + uncond forward), by batch size, "
        f"measured in process with the services stopped, doubling the batch until {args.plateau_batches} "
        f"doublings in a row gained less than {args.plateau_gain:.0%} per image (or batch {args.max_forward_batch}):",
        "",
        "| batch | " + " | ".join(str(batch) for batch in bound.per_image_ms) + " |",
        "| --- | " + " | ".join("---:" for _ in bound.per_image_ms) + " |",
        "| ms per image | " + " | ".join(f"{ms:.3g}" for ms in bound.per_image_ms.values()) + " |",
        "",
        f"Compute bound: 1 / ({args.steps} steps x {bound.per_image_ms[bound.best_batch]:.3g} ms at batch "
        f"{bound.best_batch}) = **{bound.images_per_s:.3f} images/s** (network only: no sampler arithmetic, FDS, "
        f"PNG or transport). The in-process generator at batch {bound.best_batch} (sampler arithmetic "
        f"included): **{bound.generator_images_per_s:.3f} images/s**.",
    ]
    profiled = [(config, run) for config, run in runs.items() if run.profiles]
    if profiled:
        lines += ["", f"### Where the time goes at saturation (py-spy, concurrency {max(args.concurrency)})", "",
                  f"Samples at 50 Hz of every thread that was running (idle threads are not sampled); raw stacks "
                  f"in {args.profile_dir.name}/. Per service, as shares of its samples: the threads, the "
                  f"functions on top of the stack (self time), and this repository's functions anywhere "
                  f"on it (inclusive time).", ""]
        for config, run in profiled:
            for service in SERVICES:
                if service not in run.profiles:
                    continue
                profile = read_profile(run.profiles[service])
                if not profile.samples:
                    continue

                def shares(counter: Counter, code: bool = False) -> str:
                    return ", ".join(f"`{name}` {count / profile.samples:.0%}" if code else
                                     f"{name} {count / profile.samples:.0%}"
                                     for name, count in counter.most_common(args.profile_top))

                lines.append(f"- **{labels[config]}, {service}** ({profile.samples} samples): threads "
                             f"{shares(profile.threads)}; self time {shares(profile.self_time, True)}; "
                             f"own code, inclusive: {shares(profile.own_inclusive, True)}")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sampler", default="", help="empty: the receiver's default (docs/sampler-sweep.md)")
    parser.add_argument("--steps", type=int, default=0, help="0: the sampler's default")
    parser.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    parser.add_argument("--snr-db", type=float, default=10.0, help="channel SNR in dB (the paper's PSNR)")
    parser.add_argument("--downsample-factor", type=int, default=0, help="the maps' downsampling (0: the sender's)")
    parser.add_argument("--checkpoint", default=str(REPO_ROOT / "models" / "diffusion-camvid.pt"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="receiver torch threads (0: torch's default)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                        help="the receiver's GESCO_RECEIVER_CHANNELS_LAST, also used for the compute bound")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--requests", type=int, default=48, help="most requests per concurrency level")
    parser.add_argument("--max-seconds", type=float, default=300.0, help="stop sending after this long per level")
    parser.add_argument("--stage-requests", type=int, default=3, help="single requests per stage breakdown")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS),
                        help="receiver configurations to run, in this order")
    parser.add_argument("--max-batch-size", type=int, default=8,
                        help="the receiver's batch size with request or continuous batching")
    parser.add_argument("--receiver-env", action="append", default=[], metavar="GESCO_RECEIVER_X=VALUE",
                        help="a further receiver setting for every configuration (repeatable)")
    parser.add_argument("--max-queue-delay-ms", type=float, default=10.0)
    parser.add_argument("--poll-interval-s", type=float, default=0.02, help="the sender's wait=true polling")
    parser.add_argument("--long-poll-s", type=float, default=20.0,
                        help="the sender's GESCO_SENDER_STATUS_LONG_POLL_S (0: plain polling every --poll-interval-s)")
    parser.add_argument("--forward-repeats", type=int, default=5)
    parser.add_argument("--max-forward-batch", type=int, default=1024, help="the compute bound's largest batch")
    parser.add_argument("--plateau-gain", type=float, default=0.03,
                        help="a doubling of the batch that gains less per image than this is flat")
    parser.add_argument("--plateau-batches", type=int, default=2, help="flat doublings in a row that end the scan")
    parser.add_argument("--profile-dir", type=Path,
                        help="profile each service with py-spy at the highest concurrency; stacks go here")
    parser.add_argument("--profile-top", type=int, default=6, help="threads and functions listed per service")
    parser.add_argument("--request-timeout-s", type=float, default=900.0)
    parser.add_argument("--start-timeout-s", type=float, default=300.0)
    parser.add_argument("--output", type=Path, help="also write the report here")
    return parser


def measure(argv: list[str] | None = None) -> tuple[argparse.Namespace, dict[str, Run], Bound]:
    """Parse `argv`, run every configuration through the services, then the compute bound."""
    args = build_parser().parse_args(argv)
    if args.max_batch_size < 2:
        raise SystemExit("--max-batch-size must be at least 2 (the off run uses 1)")
    if any("=" not in setting or not setting.startswith("GESCO_RECEIVER_") for setting in args.receiver_env):
        raise SystemExit("--receiver-env takes GESCO_RECEIVER_NAME=VALUE")
    if args.profile_dir is not None:
        args.profile_dir.mkdir(parents=True, exist_ok=True)
    from shared.semantic.diffusion.samplers import resolve  # torch, as the compute bound needs it anyway

    # Named in every request and the report: what the receiver runs by default, said explicitly.
    sampling = resolve(SamplingOptions(sampler=args.sampler, steps=args.steps, guidance=args.guidance), MAX_STEPS)
    args.sampler, args.steps = sampling.sampler, sampling.steps
    runs = {config: benchmark_stack(args, config) for config in dict.fromkeys(args.configs)}
    print("[compute bound] timing the network in process", file=sys.stderr)
    return args, runs, compute_bound(args)


def main(argv: list[str] | None = None) -> int:
    args, runs, bound = measure(argv)
    text = report(args, runs, bound)
    print(text)
    if args.output:
        args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
