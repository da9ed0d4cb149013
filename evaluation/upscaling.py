"""Scores of an x4 upscaling stage on real images: real 192x256 -> area 48x64 -> stage -> 192x256.

Every row is scored by the same segmenter (`SegmenterProbe`): the paper's PSNR on 8-bit RGB
against the real 192x256 image, the Frechet distance of the segmenter's pooled features to those of
the real images ("Frechet segmenter distance"), and the pooled mIoU of the segmenter's labels
against the ground truth (CamVid convention: void excluded), beside the real images' own mIoU.

With --base-images the cascade is scored too: the base generator's 48x64 images for the same
maps (DDIM 10, guidance 2, seed = image index, clean maps; generated once and kept in that .npz),
upscaled by bicubic and by the stage. They are not pixel-aligned with the real images, so these
rows have no PSNR.

    python -m evaluation.upscaling --upscaler models/upscaler-camvid.pt \
        --base-images runs/upscaler-gap/base-val.npz --out docs/upscaler-val.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from evaluation.image_quality import SegmenterProbe, frechet_distance, pooled_miou, psnr, segmentation_scores
from shared.limits import SamplingOptions
from shared.semantic.batched_link import batched_conditions, resize_batch
from shared.semantic.codec import CodecConfig
from shared.semantic.data import CAMVID_INFO, camvid
from shared.semantic.diffusion.generator import SemanticImageGenerator, to_uint8_images
from shared.semantic.segmenter import Segmenter
from shared.semantic.upscaler import Upscaler, bicubic

UpscaleFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class UpscalingSet:
    """Real images (N, H, W, 3) uint8, their labels (N, H, W), the 4x smaller inputs (N, 3, h, w)
    in [-1, 1] (area downsampling) and the received condition maps (N, K, h', w')."""

    images: np.ndarray
    labels: np.ndarray
    inputs: torch.Tensor
    conditions: torch.Tensor


def area_inputs(images: np.ndarray, scale: int = 4) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H/scale, W/scale) in [-1, 1], area downsampling on 8-bit images."""
    h, w = images.shape[1] // scale, images.shape[2] // scale
    small = np.stack([cv2.resize(im, (w, h), interpolation=cv2.INTER_AREA) for im in images])
    return torch.from_numpy(small).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def clean_conditions(map_labels: np.ndarray | torch.Tensor, num_classes: int = CAMVID_INFO.num_classes) -> torch.Tensor:
    """What the receiver gets at 100 dB for these label maps: the link (codec, FDS) at the maps' size."""
    labels = torch.as_tensor(map_labels).long()
    snr = torch.full((labels.shape[0],), 100.0)
    return batched_conditions(labels, CodecConfig(num_classes=num_classes), snr, tuple(labels.shape[-2:]),
                              generator=torch.Generator().manual_seed(0))


def camvid_set(data_root: str, split: str = "val", map_size: tuple[int, int] = (96, 128), count: int = 0) -> UpscalingSet:
    """CamVid at 192x256 with maps at the sender's size; the first `count` images (0: all)."""
    full = camvid(data_root, split, size=(192, 256))
    maps = camvid(data_root, split, size=map_size)
    n = count or len(full)
    return UpscalingSet(full.images[:n], full.labels[:n], area_inputs(full.images[:n]), clean_conditions(maps.labels[:n]))


def upscale_all(fn: UpscaleFn, data: UpscalingSet, batch_size: int = 8) -> np.ndarray:
    out = []
    with torch.inference_mode():
        for start in range(0, len(data.inputs), batch_size):
            stop = start + batch_size
            out.append(to_uint8_images(fn(data.inputs[start:stop], data.conditions[start:stop]).clamp(-1, 1)))
    return np.concatenate(out)


class UpscalingScorer:
    """Scores stages on one `UpscalingSet` with one segmenter; the real images' features and mIoU are
    computed once."""

    def __init__(self, data: UpscalingSet, segmenter: Segmenter) -> None:
        self.data = data
        self.probe = SegmenterProbe(segmenter)
        labels, self.real_features = self.probe(data.images)
        self.real_miou = self.miou(labels)

    def miou(self, predicted: np.ndarray) -> float:
        info = CAMVID_INFO
        _, _, pooled = segmentation_scores(predicted, self.data.labels, info.num_classes, info.ignore_index)
        return pooled_miou(pooled, info.ignore_index)

    def score_images(self, images: np.ndarray) -> dict[str, float]:
        labels, features = self.probe(images)
        miou = self.miou(labels)
        return {"psnr": float(psnr(images, self.data.images).mean()),
                "frechet_segmenter_distance": frechet_distance(features, self.real_features),
                "miou": miou, "miou_over_real": miou / self.real_miou}

    def score(self, fn: UpscaleFn, batch_size: int = 8) -> dict[str, float]:
        return self.score_images(upscale_all(fn, self.data, batch_size))


def base_images(data: UpscalingSet, path: str, checkpoint: str, batch_size: int = 16) -> torch.Tensor:
    """The base generator's images (N, 3, 48, 64) in [-1, 1] for `data`'s maps, cached in `path`."""
    from pathlib import Path

    if not Path(path).is_file():
        generator = SemanticImageGenerator.load(checkpoint, device="cpu")
        cfg = generator.config.unet
        sampling = SamplingOptions(sampler="ddim", steps=10, guidance=2.0)
        out = []
        for start in range(0, len(data.conditions), batch_size):
            cond = resize_batch(data.conditions[start:start + batch_size], (cfg.image_height, cfg.image_width))
            out.append(generator.generate(cond, sampling, seeds=list(range(start, start + len(cond)))))
        np.savez_compressed(path, images=np.concatenate(out), checkpoint=checkpoint)
    images = np.load(path)["images"]
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def bicubic_stage(images: torch.Tensor, _conditions: torch.Tensor) -> torch.Tensor:
    return bicubic(images, 4)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default="../shared/data/camvid")
    p.add_argument("--split", default="val")
    p.add_argument("--upscaler", default="models/upscaler-camvid.pt")
    p.add_argument("--segmenter", default="models/segmenter-camvid.pt")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--base-images", default="", help="an .npz of base outputs (made here when missing)")
    p.add_argument("--base-checkpoint", default="models/diffusion-camvid.pt")
    p.add_argument("--base-only", action="store_true", help="generate the --base-images file and exit")
    p.add_argument("--out", default="")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    started = time.monotonic()
    data = camvid_set(args.data_root, args.split)
    if args.base_only:
        base_images(data, args.base_images, args.base_checkpoint)
        return
    scorer = UpscalingScorer(data, Segmenter.from_checkpoint(args.segmenter, "cpu"))
    upscaler = Upscaler.from_checkpoint(args.upscaler, "cpu")
    report = {
        "command": "python -m evaluation.upscaling " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v != p.get_default(k)),
        "split": args.split, "images": len(scorer.data.images), "model": upscaler.model_name,
        "real_192x256": {"psnr": None, "frechet_segmenter_distance": 0.0, "miou": scorer.real_miou,
                         "miou_over_real": 1.0},
        "bicubic": scorer.score(bicubic_stage),
        "upscaler": scorer.score(upscaler),
        "seconds": None,
    }
    if args.base_images:
        base = dataclasses.replace(data, inputs=base_images(data, args.base_images, args.base_checkpoint))
        for name, fn in (("base_bicubic", bicubic_stage), ("base_upscaler", upscaler)):
            scores = scorer.score_images(upscale_all(fn, base))
            report[name] = {k: v for k, v in scores.items() if k != "psnr"}
    report["seconds"] = round(time.monotonic() - started, 1)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
