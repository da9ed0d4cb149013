"""Which of the segmenter's layers tell a sharp image from its bicubic x4 enlargement.

For each candidate feature-loss layer (stem, 1/2, 1/4 and 1/8 stages) this prints the mean L1
feature distance, relative to the real image's mean feature magnitude, between a real 192x256
val image and: its bicubic enlargement from area 48x64 (the blur the loss should penalise), the
same image with a colour shift of 12 levels (the base's colour casts, which it should not) and with
Gaussian noise of 4 levels. A good feature-loss layer has a large blur distance against small
colour and noise ones.

    python -m scripts.models.measure_feature_layers --count 32
"""
from __future__ import annotations

import argparse
import json

import torch

from evaluation.upscaling import area_inputs
from shared.semantic.data import camvid
from shared.semantic.segmenter import Segmenter
from shared.semantic.upscaler import bicubic


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default="../shared/data/camvid")
    p.add_argument("--segmenter", default="models/segmenter-camvid.pt")
    p.add_argument("--count", type=int, default=32)
    args = p.parse_args()
    net = Segmenter.from_checkpoint(args.segmenter, "cpu").net
    images = camvid(args.data_root, "val", size=(192, 256)).images[: args.count]
    real = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    g = torch.Generator().manual_seed(0)
    variants = {
        "bicubic_x4": bicubic(area_inputs(images), 4).clamp(-1, 1),
        "colour_12_levels": (real + (torch.rand(len(real), 3, 1, 1, generator=g) * 2 - 1) * 12 / 127.5).clamp(-1, 1),
        "noise_4_levels": (real + torch.randn(real.shape, generator=g) * 4 / 127.5).clamp(-1, 1),
    }

    def layers(x: torch.Tensor) -> list[torch.Tensor]:
        s0 = net.stem(x)
        s1 = net.enc1(s0)
        s2 = net.enc2(s1)
        return [s0, s1, s2, net.enc3(s2)]

    with torch.inference_mode():
        ref = layers(real)
        report = {}
        for name, x in variants.items():
            report[name] = [round(float((a - b).abs().mean() / b.abs().mean()), 4) for a, b in zip(layers(x), ref)]
    print(json.dumps({"layers": ["stem 1/1", "enc1 1/2", "enc2 1/4", "enc3 1/8"], "relative_l1": report}, indent=1))


if __name__ == "__main__":
    main()
