"""How the base generator's 48x64 outputs differ from real 48x64 images: blur, noise and colour.

The upscaler is trained on real images degraded to 48x64; this measures what the degradation must
imitate. The base (DDIM, guidance 2, the evaluation's settings) generates one image for each of
`--count` CamVid train label maps (clean conditions, as at 100 dB), and each is compared with its
real image area-downsampled from 192x256 to 48x64:

* blur: the Gaussian sigma (in 48x64 pixels) that, applied to the real image, gives it the base
  output's mean gradient energy (sigma 0 when the base output is the sharper of the two);
* noise: the standard deviation of the finest-scale residual (image minus its 3x3 median), robust
  (1.4826 MAD), in 8-bit levels;
* colour: per-channel mean and standard deviation of each image, and their differences
  (base - real) and ratios (base / real).

    python -m scripts.models.measure_base_gap --count 32 --out runs/upscaler-gap.json
"""
from __future__ import annotations

import argparse
import json

import cv2
import numpy as np
import torch

from shared.limits import SamplingOptions
from shared.semantic.batched_link import batched_conditions
from shared.semantic.codec import CodecConfig
from shared.semantic.data import CAMVID_INFO, camvid
from shared.semantic.diffusion.generator import SemanticImageGenerator

SIGMAS = np.round(np.arange(0.0, 2.01, 0.05), 2)


def gradient_energy(image: np.ndarray) -> float:
    """Mean squared finite difference of the grey image (8-bit levels)."""
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float64)
    return float((np.diff(grey, axis=0) ** 2).mean() + (np.diff(grey, axis=1) ** 2).mean())


def blurred(image: np.ndarray, sigma: float) -> np.ndarray:
    return image if sigma == 0 else cv2.GaussianBlur(image, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)


def matched_sigma(real: np.ndarray, target_energy: float) -> float:
    """The smallest sigma whose blur brings the real image's gradient energy down to `target_energy`."""
    for sigma in SIGMAS:
        if gradient_energy(blurred(real, float(sigma))) <= target_energy:
            return float(sigma)
    return float(SIGMAS[-1])


def noise_level(image: np.ndarray) -> float:
    """Robust std of image - median3(image), averaged over channels (8-bit levels)."""
    residual = image.astype(np.float64) - cv2.medianBlur(image, 3).astype(np.float64)
    mad = np.median(np.abs(residual - np.median(residual, axis=(0, 1))), axis=(0, 1))
    return float((1.4826 * mad).mean())


def summary(values: np.ndarray) -> dict[str, float]:
    q = np.percentile(values, [10, 50, 90], axis=0)
    return {"mean": np.round(values.mean(0), 4).tolist(), "p10": np.round(q[0], 4).tolist(),
            "median": np.round(q[1], 4).tolist(), "p90": np.round(q[2], 4).tolist()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default="../shared/data/camvid")
    p.add_argument("--checkpoint", default="models/diffusion-camvid.pt")
    p.add_argument("--count", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/upscaler-gap.json")
    p.add_argument("--save-images", default="", help="an .npz for the base outputs and real 48x64 images")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    data = camvid(args.data_root, "train", size=(192, 256))
    idx = np.random.default_rng(0).choice(len(data), args.count, replace=False)
    real = np.stack([cv2.resize(data.images[i], (64, 48), interpolation=cv2.INTER_AREA) for i in idx])
    labels = torch.from_numpy(np.stack([cv2.resize(data.labels[i], (128, 96), interpolation=cv2.INTER_NEAREST)
                                        for i in idx])).long()
    codec = CodecConfig(num_classes=CAMVID_INFO.num_classes)
    cond = batched_conditions(labels, codec, torch.full((len(idx),), 100.0), (48, 64))
    generator = SemanticImageGenerator.load(args.checkpoint, device="cpu")
    base = generator.generate(cond, SamplingOptions(sampler="ddim", steps=args.steps, guidance=args.guidance),
                              seeds=list(range(len(idx))))

    energy_real = np.array([gradient_energy(im) for im in real])
    energy_base = np.array([gradient_energy(im) for im in base])
    sigma = np.array([matched_sigma(r, e) for r, e in zip(real, energy_base)])
    noise_real = np.array([noise_level(im) for im in real])
    noise_base = np.array([noise_level(im) for im in base])
    mean_real, mean_base = real.reshape(len(idx), -1, 3).mean(1), base.reshape(len(idx), -1, 3).mean(1)
    std_real, std_base = real.reshape(len(idx), -1, 3).std(1), base.reshape(len(idx), -1, 3).std(1)
    report = {
        "command": "python -m scripts.models.measure_base_gap " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v != p.get_default(k)),
        "count": len(idx), "sampler": "ddim", "steps": args.steps, "guidance": args.guidance,
        "gradient_energy": {"real": summary(energy_real), "base": summary(energy_base),
                            "ratio_base_over_real": summary(energy_base / energy_real)},
        "matched_blur_sigma": summary(sigma),
        "noise_std": {"real": summary(noise_real), "base": summary(noise_base)},
        "channel_mean": {"real": summary(mean_real), "base": summary(mean_base),
                         "difference_base_minus_real": summary(mean_base - mean_real)},
        "channel_std": {"real": summary(std_real), "base": summary(std_base),
                        "ratio_base_over_real": summary(std_base / std_real)},
    }
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    if args.save_images:
        np.savez_compressed(args.save_images, base=base, real=real, index=idx)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
