"""Segmenter files side by side on CamVid val at 192x256 labels: pooled mIoU (11 classes, void
excluded), per-class IoU, and each file's per-image mIoU paired against the first file's (mean
difference and its standard error), which is how one training choice is weighed against another on
the same 101 images.

    python -m scripts.models.compare_segmenters --checkpoints run3.pt,a.pt,b.pt --names "run 3,A,B" \
        --out docs/segmenter-ablation.md

Each file is read through `Segmenter` as the sender reads photos (its input size, channels-last).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np
import torch

from evaluation.image_quality import paired_difference, pooled_miou, segmentation_scores
from shared.semantic.data import CAMVID_CLASSES, CAMVID_INFO, camvid
from shared.semantic.segmenter import Segmenter, per_class_iou

LABEL_SIZE = (192, 256)  # the data's resolution: the labels every file is scored against
BATCH = 8


def predict(path: Path, images: torch.Tensor) -> np.ndarray:
    """Label ids of every val image at LABEL_SIZE from the segmenter file at `path`."""
    seg = Segmenter.from_checkpoint(path, "cpu")
    return np.concatenate([seg.segment_batch(images[i:i + BATCH]).numpy() for i in range(0, len(images), BATCH)])


def compare(paths: list[Path], names: list[str], data_root: str) -> dict:
    val = camvid(data_root, "val", LABEL_SIZE)
    images = torch.stack([val[i][0] for i in range(len(val))])
    labels = np.stack([val[i][1].numpy() for i in range(len(val))])
    rows = []
    for path, name in zip(paths, names):
        ious, accuracies, pooled = segmentation_scores(predict(path, images), labels, CAMVID_INFO.num_classes,
                                                       CAMVID_INFO.ignore_index)
        rows.append({"name": name, "path": str(path), "pooled_miou": pooled_miou(pooled, CAMVID_INFO.ignore_index),
                     "pixel_accuracy": float(np.mean(accuracies)), "per_image_miou": ious.tolist(),
                     "per_class_iou": per_class_iou(pooled).tolist()})
    for row in rows[1:]:
        row["paired_vs_first"] = paired_difference(row["per_image_miou"], rows[0]["per_image_miou"])
    return {"images": len(val), "rows": rows}


def markdown(result: dict, command: str) -> str:
    rows = result["rows"]
    first = rows[0]["name"]
    lines = ["# Segmenter files compared on CamVid val", "",
             f"Produced by `{command}`. {result['images']} val images, labels at {LABEL_SIZE[0]}x{LABEL_SIZE[1]}, "
             "11 classes, void excluded. Per-image mIoU differences are paired against the first row "
             f"({first}): mean ± standard error.", "",
             "| file | mIoU (pooled) | per-image mIoU minus " + first + " | pixel accuracy | "
             + " | ".join(name for name in CAMVID_CLASSES if name != "void") + " |",
             "|---|---:|---:|---:|" + "---:|" * (len(CAMVID_CLASSES) - 1)]
    for row in rows:
        paired = row.get("paired_vs_first")
        diff = "—" if paired is None else f"{paired['mean']:+.4f} ± {paired['se']:.4f}"
        classes = [f"{iou:.3f}" for name, iou in zip(CAMVID_CLASSES, row["per_class_iou"]) if name != "void"]
        lines.append(f"| {row['name']} (`{row['path']}`) | {row['pooled_miou']:.4f} | {diff} | "
                     f"{row['pixel_accuracy']:.4f} | " + " | ".join(classes) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", required=True, help="comma-separated segmenter files; the first is the reference")
    parser.add_argument("--names", default="", help="comma-separated row names (default: the paths)")
    parser.add_argument("--data-root", default="../shared/data/camvid")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="", help="also write the Markdown table here (and the numbers as .json beside)")
    args = parser.parse_args(argv)
    paths = [Path(p) for p in args.checkpoints.split(",")]
    names = args.names.split(",") if args.names else [str(p) for p in paths]
    if len(names) != len(paths):
        parser.error(f"--names gives {len(names)} names for {len(paths)} checkpoints")
    torch.set_num_threads(args.threads)
    result = compare(paths, names, args.data_root)
    command = "python -m scripts.models.compare_segmenters " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    text = markdown(result, command)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
        Path(args.out).with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
