"""Regenerate the bundled example inputs: a street scene drawn by this script, and a photo of it.

* street_labels.png: 96x128 8-bit PNG of CamVid class ids, a street as a car's camera sees it
  (CamVid's viewpoint and proportions): road to a vanishing point, sidewalks, facades on the left,
  trees over buildings on the right, a wedge of sky, parked cars, a car ahead, poles with signs, a
  fence, pedestrians. It is drawn with polygons at 4x and reduced by majority vote per 4x4 block;
  nothing is taken from CamVid.
* street_photo.jpg: 192x256 photo of that layout made by the project's own semantic diffusion
  model (models/diffusion-camvid.pt, 48x64) from the label map, upscaled 4x (bicubic). Of
  `PHOTO_SEEDS` it keeps the image whose segmentation by the shipped segmenter
  (models/segmenter-camvid.pt) agrees best with the drawn map, and prints that pixel agreement
  (86.1% for seed 6, 76-86% for the others; 85.8% on the saved JPEG, which
  tests/test_examples.py checks; the cartoon photo bundled before scored 28%).

`python examples/make_examples.py` rewrites both (the label map alone with --labels-only). The
label map is deterministic; the photo is for a given checkpoint and torch version.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run as a script, it imports the project's packages

HEIGHT, WIDTH = 96, 128
DRAW_SCALE = 4  # drawn at 384x512, reduced by majority vote
NUM_CLASSES = 12
SKY, BUILDING, POLE, ROAD, SIDEWALK, TREE, SIGN, FENCE, CAR, PEDESTRIAN, BICYCLIST, VOID = range(12)
PHOTO_SCALE = 4  # the model's 48x64 image -> 192x256
PHOTO_SEEDS = tuple(range(8))
PHOTO_SAMPLER, PHOTO_STEPS, PHOTO_GUIDANCE = "ddim", 50, 2.0


def _poly(canvas: np.ndarray, points: list[tuple[int, int]], class_id: int) -> None:
    cv2.fillPoly(canvas, [np.array(points, dtype=np.int32)], class_id)


def _car_side(canvas: np.ndarray, x: int, y: int, w: int, h: int) -> None:
    """A parked car seen from the side at an angle: body, cabin and the wheels' dark gap below."""
    _poly(canvas, [(x, y + h // 3), (x + w, y + h // 4), (x + w, y + h), (x, y + h)], CAR)
    _poly(canvas, [(x + w // 5, y + h // 3), (x + w // 3, y), (x + 3 * w // 4, y), (x + 7 * w // 8, y + h // 4)], CAR)


def street_labels() -> np.ndarray:
    """The drawn street, (96, 128) uint8 CamVid class ids."""
    s = DRAW_SCALE
    h, w = HEIGHT * s, WIDTH * s
    c = np.full((h, w), SKY, dtype=np.uint8)
    vx, vy = 250, 205  # vanishing point, a little above the middle as on a car's camera
    # Right: a row of buildings receding to the vanishing point, trees in front of their upper part.
    _poly(c, [(285, 150), (w, 40), (w, 275), (285, 214)], BUILDING)
    for cx, cy, r in ((470, 30, 95), (395, 55, 70), (340, 105, 48), (305, 140, 30), (430, 120, 60),
                      (500, 140, 55), (360, 150, 35)):
        cv2.circle(c, (cx, cy), r, TREE, thickness=-1)
    # Left: tall facades up to the top of the frame, their base line running to the vanishing point.
    _poly(c, [(0, 0), (175, 0), (175, 95), (228, 150), (228, 200), (0, 290)], BUILDING)
    _poly(c, [(175, 60), (205, 60), (228, 120), (228, 150), (175, 95)], BUILDING)
    # Distant buildings where the street ends.
    _poly(c, [(228, 165), (292, 160), (292, 212), (228, 212)], BUILDING)
    # Sidewalks on both sides, then the road between them.
    _poly(c, [(0, 290), (232, 206), (240, 208), (0, 372)], SIDEWALK)
    _poly(c, [(275, 206), (w, 262), (w, 350), (262, 208)], SIDEWALK)
    _poly(c, [(0, 372), (240, 208), (262, 208), (w, 350), (w, h), (0, h)], ROAD)
    # A fence along the right sidewalk, below the trees.
    _poly(c, [(292, 196), (w, 228), (w, 262), (292, 210)], FENCE)
    # Cars: two parked on the right, one on the left, one ahead on the road.
    _car_side(c, 395, 262, 117, 76)
    _car_side(c, 318, 222, 62, 36)
    _poly(c, [(110, 244), (185, 224), (185, 262), (110, 296)], CAR)
    _poly(c, [(252, 196), (280, 196), (282, 222), (250, 222)], CAR)
    # Poles with signs, and a lamp post far away.
    _poly(c, [(130, 40), (138, 40), (138, 300), (130, 300)], POLE)
    _poly(c, [(114, 64), (154, 64), (154, 94), (114, 94)], SIGN)
    _poly(c, [(353, 96), (361, 96), (361, 262), (353, 262)], POLE)
    _poly(c, [(344, 104), (372, 104), (372, 126), (344, 126)], SIGN)
    _poly(c, [(212, 120), (217, 120), (217, 214), (212, 214)], POLE)
    # Pedestrians on the left sidewalk.
    for x, top, height in ((48, 232, 86), (78, 240, 74)):
        cv2.ellipse(c, (x, top + 8), (7, 9), 0, 0, 360, PEDESTRIAN, thickness=-1)
        _poly(c, [(x - 11, top + 16), (x + 11, top + 16), (x + 9, top + height), (x - 9, top + height)], PEDESTRIAN)
    return _majority(c, s)


def _majority(canvas: np.ndarray, factor: int) -> np.ndarray:
    """Reduce by `factor` per axis, each block to its most frequent class (lowest id on ties)."""
    blocks = canvas.reshape(canvas.shape[0] // factor, factor, canvas.shape[1] // factor, factor)
    counts = np.stack([(blocks == k).sum(axis=(1, 3)) for k in range(NUM_CLASSES)])
    return counts.argmax(axis=0).astype(np.uint8)


def street_photo(labels: np.ndarray) -> tuple[np.ndarray, int, float]:
    """(photo 192x256x3 uint8, seed kept, pixel agreement of its segmentation with `labels`)."""
    import torch

    from shared.limits import SamplingOptions
    from shared.paths import REPO_ROOT
    from shared.semantic import codec, link
    from shared.semantic.diffusion.generator import SemanticImageGenerator
    from shared.semantic.segmenter import Segmenter

    generator = SemanticImageGenerator.load(REPO_ROOT / "models" / "diffusion-camvid.pt", device="cpu")
    segmenter = Segmenter.from_checkpoint(REPO_ROOT / "models" / "segmenter-camvid.pt", device="cpu")
    if not generator.info.trained:
        raise SystemExit("models/diffusion-camvid.pt is missing: the photo needs the trained model")
    size = (generator.info.image_height, generator.info.image_width)
    condition = link.resize_maps(codec.one_hot(labels, NUM_CLASSES), size)
    conditions = torch.from_numpy(np.stack([condition] * len(PHOTO_SEEDS)))
    options = SamplingOptions(sampler=PHOTO_SAMPLER, steps=PHOTO_STEPS, guidance=PHOTO_GUIDANCE)
    images = generator.generate(conditions, options, seeds=PHOTO_SEEDS)
    best: tuple[float, int, np.ndarray] | None = None
    for seed, image in zip(PHOTO_SEEDS, images):
        photo = cv2.resize(image, (image.shape[1] * PHOTO_SCALE, image.shape[0] * PHOTO_SCALE),
                           interpolation=cv2.INTER_CUBIC)
        agreement = pixel_agreement(segmenter, photo, labels)
        print(f"seed {seed}: segmenter agrees with the drawn map on {agreement:.1%} of pixels")
        if best is None or agreement > best[0]:
            best = (agreement, seed, photo)
    assert best is not None
    return best[2], best[1], best[0]


def pixel_agreement(segmenter, photo: np.ndarray, labels: np.ndarray) -> float:
    """Share of pixels where the segmentation of `photo`, as the sender makes it (area-resized to
    the label map's size), equals `labels`."""
    small = cv2.resize(photo, (labels.shape[1], labels.shape[0]), interpolation=cv2.INTER_AREA)
    return float(np.mean(segmenter.segment(small) == labels))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--labels-only", action="store_true", help="rewrite street_labels.png only")
    args = parser.parse_args()
    labels = street_labels()
    cv2.imwrite(str(HERE / "street_labels.png"), labels)
    print(f"wrote {HERE / 'street_labels.png'}")
    if args.labels_only:
        return
    photo, seed, agreement = street_photo(labels)
    cv2.imwrite(str(HERE / "street_photo.jpg"), cv2.cvtColor(photo, cv2.COLOR_RGB2BGR),
                [cv2.IMWRITE_JPEG_QUALITY, 92])
    print(f"wrote {HERE / 'street_photo.jpg'} (seed {seed}, pixel agreement {agreement:.1%})")


if __name__ == "__main__":
    main()
