"""CPU inference options of the diffusion U-Net, timed A/B in one process (not a test: numbers vary).

Variants of one forward pass of the shipped model against the fp32 baseline (inference_mode,
contiguous tensors, 1 torch thread): 2 threads, channels_last, torch.compile (per mode, one graph
per batch size; and as the receiver does it, channels_last with a dynamic batch size), dynamic
int8 of the Linear layers, and static int8 of the convolutions calibrated on real conditions
(`shared.semantic.diffusion.quantization`), alone and with channels_last. Each round times every variant
once at every batch size in a shuffled order, so a load change on the machine hits all variants
alike; the table gives the median time and the median of the per-round ratios to the baseline.
Batch 2 is what one guided image costs per step (conditional and unconditional pass together).
The first call per batch size (compilation, for compiled variants) is reported apart.

    python -m scripts.benchmarks.benchmark_cpu_inference --rounds 20 --batches 1,2,4 --profile

Conditions are CamVid val maps sent through the link at 10 dB; inputs x_t are Gaussian, t = 500.
For a cold compile time, point TORCHINDUCTOR_CACHE_DIR at an empty folder.
"""
from __future__ import annotations

import argparse
import copy
import io
import platform
import random
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from scripts.models.quantize_model import TRAINING_SNRS_DB, link_conditions
from shared.semantic.diffusion.generator import SemanticImageGenerator
from shared.semantic.diffusion.quantization import quantize_generator


@dataclass
class Variant:
    name: str
    network: Callable[..., torch.Tensor]
    threads: int
    weights_mb: float
    compile_s: dict[int, float] = field(default_factory=dict)
    ms: dict[int, list[float]] = field(default_factory=dict)
    ratios: dict[int, list[float]] = field(default_factory=dict)
    error: str = ""


def weights_mb(module: nn.Module) -> float:
    """Size of the serialised state dict: what the weights occupy in a file and in memory."""
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    return buffer.tell() / 1e6


def inputs(conditions: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Contiguous inputs, as the samplers make them: channels_last weights turn activations over."""
    x = torch.randn(batch, 3, *conditions.shape[-2:], generator=torch.Generator().manual_seed(batch))
    return x, torch.full((batch,), 500), conditions[torch.arange(batch) % len(conditions)]


def forward_ms(variant: Variant, args: tuple[torch.Tensor, ...]) -> float:
    torch.set_num_threads(variant.threads)
    started = time.perf_counter()
    variant.network(*args)
    return (time.perf_counter() - started) * 1000


ALL_VARIANTS = ("threads2", "channels_last", "compile", "compile:max-autotune-no-cudagraphs", "compile+channels_last",
                "int8-dynamic", "int8", "int8+channels_last")


def build_variants(generator: SemanticImageGenerator, names: list[str], args: argparse.Namespace) -> list[Variant]:
    """The baseline first (the ratios' reference), then the variants named, in `ALL_VARIANTS` spelling."""
    network = generator.network
    base_mb = weights_mb(network)
    variants = [Variant("fp32 baseline", network, 1, base_mb)]
    int8 = None
    for name in names:
        kind, _, mode = name.partition(":")
        if kind == "threads2":
            variants.append(Variant("fp32 baseline, 2 threads", network, 2, base_mb))
        elif kind == "channels_last":
            variants.append(Variant("channels_last", copy.deepcopy(network).to(memory_format=torch.channels_last), 1,
                                    base_mb))
        elif kind == "compile":
            compiled = torch.compile(copy.deepcopy(network), mode=mode or "default", dynamic=False)
            variants.append(Variant(f"torch.compile {mode or 'default'}", compiled, 1, base_mb))
        elif kind == "compile+channels_last":
            # As the receiver compiles: the batch size turns dynamic at the second size seen (1 stays apart).
            compiled = torch.compile(copy.deepcopy(network).to(memory_format=torch.channels_last))
            variants.append(Variant("torch.compile default + channels_last, dynamic batch", compiled, 1, base_mb))
        elif kind == "int8-dynamic":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                dynamic_int8 = torch.ao.quantization.quantize_dynamic(copy.deepcopy(network), {nn.Linear}, dtype=torch.qint8)
            variants.append(Variant("int8 dynamic (Linear only)", dynamic_int8, 1, weights_mb(dynamic_int8)))
        elif kind in ("int8", "int8+channels_last"):
            int8 = int8 or calibrated_int8(generator, args)
            channels_last = kind != "int8"
            module = copy.deepcopy(int8).to(memory_format=torch.channels_last) if channels_last else int8
            variants.append(Variant(f"int8 static (convolutions){' + channels_last' if channels_last else ''}",
                                    module, 1, weights_mb(int8)))
        else:
            raise SystemExit(f"unknown variant {name!r}: expected some of {', '.join(ALL_VARIANTS)}")
    return variants


def calibrated_int8(generator: SemanticImageGenerator, args: argparse.Namespace) -> nn.Module:
    calibration = link_conditions(args.data_root, "train", args.calibration,
                                  (generator.info.image_height, generator.info.image_width), 0, TRAINING_SNRS_DB)
    started = time.perf_counter()
    int8 = quantize_generator(generator, calibration, list(range(args.calibration)), "ddpm", args.calibration_steps, 2.0)
    print(f"int8 static: calibrated on {args.calibration} train scenes ({args.calibration_steps} DDPM steps, "
          f"guidance 2) in {time.perf_counter() - started:.0f} s")
    return int8.network


def warm_up(variants: list[Variant], conditions: torch.Tensor, batches: list[int]) -> None:
    """Run every variant once per batch size; for compiled ones that call compiles (timed)."""
    for variant in variants:
        for batch in batches:
            torch.set_num_threads(variant.threads)
            started = time.perf_counter()
            try:
                variant.network(*inputs(conditions, batch))
            except Exception as error:  # noqa: BLE001 - a mode that fails on this CPU is a result
                variant.error = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
                break
            variant.compile_s[batch] = time.perf_counter() - started


def run_rounds(variants: list[Variant], conditions: torch.Tensor, batches: list[int], rounds: int) -> None:
    live = [v for v in variants if not v.error]
    for _ in range(rounds):
        for batch in batches:
            order = random.sample(live, len(live))
            times = {}
            for variant in order:
                args = inputs(conditions, batch)
                if variant.threads != 1:  # let a resized thread pool settle before timing it
                    forward_ms(variant, args)
                times[variant.name] = forward_ms(variant, args)
            torch.set_num_threads(1)
            for variant in live:
                variant.ms.setdefault(batch, []).append(times[variant.name])
                variant.ratios.setdefault(batch, []).append(times[variant.name] / times[live[0].name])


def report(variants: list[Variant], batches: list[int]) -> None:
    header = " | ".join(f"batch {b}: ms (x baseline)" for b in batches)
    print(f"| variant | threads | {header} | weights MB | warm-up / compile s (batch {', '.join(map(str, batches))}) |")
    print("| --- | ---: | " + " | ".join("---:" for _ in batches) + " | ---: | ---: |")
    for v in variants:
        if v.error:
            print(f"| {v.name} | {v.threads} | " + " | ".join("failed" for _ in batches) + f" | | {v.error} |")
            continue
        cells = " | ".join(f"{statistics.median(v.ms[b]):.1f} ({statistics.median(v.ratios[b]):.2f})" for b in batches)
        warm = ", ".join(f"{v.compile_s[b]:.1f}" for b in batches)
        print(f"| {v.name} | {v.threads} | {cells} | {v.weights_mb:.1f} | {warm} |")


def profile(network: nn.Module, conditions: torch.Tensor, rows: int, forwards: int = 5) -> None:
    """torch.profiler's top operators by self CPU time over `forwards` batch-2 forwards (1 thread):
    several forwards, so that a preemption by another process does not pin its time on one operator."""
    torch.set_num_threads(1)
    args = inputs(conditions, 2)
    network(*args)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(forwards):
            network(*args)
    print(f"profile of {forwards} fp32 forwards at batch 2 (divide the times by {forwards} for one forward):")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="models/diffusion-camvid.pt")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--batches", default="1,2,4")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--variants", default=",".join(ALL_VARIANTS),
                        help="compared with the fp32 baseline; compile:MODE picks a torch.compile mode")
    parser.add_argument("--calibration", type=int, default=4, help="train scenes that calibrate the int8 model")
    parser.add_argument("--calibration-steps", type=int, default=50)
    parser.add_argument("--profile", action="store_true", help="also print the top operators of one forward")
    parser.add_argument("--profile-rows", type=int, default=15)
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    random.seed(0)
    torch.set_num_threads(1)

    generator = SemanticImageGenerator.load(args.checkpoint, "cpu")
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch thread(s) unless stated, torch "
          f"{torch.__version__}, quantized engine {torch.backends.quantized.engine}")
    print(f"model: {generator.info.name} (step {generator.info.training_steps}), "
          f"{generator.info.parameters / 1e6:.2f} M parameters, {generator.info.image_height}x{generator.info.image_width}")
    size = (generator.info.image_height, generator.info.image_width)
    conditions = link_conditions(args.data_root, "val", max(batches), size, 0, (10.0,))
    with torch.inference_mode():
        variants = build_variants(generator, [v for v in args.variants.split(",") if v], args)
        warm_up(variants, conditions, batches)
        run_rounds(variants, conditions, batches, args.rounds)
        print(f"{args.rounds} interleaved rounds; median forward time, (median per-round ratio to the baseline)")
        report(variants, batches)
        if args.profile:
            profile(generator.network, conditions, args.profile_rows)


if __name__ == "__main__":
    main()
