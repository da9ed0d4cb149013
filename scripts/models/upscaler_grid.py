"""A picture of the upscaling stage on CamVid val: one column per scene, rows top to bottom:
label map, real 192x256, bicubic from real 48x64, the stage from real 48x64, and, with
--base-images, bicubic and the stage from the base generator's 48x64 image.

    python -m scripts.models.upscaler_grid --upscaler models/upscaler-camvid.pt \\
        --base-images runs/upscaler-gap/base-val.npz --out docs/upscaler-grid.jpg
"""
from __future__ import annotations

import argparse
import dataclasses

import cv2
import numpy as np
import torch

from evaluation.upscaling import base_images, bicubic_stage, camvid_set, upscale_all
from shared.semantic.data import colorize
from shared.semantic.upscaler import Upscaler


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default="../shared/data/camvid")
    p.add_argument("--upscaler", default="models/upscaler-camvid.pt")
    p.add_argument("--base-images", default="")
    p.add_argument("--base-checkpoint", default="models/diffusion-camvid.pt")
    p.add_argument("--scenes", default="0,40,80")
    p.add_argument("--out", default="docs/upscaler-grid.jpg")
    args = p.parse_args()
    torch.set_num_threads(2)
    data = camvid_set(args.data_root, "val")
    upscaler = Upscaler.from_checkpoint(args.upscaler, "cpu")
    idx = [int(i) for i in args.scenes.split(",")]
    pick = dataclasses.replace(data, images=data.images[idx], labels=data.labels[idx], inputs=data.inputs[idx],
                               conditions=data.conditions[idx])
    rows = [np.stack([colorize(lab) for lab in pick.labels]), pick.images,
            upscale_all(bicubic_stage, pick), upscale_all(upscaler, pick)]
    if args.base_images:
        base = dataclasses.replace(pick, inputs=base_images(data, args.base_images, args.base_checkpoint)[idx])
        rows += [upscale_all(bicubic_stage, base), upscale_all(upscaler, base)]
    grid = np.concatenate([np.concatenate(list(row), axis=1) for row in rows], axis=0)
    cv2.imwrite(args.out, cv2.cvtColor(grid, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
    print(args.out, grid.shape)


if __name__ == "__main__":
    main()
