"""FDS variants side by side on CamVid val: what each hands the generator, and the scenes it makes.

For every SNR (the paper's PSNR) the val label maps (evenly spread, at the sender's 96x128) go
through our link once (codec, AWGN seeded per SNR, inverse codec); each FDS variant then cleans the
same received maps. Two measures per variant:

* the map: the argmax over the present classes against the sent label map (pixel accuracy and
  mIoU, 11 classes, void excluded), and the blind noise estimate `fds.estimate_noise_std` against
  the channel's true std;
* the scene: the served cascade (the base generator with the factor's condition adapter, DDIM 10,
  guidance 2, seed = image position, then the upscaling stage on the variant's maps at the size
  they were sent) scored at 192x256 by the segmenter: pooled mIoU,
  the Frechet segmenter distance, and the per-image mIoU paired against the first variant's.

Variants whose maps equal an earlier variant's at an SNR reuse its scenes (ADAPTIVE is one of PAPER
and TWO_PASS at each SNR).

    python -m scripts.models.compare_fds --variants paper,two_pass,adaptive,argmax --snrs 1,3,5,10,100 \
        --limit 32 --out docs/fds.json --report docs/fds.md
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evaluation.cascade import TEACHER, CascadeScorer, add_model_arguments, cascade_images
from evaluation.image_quality import paired_difference, pooled_miou, segmentation_scores
from shared.semantic.batched_link import batched_conditions, present_maps, resize_batch
from shared.semantic.codec import CodecConfig
from shared.semantic.data import CAMVID_INFO, camvid
from shared.semantic.diffusion.adapters import adapted_generators
from shared.semantic.diffusion.generator import SemanticImageGenerator
from shared.semantic.fds import DECIDE_ABOVE_NOISE_STD, FdsVariant, estimate_noise_std, fds_batched
from shared.semantic.segmenter import Segmenter
from shared.semantic.upscaler import Upscaler

MAP_SIZE = (96, 128)  # the sender's default map size
SCENE_SIZE = (192, 256)


def map_scores(maps: torch.Tensor, present: torch.Tensor, labels: np.ndarray) -> dict[str, float]:
    """The cleaned maps' decision (argmax over present classes) against the sent label maps."""
    decided = maps.masked_fill(~present[:, :, None, None], float("-inf")).argmax(1).numpy()
    _, accuracy, pooled = segmentation_scores(decided, labels, CAMVID_INFO.num_classes, CAMVID_INFO.ignore_index)
    return {"accuracy": float(np.mean(accuracy)), "miou": pooled_miou(pooled, CAMVID_INFO.ignore_index)}


def compare(args: argparse.Namespace) -> dict[str, Any]:
    full = camvid(args.data_root, "val", size=SCENE_SIZE)
    sent = camvid(args.data_root, "val", size=MAP_SIZE)
    picks = np.linspace(0, len(full) - 1, args.limit or len(full)).round().astype(int)
    scorer = CascadeScorer(full.images[picks], full.labels[picks], Segmenter.from_checkpoint(args.segmenter, "cpu"))
    base = SemanticImageGenerator.load(args.model, device="cpu")
    factor = args.downsample_factor
    generator = adapted_generators(base).get(factor, base) if factor > 1 else base  # as the receiver serves it
    sent_size = (MAP_SIZE[0] // factor, MAP_SIZE[1] // factor)
    upscaler = Upscaler.from_checkpoint(args.upscaler, "cpu")
    labels = torch.from_numpy(sent.labels[picks]).long()
    codec = CodecConfig(num_classes=CAMVID_INFO.num_classes, downsample_factor=factor)
    _, present = present_maps(labels, codec)
    rows = []
    for snr in args.snrs:
        received = batched_conditions(labels, codec, torch.full((len(labels),), snr), MAP_SIZE, use_fds=False,
                                      generator=torch.Generator().manual_seed(int(1000 * snr)))
        estimate = estimate_noise_std(received, present)
        row: dict[str, Any] = {"snr_db": snr, "true_noise_std": 10 ** (-snr / 20),
                               "estimated_noise_std": {"mean": float(estimate.mean()), "min": float(estimate.min()),
                                                       "max": float(estimate.max())}, "variants": {}}
        done: list[tuple[torch.Tensor, dict[str, Any]]] = []
        for variant in args.variants:
            started = time.monotonic()
            maps = fds_batched(received, present, variant=variant)
            scene = next((scores for earlier, scores in done if torch.equal(earlier, maps)), None)
            if scene is None:
                # The stage reads the maps at the size they were sent, as evaluation.cascade gives them.
                scene = scorer(cascade_images(generator, upscaler, resize_batch(maps, sent_size), args.batch_size,
                                              TEACHER)["stage"])
                done.append((maps, scene))
            row["variants"][variant.value] = {"map": map_scores(maps, present, sent.labels[picks]), **scene}
            print(f"{snr:g} dB {variant.value}: scene mIoU {scene['miou']:.4f} FSD {scene['fsd']:.3f} "
                  f"({time.monotonic() - started:.0f} s)", flush=True)
        first = row["variants"][args.variants[0].value]["per_image_miou"]
        for scores in list(row["variants"].values())[1:]:
            scores["paired_vs_first"] = paired_difference(scores["per_image_miou"], first)
        rows.append(row)
    return {"command": "python -m scripts.models.compare_fds " + shlex.join(sys.argv[1:]), "images": len(picks),
            "downsample_factor": factor,
            "model": generator.info.name, "upscaler": upscaler.model_name, "segmenter": args.segmenter,
            "threshold": DECIDE_ABOVE_NOISE_STD, "real_miou": scorer.real["miou"], "rows": rows}


def markdown(result: dict[str, Any]) -> str:
    names = list(result["rows"][0]["variants"])
    first = names[0]
    lines = [
        "# FDS variants compared on CamVid val", "",
        f"Produced by `{result['command']}`. {result['images']} val images spread evenly over the split; label maps "
        f"of {MAP_SIZE[0]}x{MAP_SIZE[1]} sent at downsample factor {result.get('downsample_factor', 1)} (FDS runs on the "
        f"received maps enlarged to {MAP_SIZE[0]}x{MAP_SIZE[1]}, as the receiver's), AWGN at the paper's PSNR; scenes by `{result['model']}` (DDIM 10, guidance 2) "
        f"(with the factor's condition adapter where one is shipped) and the stage `{result['upscaler']}`, scored at {SCENE_SIZE[0]}x{SCENE_SIZE[1]} by `{result['segmenter']}` "
        f"(the real images: mIoU {result['real_miou']:.3f}). ADAPTIVE decides above an estimated noise std of "
        f"{result['threshold']:g}.", "",
        "## Scenes: mIoU / FSD, and the per-image mIoU minus " + first + "'s (mean ± s.e.)", "",
        "| PSNR (dB) | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|",
    ]
    for row in result["rows"]:
        cells = []
        for name in names:
            v = row["variants"][name]
            paired = v.get("paired_vs_first")
            cells.append(f"{v['miou']:.3f} / {v['fsd']:.2f}"
                         + (f" ({paired['mean']:+.3f} ± {paired['se']:.3f})" if paired else ""))
        lines.append(f"| {row['snr_db']:g} | " + " | ".join(cells) + " |")
    lines += ["", "## Maps: the decision against the sent label map (pixel accuracy / mIoU), and the noise estimate", "",
              "| PSNR (dB) | true noise std | estimated (mean, min to max) | " + " | ".join(names) + " |",
              "|---" * (len(names) + 3) + "|"]
    for row in result["rows"]:
        est = row["estimated_noise_std"]
        cells = [f"{row['variants'][n]['map']['accuracy']:.3f} / {row['variants'][n]['map']['miou']:.3f}" for n in names]
        lines.append(f"| {row['snr_db']:g} | {row['true_noise_std']:.3f} | {est['mean']:.3f} "
                     f"({est['min']:.3f} to {est['max']:.3f}) | " + " | ".join(cells) + " |")
    rows = {row["snr_db"]: row for row in result["rows"]}
    if 1.0 in rows and 100.0 in rows:
        lines += ["", "## Kept at 1 dB of the 100 dB mIoU", ""]
        for name in names:
            kept = rows[1.0]["variants"][name]["miou"] / rows[100.0]["variants"][name]["miou"]
            lines.append(f"- {name}: {rows[1.0]['variants'][name]['miou']:.3f} / "
                         f"{rows[100.0]['variants'][name]['miou']:.3f} = {kept:.3f}")
    return "\n".join([*lines, ""])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--variants", type=lambda s: [FdsVariant(v) for v in s.split(",")],
                   default=[FdsVariant.PAPER, FdsVariant.TWO_PASS, FdsVariant.ADAPTIVE])
    p.add_argument("--snrs", type=lambda s: [float(v) for v in s.split(",")], default=[1.0, 3.0, 5.0, 10.0, 100.0])
    p.add_argument("--downsample-factor", type=int, default=1, help="the codec's factor (the sender's option)")
    p.add_argument("--limit", type=int, default=32, help="val images, spread evenly (0: all 101)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="", help="the result as JSON")
    p.add_argument("--report", default="", help="the result as markdown")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    result = compare(args)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    text = markdown(result)
    if args.report:
        Path(args.report).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
