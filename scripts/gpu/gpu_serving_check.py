"""GPU serving check: the wheels a GPU machine lacks, and the run that writes docs/benchmarks-gpu.md.

The GPU machine this is written for has Python 3.12 (x86-64) with CUDA torch, grpcio, numpy,
opencv, httpx, prometheus-client and the scientific stack (SciPy, Matplotlib, h5py, Pillow), but not
the services' web and gRPC plumbing, Sionna or py-spy, and no internet. So the check runs in two
places:

    python -m scripts.gpu.gpu_serving_check download     # here, online: wheels-py312/ (git-ignored)
    python3 -m scripts.gpu.gpu_serving_check run         # there, from the repository root, with
                                                     # wheels-py312/ copied along

`run` installs the wheels offline into .gpu-site/ (git-ignored; no dependency resolution, the
machine's own packages serve the rest, as they are), puts it on PYTHONPATH, generates the gRPC
stubs and measures (`measure`): the generator in process (one guided DDIM image eager and as CUDA
graphs, one guided forward both ways, CPU against CUDA images of one seed) and the three services
over loopback with scripts/benchmarks/benchmark_serving.py (request and continuous batching, both with the GPU
preset's CUDA graphs, at concurrency 1 and 128, py-spy profiles at 128, the compute bound up to its
plateau). It writes docs/benchmarks-gpu.md (not yet run: the file does not exist yet) with its two goals
checked against the numbers: one request end to end within 40 ms, and at concurrency 128 at least
half of the in-process generator's best images/s.

    python -m scripts.gpu.gpu_serving_check run --no-install --tiny --device cpu --output run/gpu-check.md

checks the run's path on a CPU in a few minutes (this interpreter must have the requirements).
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from shared.paths import REPO_ROOT
WHEELS = REPO_ROOT / "wheels-py312"
SITE = REPO_ROOT / ".gpu-site"
TARGET = ["--python-version", "3.12", "--implementation", "cp", "--abi", "cp312", "--abi", "abi3", "--abi", "none",
          "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
          "--platform", "manylinux2014_x86_64", "--platform", "any"]
# What the GPU machine lacks, pinned as requirements.txt pins it (names as written there), and
# what Sionna imports that the machine lacks; grpcio-tools generates the stubs there.
FROM_REQUIREMENTS = ("fastapi", "fastapi-offline", "uvicorn[standard]", "python-multipart", "pydantic",
                     "pydantic-settings", "grpcio-tools", "grpcio-health-checking", "grpcio-reflection", "protobuf",
                     "redis")
EXTRA = ("importlib-resources>=6.5.2", "py-spy==0.4.3")
# Sionna without its dependencies (the machine's CUDA torch and scientific stack stay).
SIONNA = "sionna-no-rt"
# On the machine already (and large): never downloaded; everything else shadows the machine's copy.
PRESENT = re.compile(r"^(torch|numpy|opencv[-_].*|httpx|httpcore|prometheus[-_]client|nvidia[-_].*|triton|scipy|"
                     r"matplotlib|h5py|pillow|fonttools|contourpy|kiwisolver|uvloop|pyyaml|setuptools)-")
GOAL_LATENCY_MS = 40.0
GOAL_THROUGHPUT_SHARE = 0.5


def requirement_lines() -> dict[str, str]:
    """requirements.txt's requirement per package name (lowercase, extras kept in the line)."""
    lines = {}
    for line in (REPO_ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            lines[re.split(r"[<>=!~\[ ]", line, maxsplit=1)[0].lower()] = line
    return lines


def download(args: argparse.Namespace) -> None:
    """Fetch the wheels for Python 3.12 on x86-64 Linux into wheels-py312/, one version each."""
    pinned = requirement_lines()
    names = [name.split("[")[0] for name in FROM_REQUIREMENTS] + [SIONNA]
    if missing := [name for name in names if name not in pinned]:
        raise SystemExit(f"requirements.txt lacks {missing}")
    args.wheels.mkdir(exist_ok=True)
    pip = [sys.executable, "-m", "pip", "download", "--only-binary=:all:", *TARGET, "--dest", str(args.wheels)]
    subprocess.run([*pip, *[pinned[name.split("[")[0]] for name in FROM_REQUIREMENTS], *EXTRA], check=True)
    subprocess.run([*pip, "--no-deps", pinned[SIONNA]], check=True)
    for wheel in args.wheels.glob("*.whl"):
        if PRESENT.match(wheel.name.lower()):
            wheel.unlink()
    wheels = sorted(args.wheels.glob("*.whl"))
    print(f"{len(wheels)} wheels, {sum(w.stat().st_size for w in wheels) / 2**20:.1f} MiB in {args.wheels}")


def run(args: argparse.Namespace) -> None:
    """Install (into .gpu-site), generate the stubs and measure, writing the report."""
    env = dict(os.environ)
    if not args.no_install:
        wheels = sorted(args.wheels.glob("*.whl"))
        if not wheels:
            raise SystemExit(f"{args.wheels} has no wheels: run `download` on a machine with internet first")
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
                        "--upgrade", "--target", str(SITE), *map(str, wheels)], check=True)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SITE), env.get("PYTHONPATH", "")]))
        env["PATH"] = os.pathsep.join([str(SITE / "bin"), env.get("PATH", "")])  # py-spy
    proto, stubs = REPO_ROOT / "protos" / "gesco" / "v1" / "gesco.proto", REPO_ROOT / "gesco" / "v1" / "gesco_pb2.py"
    if not args.no_install or not stubs.is_file() or stubs.stat().st_mtime < proto.stat().st_mtime:
        # Made by the grpcio-tools that matches the protobuf runtime in use (as `make proto` does).
        subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", "protos", "--python_out=.", "--pyi_out=.",
                        "--grpc_python_out=.", "protos/gesco/v1/gesco.proto"], cwd=REPO_ROOT, env=env, check=True)
    subprocess.run([sys.executable, "-m", "scripts.gpu.gpu_serving_check", "measure", "--device", args.device,
                    "--output", str(args.output), *(["--tiny"] if args.tiny else [])], cwd=REPO_ROOT, env=env, check=True)


def benchmark_argv(args: argparse.Namespace, profile_dir: Path) -> list[str]:
    """scripts/benchmarks/benchmark_serving.py's command line for this check."""
    if args.tiny:
        return ["--device", args.device, "--steps", "2", "--configs", "request", "continuous", "--concurrency", "1", "2",
                "--requests", "4", "--stage-requests", "1", "--max-batch-size", "4", "--max-forward-batch", "4",
                "--forward-repeats", "1", "--profile-dir", str(profile_dir)]
    return ["--device", args.device, "--configs", "request", "continuous", "--concurrency", "1", "128",
            "--requests", "2048", "--max-seconds", "30", "--stage-requests", "5", "--max-batch-size", "128",
            "--receiver-env", "GESCO_RECEIVER_PRESET=gpu", "--forward-repeats", "10", "--profile-dir", str(profile_dir)]


def in_process(device: str, tiny: bool) -> dict[str, float]:
    """The generator alone: one guided DDIM image eager and with CUDA graphs, a batch-2 forward
    both ways, and the largest pixel difference between a CPU and a `device` image of one seed."""
    import torch

    from shared.limits import SamplingOptions
    from shared.semantic.diffusion.generator import SemanticImageGenerator
    from scripts.benchmarks.benchmark_serving import median_ms

    checkpoint = REPO_ROOT / "models" / "diffusion-camvid.pt"
    sampling = SamplingOptions(sampler="ddim", steps=2 if tiny else 10, guidance=2.0)
    repeats = 2 if tiny else 20

    def timed_ms(fn) -> float:
        return median_ms(fn, generator.device, repeats)

    results: dict[str, float] = {}
    generator = SemanticImageGenerator.load(checkpoint, device)
    generator.use_channels_last()
    cfg = generator.config.unet
    condition = torch.zeros(1, cfg.num_classes, cfg.image_height, cfg.image_width)
    condition[:, 0, : cfg.image_height // 2] = 1
    condition[:, 3, cfg.image_height // 2:] = 1
    x = torch.randn(2, cfg.in_channels, cfg.image_height, cfg.image_width, device=generator.device)
    t = torch.full((2,), 500, device=generator.device)
    pair = condition.repeat(2, 1, 1, 1).to(generator.device)
    with torch.inference_mode():
        results["forward batch 2, eager (ms)"] = timed_ms(lambda: generator.forward(x, t, pair))
        results["one guided image, eager (ms)"] = timed_ms(lambda: generator.generate(condition, sampling, [0]))
        image = generator.generate(condition, sampling, [0])
        if generator.device.type == "cuda":
            generator.use_buckets([1, 2, 4], cuda_graphs=True)
            results["forward batch 2, CUDA graph (ms)"] = timed_ms(lambda: generator.forward(x, t, pair))
            results["one guided image, CUDA graphs (ms)"] = timed_ms(lambda: generator.generate(condition, sampling, [0]))
            generator.noise_on_device = True
            results["one guided image, CUDA graphs, noise on the GPU (ms)"] = timed_ms(
                lambda: generator.generate(condition, sampling, [0]))
            cpu = SemanticImageGenerator.load(checkpoint, "cpu")
            reference = cpu.generate(condition, sampling, [0])
            results["CPU vs CUDA image, same seed: largest difference (of 255)"] = float(
                abs(reference.astype(int) - image.astype(int)).max())
    del generator
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return results


def machine(device: str) -> str:
    import torch

    gpu = ""
    if device == "cuda" and torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        gpu = f"{properties.name} ({properties.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}, "
    return f"{gpu}Python {platform.python_version()}, torch {torch.__version__}"


def measure(args: argparse.Namespace) -> None:
    """In process, then through the services; write the report with the goals checked."""
    from scripts.benchmarks import benchmark_serving

    started = time.monotonic()
    alone = in_process(args.device, args.tiny)
    with tempfile.TemporaryDirectory(prefix="gesco-gpu-profiles-") as profiles:
        argv = benchmark_argv(args, Path(profiles))
        bench_args, runs, bound = benchmark_serving.measure(argv)
        text = benchmark_serving.report(bench_args, runs, bound, command=shlex.join(
            ["python", "-m", "scripts.benchmarks.benchmark_serving", *[a if a != profiles else "<profiles>" for a in argv]]))
    one = {config: run.stages["label_map"].get("client end to end", float("nan")) for config, run in runs.items()}
    top = max(bench_args.concurrency)
    busy = {config: run.levels[-1] for config, run in runs.items()}
    best_config = max(busy, key=lambda config: busy[config].throughput)
    share = busy[best_config].throughput / bound.generator_images_per_s
    lines = [
        "# GPU serving benchmark",
        "",
        f"Written by `python -m scripts.gpu.gpu_serving_check run{' --tiny' if args.tiny else ''}` "
        f"({(time.monotonic() - started) / 60:.1f} min). Machine: {machine(args.device)}.",
        "",
        "## Goals",
        "",
        "| goal | target | measured | met |",
        "| --- | --- | --- | --- |",
        *[f"| one request end to end, {benchmark_serving.CONFIGS[config][0]} | at most {GOAL_LATENCY_MS:g} ms | "
          f"{ms:.1f} ms (median of {bench_args.stage_requests}) | {'yes' if ms <= GOAL_LATENCY_MS else 'no'} |"
          for config, ms in one.items()],
        f"| throughput at concurrency {top}, {benchmark_serving.CONFIGS[best_config][0]} | at least "
        f"{GOAL_THROUGHPUT_SHARE:.0%} of the in-process generator's best ({bound.generator_images_per_s:.1f} images/s "
        f"at batch {bound.best_batch}) | {busy[best_config].throughput:.1f} images/s ({share:.0%}); p50/p95/p99 "
        f"{busy[best_config].percentile_s(50):.2f}/{busy[best_config].percentile_s(95):.2f}/"
        f"{busy[best_config].percentile_s(99):.2f} s | {'yes' if share >= GOAL_THROUGHPUT_SHARE else 'no'} |",
        "",
        "## The generator in process",
        "",
        "DDIM 10 steps (2 with --tiny), guidance 2, batch 1; medians; CUDA graphs through the receiver's "
        "forward buckets (shared/semantic/diffusion/forward_buckets.py).",
        "",
        "| what | value |",
        "| --- | ---: |",
        *[f"| {name} | {value:.2f} |" for name, value in alone.items()],
        "",
        text.replace("## Serving benchmark", "## Through the services", 1),
    ]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {args.output}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("download", help="fetch the wheels (needs the internet)")
    fetch.add_argument("--wheels", type=Path, default=WHEELS)
    for name, help_text in (("run", "install offline and measure"), ("measure", "measure (run's second half)")):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--device", default="cuda")
        sub.add_argument("--tiny", action="store_true", help="a few small requests: checks the path, not the speed")
        sub.add_argument("--output", type=Path, default=REPO_ROOT / "docs" / "benchmarks-gpu.md")
        if name == "run":
            sub.add_argument("--wheels", type=Path, default=WHEELS)
            sub.add_argument("--no-install", action="store_true", help="use this interpreter as it is")
    args = parser.parse_args(argv)
    if shutil.which("nvidia-smi") and args.command == "run":
        subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv"], check=False)
    {"download": download, "run": run, "measure": measure}[args.command](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
