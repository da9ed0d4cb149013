"""The cascade at 192x256 over the SNRs: the base generator's images upscaled by the stage, against
the same images upscaled bicubically (the 48x64 output as it looked before the stage), on CamVid val.

At each SNR every val label map (at --map-height x --map-width, the sender's default 96x128) goes
through our link: the codec at --downsample-factor, AWGN at the SNR (the paper's PSNR), FDS, with
the channel noise seeded per SNR. The base generator (with the factor's condition adapter where one
lies beside it, as the receiver serves it) samples at guidance 2 from seed = the image's index with
--sampler (DDIM 10 by default; `distilled:2` runs the factor's student, as the receiver's default
does); its 48x64 image is upscaled x4 by bicubic and by the upscaling stage, which also gets the FDS
maps at the size they were sent, as the receiver gives them. One segmenter scores every row at
192x256 against the ground truth: pooled mIoU (11 classes, void excluded), the per-image mIoU
(paired differences stage - bicubic: mean and standard error) and the Frechet segmenter distance
(FSD) to the real 192x256 images. The real images' own mIoU is the reference the targets use.

    python -m evaluation.cascade --snrs 1,10,100 --out docs/cascade-val.json --report docs/cascade-val.md \
        --grid docs/val-grid-192.png
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from evaluation.image_quality import SegmenterProbe, frechet_distance, paired_difference, pooled_miou, segmentation_scores
from gesco.options import DEFAULT_GUIDANCE, DISTILLATION_TEACHER
from shared.limits import SamplingOptions
from shared.semantic.batched_link import batched_conditions, resize_batch
from shared.semantic.codec import CodecConfig
from shared.semantic.data import CAMVID_INFO, camvid, colorize
from shared.semantic.diffusion.adapters import adapted_generators
from shared.semantic.diffusion.distilled import load_student
from shared.semantic.diffusion.generator import SemanticImageGenerator, to_uint8_images
from shared.semantic.diffusion.samplers import DistilledSampler
from shared.semantic.fds import DEFAULT_FDS_VARIANT, FdsVariant
from shared.semantic.segmenter import Segmenter
from shared.semantic.upscaler import Upscaler, bicubic

TEACHER = SamplingOptions(sampler=DISTILLATION_TEACHER[0], steps=DISTILLATION_TEACHER[1], guidance=DEFAULT_GUIDANCE)
ROWS = ("bicubic", "stage")  # the base's image upscaled bicubically, and by the stage
GRID_SCENES = 6  # spread evenly over the val set (its neighbours are frames of one drive)


class CascadeScorer:
    """Scores 192x256 images of the val set with one segmenter; the real images' once."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, segmenter: Segmenter) -> None:
        self.labels = labels
        self.probe = SegmenterProbe(segmenter)
        predicted, self.real_features = self.probe(images)
        self.real = self.scores(predicted)

    def scores(self, predicted: np.ndarray) -> dict[str, Any]:
        info = CAMVID_INFO
        per_image, _, pooled = segmentation_scores(predicted, self.labels, info.num_classes, info.ignore_index)
        return {"miou": pooled_miou(pooled, info.ignore_index), "per_image_miou": per_image.tolist()}

    def __call__(self, images: np.ndarray) -> dict[str, Any]:
        predicted, features = self.probe(images)
        return {**self.scores(predicted), "fsd": frechet_distance(features, self.real_features)}


def received_maps(map_labels: np.ndarray, snr_db: float, factor: int, seed: int,
                  fds_variant: FdsVariant = DEFAULT_FDS_VARIANT) -> torch.Tensor:
    """The FDS maps the receiver gets at `snr_db`, at the size they were sent (the map size / factor)."""
    labels = torch.from_numpy(map_labels).long()
    size = (labels.shape[-2] // factor, labels.shape[-1] // factor)
    return batched_conditions(labels, CodecConfig(num_classes=CAMVID_INFO.num_classes, downsample_factor=factor),
                              torch.full((len(labels),), snr_db), size, use_fds=True, fds_variant=fds_variant,
                              generator=torch.Generator().manual_seed(seed))


def cascade_images(generator: SemanticImageGenerator, upscaler: Upscaler, maps: torch.Tensor, batch_size: int,
                   sampling: SamplingOptions = TEACHER) -> dict[str, np.ndarray]:
    """The generator's images for the received maps (seed = index), upscaled both ways."""
    cfg = generator.config.unet
    out: dict[str, list[np.ndarray]] = {"base": [], **{row: [] for row in ROWS}}
    with torch.inference_mode():
        for start in range(0, len(maps), batch_size):
            received = maps[start:start + batch_size]
            condition = resize_batch(received, (cfg.image_height, cfg.image_width))
            base = generator.generate(condition, sampling, seeds=list(range(start, start + len(received))))
            small = torch.from_numpy(base).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
            out["base"].append(base)
            out["bicubic"].append(to_uint8_images(bicubic(small, 4).clamp(-1, 1)))
            out["stage"].append(to_uint8_images(upscaler(small, received).clamp(-1, 1)))
    return {key: np.concatenate(value) for key, value in out.items()}


def evaluate(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    full = camvid(args.data_root, "val", size=(192, 256))
    maps = camvid(args.data_root, "val", size=(args.map_height, args.map_width))
    count = args.limit or len(full)
    scorer = CascadeScorer(full.images[:count], full.labels[:count], Segmenter.from_checkpoint(args.segmenter, "cpu"))
    base = SemanticImageGenerator.load(args.model, device="cpu")
    generator = adapted_generators(base).get(args.downsample_factor, base) if args.downsample_factor > 1 else base
    sampler, steps = args.sampler.split(":")
    sampling = SamplingOptions(sampler=sampler, steps=int(steps), guidance=DEFAULT_GUIDANCE)
    if sampler == DistilledSampler.name:
        generator = load_student(generator, args.downsample_factor)
        if generator is None:
            raise SystemExit(f"no student for downsample factor {args.downsample_factor} beside {args.model}")
    upscaler = Upscaler.from_checkpoint(args.upscaler, "cpu")
    rows, grid = [], {}
    scenes = np.linspace(0, count - 1, GRID_SCENES).round().astype(int)
    for snr in args.snrs:
        started = time.monotonic()
        received = received_maps(maps.labels[:count], snr, args.downsample_factor, seed=int(1000 * snr),
                                 fds_variant=FdsVariant(args.fds_variant))
        images = cascade_images(generator, upscaler, received, args.batch_size, sampling)
        scores = {row: scorer(images[row]) for row in ROWS}
        diff = paired_difference(scores["stage"]["per_image_miou"], scores["bicubic"]["per_image_miou"])
        rows.append({"snr_db": snr, **scores, "stage_minus_bicubic_miou": diff,
                     "seconds": round(time.monotonic() - started, 1)})
        if snr == args.grid_snr:
            grid = {key: value[scenes] for key, value in images.items()}
        print(f"{snr:g} dB: bicubic {scores['bicubic']['miou']:.3f} / {scores['bicubic']['fsd']:.3f}, stage "
              f"{scores['stage']['miou']:.3f} / {scores['stage']['fsd']:.3f}, paired {diff['mean']:+.3f} ± {diff['se']:.3f}",
              flush=True)
    result = {"command": "python -m evaluation.cascade " + shlex.join(sys.argv[1:]), "images": count,
              "model": generator.info.name, "sampler": args.sampler, "upscaler": upscaler.model_name, "segmenter": args.segmenter,
              "downsample_factor": args.downsample_factor, "fds_variant": args.fds_variant, "map_size": [args.map_height, args.map_width],
              "real": scorer.real, "rows": rows}
    if grid:
        grid.update(labels=full.labels[scenes], real=full.images[scenes])
    return result, grid


def targets(result: dict[str, Any]) -> list[str]:
    """The issue's targets for the generated scenes at 192x256, each with its numbers."""
    rows = {r["snr_db"]: r for r in result["rows"]}
    lines = []
    for snr, row in rows.items():
        stage, plain = row["stage"], row["bicubic"]
        met = stage["miou"] > plain["miou"] and stage["fsd"] < plain["fsd"]
        lines.append(f"- {snr:g} dB: stage above bicubic in mIoU ({stage['miou']:.3f} vs {plain['miou']:.3f}) and below "
                     f"in FSD ({stage['fsd']:.3f} vs {plain['fsd']:.3f}): {'met' if met else 'missed'}")
    real = result["real"]["miou"]
    if 100.0 in rows:
        share = rows[100.0]["stage"]["miou"] / real
        lines.append(f"- 100 dB: at least 0.90 of the real images' mIoU ({real:.3f}): {share:.3f}, "
                     f"{'met' if share >= 0.90 else 'missed'}")
        if 1.0 in rows:
            kept = rows[1.0]["stage"]["miou"] / rows[100.0]["stage"]["miou"]
            lines.append(f"- 1 dB: at least 0.93 of its own 100 dB value: {kept:.3f}, {'met' if kept >= 0.93 else 'missed'}")
    return lines


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# The cascade at 192x256: the upscaling stage against bicubic", "",
        f"{result['images']} CamVid val images, our link with FDS (`{result.get('fds_variant', 'paper')}`) at downsample factor {result['downsample_factor']} "
        f"(maps {result['map_size'][0]}x{result['map_size'][1]}), the paper's PSNR; generator `{result['model']}` "
        f"({result['sampler']}, guidance 2, seed = image index), stage `{result['upscaler']}`; scored at 192x256 by "
        f"`{result['segmenter']}`. Real 192x256 images: mIoU {result['real']['miou']:.3f}.", "",
        f"Command: `{result['command']}`", "",
        "| PSNR (dB) | bicubic: mIoU / FSD | stage: mIoU / FSD | stage - bicubic, per image (mean ± s.e.) | stage mIoU / real's |",
        "|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        d = r["stage_minus_bicubic_miou"]
        lines.append(f"| {r['snr_db']:g} | {r['bicubic']['miou']:.3f} / {r['bicubic']['fsd']:.3f} | "
                     f"{r['stage']['miou']:.3f} / {r['stage']['fsd']:.3f} | {d['mean']:+.3f} ± {d['se']:.3f} | "
                     f"{r['stage']['miou'] / result['real']['miou']:.3f} |")
    return "\n".join([*lines, "", "Targets:", "", *targets(result), ""])


def grid_picture(grid: dict[str, np.ndarray]) -> np.ndarray:
    """One row per scene: label map, real image, the 48x64 output upscaled bicubically, the stage's."""
    rows = []
    for k in range(len(grid["real"])):
        cells = [colorize(grid["labels"][k]), grid["real"][k], grid["bicubic"][k], grid["stage"][k]]
        rows.append(np.concatenate([np.pad(c, ((2, 2), (2, 2), (0, 0)), constant_values=255) for c in cells], axis=1))
    return np.concatenate(rows, axis=0)


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The data and the three networks of a cascade run, with the shipped files as defaults."""
    p.add_argument("--data-root", default="../shared/data/camvid")
    p.add_argument("--model", default="models/diffusion-camvid.pt")
    p.add_argument("--upscaler", default="models/upscaler-camvid.pt")
    p.add_argument("--segmenter", default="models/segmenter-camvid.pt")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--snrs", type=lambda s: [float(v) for v in s.split(",")], default=[1.0, 10.0, 100.0])
    p.add_argument("--downsample-factor", type=int, default=1)
    p.add_argument("--fds-variant", default=DEFAULT_FDS_VARIANT.value, choices=[v.value for v in FdsVariant],
                   help="the receiver's FDS (paper: eq. 2 as published)")
    p.add_argument("--sampler", default=":".join(map(str, DISTILLATION_TEACHER)), help="name:steps")
    p.add_argument("--map-height", type=int, default=96)
    p.add_argument("--map-width", type=int, default=128)
    p.add_argument("--limit", type=int, default=0, help="the first N val images (0: all 101)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="", help="the result as JSON")
    p.add_argument("--report", default="", help="the result as markdown")
    p.add_argument("--grid", default="", help="a PNG of six scenes at --grid-snr")
    p.add_argument("--grid-snr", type=float, default=10.0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    result, grid = evaluate(args)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    if args.report:
        Path(args.report).write_text(markdown(result))
    if args.grid and grid:
        cv2.imwrite(args.grid, cv2.cvtColor(grid_picture(grid), cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    print(markdown(result))


if __name__ == "__main__":
    main()
