"""mIoU against sampler and steps at one SNR: picks the serving default.

Runs our link (noisy-trained model + FDS) on CamVid val images through the evaluation's own
pipeline (`evaluation.evaluate.Evaluation`), once per sampler configuration, with the same
channel realisations and sampling seeds for every configuration. The default is the fewest-step
configuration whose mIoU is within --tolerance of the reference (--reference, by default DDPM on
the full chain of 1000 steps).

    python -m scripts.benchmarks.sampler_sweep --snr-db 10 --limit 16 \
        --configs ddpm:1000,ddpm:250,ddpm:50,ddpm:25,ddpm:10,ddim:50,ddim:25,ddim:10,dpmpp2m:20,dpmpp2m:10 \
        --out docs/sampler-sweep.json --report docs/sampler-sweep.md
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from evaluation.evaluate import Evaluation, EvaluationConfig
from evaluation.schema import METHODS
from gesco.options import DEFAULT_GUIDANCE
from shared.semantic.channels import SnrDefinition


def parse_config(text: str) -> tuple[str, int]:
    sampler, _, steps = text.partition(":")
    return sampler.strip(), int(steps)


def parse_configs(text: str) -> list[tuple[str, int]]:
    return [parse_config(item) for item in text.split(",")]


def sweep(config: EvaluationConfig, configs: list[tuple[str, int]], definition: SnrDefinition,
          reference: tuple[str, int], tolerance: float) -> dict[str, Any]:
    """Score every (sampler, steps) of `configs`, in the order given, on the same channel noise and
    seeds: our link at `config`'s one SNR, with its images, model, guidance and seed."""
    snr_db = config.snrs[0]
    ev = Evaluation(config)
    rows = []
    for sampler, steps in configs:
        ev.use_sampling(sampler, steps)
        started = time.monotonic()
        images, _ = ev.semantic(METHODS["ours"], definition, snr_db)
        seconds = (time.monotonic() - started) / len(images)
        scores = ev.score(images)
        rows.append({"sampler": sampler, "steps": steps, "miou": scores["miou"], "pixel_accuracy": scores["pixel_accuracy"],
                     "per_image_miou": scores["per_image"]["miou"], "seconds_per_image": seconds})
        print(f"{sampler}:{steps}  mIoU {scores['miou']['mean']:.3f}  {seconds:.2f} s/image", file=sys.stderr, flush=True)
    return {"snr_db": snr_db, "definition": definition.value, "images": ev.names, "guidance": config.guidance,
            "seed": config.seed, "model": config.model, "rows": rows, "reference": list(reference),
            "default": pick_default(rows, tolerance, reference), "tolerance": tolerance}


def pick_default(rows: list[dict[str, Any]], tolerance: float, reference_config: tuple[str, int]) -> dict[str, Any] | None:
    """The fewest steps (then the fastest) whose mean mIoU is within `tolerance` of the reference."""
    reference = next((r for r in rows if (r["sampler"], r["steps"]) == tuple(reference_config)), None)
    if reference is None:
        return None
    close = [r for r in rows if r["miou"]["mean"] >= reference["miou"]["mean"] - tolerance]
    best = min(close, key=lambda r: (r["steps"], r["seconds_per_image"]))
    return {"sampler": best["sampler"], "steps": best["steps"],
            "speedup_vs_reference": reference["seconds_per_image"] / best["seconds_per_image"]}


def markdown(result: dict[str, Any], command: str) -> str:
    lines = [
        f"# Sampler sweep: mIoU against steps at {result['snr_db']:g} dB ({result['definition']})", "",
        f"{len(result['images'])} CamVid val images, guidance {result['guidance']:g}, seed {result['seed']}, "
        f"model `{result['model']}`. Same channel noise and sampling seeds in every row.", "",
        "```sh", command, "```", "",
        "| sampler | steps | mIoU (mean ± std) | pixel accuracy | s / image |", "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['sampler']} | {r['steps']} | {r['miou']['mean']:.3f} ± {r['miou']['std']:.3f} | "
                     f"{r['pixel_accuracy']['mean']:.3f} | {r['seconds_per_image']:.2f} |")
    default = result["default"]
    lines.append("")
    if default:
        sampler, steps = result["reference"]
        lines.append(f"Fewest steps within {result['tolerance']:g} mIoU of {sampler} {steps}: **{default['sampler']} "
                     f"{default['steps']}**, {default['speedup_vs_reference']:.0f}x faster per image.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", type=parse_configs,
                   default=parse_configs("ddpm:1000,ddpm:250,ddpm:50,ddpm:25,ddpm:10,ddim:50,ddim:25,ddim:10,"
                                         "dpmpp2m:20,dpmpp2m:10"))
    p.add_argument("--reference", type=parse_config, default=("ddpm", 1000), help="sampler:steps to stay close to")
    p.add_argument("--snr-db", type=float, default=10.0)
    p.add_argument("--definition", default=SnrDefinition.PAPER_PSNR.value)
    p.add_argument("--limit", type=int, default=16)
    p.add_argument("--model", default="models/diffusion-camvid.pt")
    p.add_argument("--segmenter", default="models/segmenter-camvid.pt")
    p.add_argument("--data-root", default=None)
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--tolerance", type=float, default=0.02)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default="docs/sampler-sweep.json")
    p.add_argument("--report", default="docs/sampler-sweep.md")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    (first_sampler, first_steps), *_ = args.configs
    config = EvaluationConfig(methods=("ours",), snrs=(args.snr_db,), limit=args.limit, data_root=args.data_root,
                              model=args.model, segmenter=args.segmenter, sampler=first_sampler, steps=first_steps,
                              guidance=args.guidance, seed=args.seed, batch_size=args.batch_size)
    result = sweep(config, args.configs, SnrDefinition(args.definition), args.reference, args.tolerance)
    command = "python -m scripts.benchmarks.sampler_sweep " + shlex.join(sys.argv[1:] if argv is None else argv)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    Path(args.report).write_text(markdown(result, command))


if __name__ == "__main__":
    main()
