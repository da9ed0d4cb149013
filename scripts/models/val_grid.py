"""A side-by-side grid of val scenes: label map, real image, generated image (one row a scene).

The label maps go through the real link (codec, AWGN at --psnr-db, FDS) exactly as the receiver
gets them, so the grid shows what the services produce for these scenes.

    python -m scripts.models.val_grid --out docs/val-grid.png --scenes 6 --psnr-db 100
"""
from __future__ import annotations

import argparse

import cv2
import numpy as np
import torch

from gesco.options import DEFAULT_GUIDANCE
from shared.limits import SamplingOptions
from shared.semantic.channels import ChannelConfig
from shared.semantic.codec import CodecConfig
from shared.semantic.data import CAMVID_INFO, camvid, colorize
from shared.semantic.diffusion.generator import SemanticImageGenerator
from shared.semantic.link import simulate_link

SENDER_MAP_SIZE = (96, 128)  # the sender's default semantic size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="models/diffusion-camvid.pt")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--out", default="docs/val-grid.png")
    parser.add_argument("--scenes", type=int, default=6)
    parser.add_argument("--psnr-db", type=float, default=100.0)
    parser.add_argument("--sampler", default="ddim")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=int, default=2, help="nearest-neighbour upscaling of the grid")
    args = parser.parse_args()

    generator = SemanticImageGenerator.load(args.checkpoint)
    size = (generator.info.image_height, generator.info.image_width)
    val = camvid(args.data_root, "val", size=SENDER_MAP_SIZE)
    picks = np.linspace(0, len(val) - 1, args.scenes).round().astype(int)
    codec = CodecConfig(num_classes=CAMVID_INFO.num_classes)
    channel = ChannelConfig(snr_db=args.psnr_db)
    conditions = [simulate_link(val.labels[i], codec, channel, seed=args.seed + int(i), out_size=size).condition for i in picks]
    sampling = SamplingOptions(sampler=args.sampler, steps=args.steps, guidance=args.guidance)
    images = generator.generate(torch.from_numpy(np.stack(conditions)), sampling,
                                seeds=[args.seed + int(i) for i in picks])

    def at_model_size(rgb: np.ndarray) -> np.ndarray:
        return cv2.resize(rgb, size[::-1], interpolation=cv2.INTER_AREA)

    rows = [
        np.concatenate([cv2.resize(colorize(val.labels[i]), size[::-1], interpolation=cv2.INTER_NEAREST),
                        at_model_size(val.images[i]), image], axis=1)
        for i, image in zip(picks, images)
    ]
    grid = np.concatenate(rows, axis=0)
    grid = cv2.resize(grid, None, fx=args.scale, fy=args.scale, interpolation=cv2.INTER_NEAREST)
    cv2.imwrite(args.out, cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))
    print(f"{args.out}: {len(picks)} val scenes (label map | real | generated), model {generator.info.name} "
          f"step {generator.info.training_steps}, {args.sampler} {args.steps} steps, guidance {args.guidance}, "
          f"PSNR {args.psnr_db} dB (paper_psnr)")


if __name__ == "__main__":
    main()
