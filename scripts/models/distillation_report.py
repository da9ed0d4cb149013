"""The distilled student against its teacher on CamVid val: mIoU, Frechet segmenter distance, time.

Runs our link (noisy-trained model + FDS) through the evaluation's own pipeline
(`evaluation.evaluate.Evaluation`) for every sampler configuration at every SNR, with the same
channel realisations and sampling seeds in every row, so the student's and the teacher's scores
are paired image by image: the report gives each paired mIoU difference with its standard error.

    python -m scripts.models.distillation_report --snrs 1,10,100 --limit 0 \\
        --configs ddim:10,distilled:2,distilled:1 --out docs/distillation-val.json --report docs/distillation-val.md
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
from evaluation.image_quality import paired_difference
from evaluation.schema import METHODS
from gesco.options import DEFAULT_GUIDANCE
from scripts.benchmarks.sampler_sweep import parse_configs
from shared.semantic.channels import SnrDefinition


def compare(config: EvaluationConfig, configs: list[tuple[str, int]], snrs: list[float],
            definition: SnrDefinition, earlier: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every configuration at every SNR; the first configuration is the reference. Rows of the
    reference configuration found in `earlier` (a previous result on the same images, seeds and
    teacher) are taken from it instead of being generated again."""
    ev = Evaluation(config)
    rows = []
    reused = {(r["snr_db"], r["sampler"], r["steps"]): r for r in (earlier or {}).get("rows", [])
              if (r["sampler"], r["steps"]) == configs[0]}
    if earlier is not None:
        settings = ("images", "definition", "guidance", "seed", "model", "segmenter", "downsample_factor")
        mine = {"images": ev.names, "definition": definition.value, "guidance": config.guidance, "seed": config.seed,
                "model": config.model, "segmenter": config.segmenter, "downsample_factor": config.downsample_factor}
        if any(earlier[key] != mine[key] for key in settings):
            raise ValueError(f"the earlier result was made with other {', '.join(settings)}")
    for snr_db in snrs:
        for sampler, steps in configs:
            if (snr_db, sampler, steps) in reused:
                rows.append(reused[(snr_db, sampler, steps)])
                continue
            ev.use_sampling(sampler, steps)
            started = time.monotonic()
            images, _ = ev.semantic(METHODS["ours"], definition, snr_db)
            seconds = (time.monotonic() - started) / len(images)
            scores = ev.score(images)
            rows.append({"snr_db": snr_db, "sampler": sampler, "steps": steps, "model": ev.generator("model").info.name,
                         "miou": scores["miou"]["mean"], "fsd": scores["frechet_segmenter_distance"],
                         "per_image_miou": scores["per_image"]["miou"], "seconds_per_image": seconds})
            print(f"{snr_db:g} dB {sampler}:{steps} mIoU {rows[-1]['miou']:.3f} FSD {rows[-1]['fsd']:.3f} "
                  f"{seconds:.3f} s/image", file=sys.stderr, flush=True)
    for row in rows:
        reference = next(r for r in rows if r["snr_db"] == row["snr_db"] and (r["sampler"], r["steps"]) == configs[0])
        row["miou_minus_reference"] = paired_difference(row["per_image_miou"], reference["per_image_miou"])
        row["fsd_over_reference"] = row["fsd"] / reference["fsd"] - 1
        row["time_over_reference"] = row["seconds_per_image"] / reference["seconds_per_image"]
    return {"images": ev.names, "definition": definition.value, "guidance": config.guidance, "seed": config.seed,
            "model": config.model, "segmenter": config.segmenter, "downsample_factor": config.downsample_factor,
            "reference": list(configs[0]),
            "rows": rows}


def markdown(result: dict[str, Any], command: str) -> str:
    sampler, steps = result["reference"]
    lines = [
        "# The distilled student against its teacher", "",
        f"{len(result['images'])} CamVid val images, our link with FDS, maps downsampled by "
        f"{result['downsample_factor']}, {result['definition']}, guidance "
        f"{result['guidance']:g}, seed {result['seed']}, teacher `{result['model']}`. Same channel noise and sampling "
        f"seeds in every row; differences are paired per image against {sampler} {steps} at the same SNR "
        "(mean ± standard error). FSD: Frechet segmenter distance to the real images (lower is better). "
        "Time: the evaluation's generation seconds per image on this machine, relative to the reference.", "",
        "```sh", command, "```", "",
        "| SNR (dB) | sampler | steps | model | mIoU | mIoU - reference | FSD | FSD vs reference | time vs reference |",
        "| ---: | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        d = r["miou_minus_reference"]
        lines.append(f"| {r['snr_db']:g} | {r['sampler']} | {r['steps']} | {r['model']} | {r['miou']:.3f} | "
                     f"{d['mean']:+.3f} ± {d['se']:.3f} | {r['fsd']:.3f} | {100 * r['fsd_over_reference']:+.0f} % | "
                     f"{r['time_over_reference']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", type=parse_configs, default=parse_configs("ddim:10,distilled:2,distilled:1"),
                   help="sampler:steps, the first is the reference")
    p.add_argument("--snrs", default="1,10,100")
    p.add_argument("--definition", default=SnrDefinition.PAPER_PSNR.value)
    p.add_argument("--limit", type=int, default=0, help="N val images evenly spread (0: all 101)")
    p.add_argument("--model", default="models/diffusion-camvid.pt", help="the teacher; its student lies beside it")
    p.add_argument("--downsample-factor", type=int, default=1,
                   help="maps sent downsampled (the teacher through its adapter for the factor, the factor's student)")
    p.add_argument("--segmenter", default="models/segmenter-camvid.pt")
    p.add_argument("--data-root", default=None)
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--reference-from", default=None,
                   help="an earlier result JSON whose reference rows (same images, seeds, teacher) are reused")
    p.add_argument("--out", default="docs/distillation-val.json")
    p.add_argument("--report", default="docs/distillation-val.md")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    snrs = [float(v) for v in args.snrs.split(",")]
    (first_sampler, first_steps), *_ = args.configs
    config = EvaluationConfig(methods=("ours",), snrs=tuple(snrs), limit=args.limit, data_root=args.data_root,
                              model=args.model, segmenter=args.segmenter, sampler=first_sampler, steps=first_steps,
                              guidance=args.guidance, seed=args.seed, batch_size=args.batch_size,
                              downsample_factor=args.downsample_factor)
    earlier = json.loads(Path(args.reference_from).read_text()) if args.reference_from else None
    result = compare(config, args.configs, snrs, SnrDefinition(args.definition), earlier)
    command = "python -m scripts.models.distillation_report " + shlex.join(sys.argv[1:] if argv is None else argv)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    Path(args.report).write_text(markdown(result, command))


if __name__ == "__main__":
    main()
