"""Regenerate the bundled example inputs: a synthetic CamVid-style street scene.

* street_labels.png: 96x128 8-bit PNG of CamVid class ids (0 sky, 1 building, 2 pole, 3 road,
  4 sidewalk, 5 tree, 8 car, 9 pedestrian). Every region is at least 4 pixels wide, so FDS's 3x3
  pools keep it at 100 dB.
* street_photo.jpg: 192x256 "photo" of the same layout painted with flat colours, gradients and
  noise (nothing from CamVid itself).

Run `python examples/make_examples.py`; the output is deterministic.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

HERE = Path(__file__).resolve().parent
HEIGHT, WIDTH = 96, 128
SKY, BUILDING, POLE, ROAD, SIDEWALK, TREE, CAR, PEDESTRIAN = 0, 1, 2, 3, 4, 5, 8, 9
# Photo colours (RGB) per class id.
PAINT = {
    SKY: (150, 185, 225),
    BUILDING: (135, 95, 80),
    POLE: (90, 90, 95),
    ROAD: (85, 85, 90),
    SIDEWALK: (170, 160, 150),
    TREE: (60, 115, 50),
    CAR: (180, 30, 40),
    PEDESTRIAN: (40, 50, 120),
}


def street_labels() -> np.ndarray:
    labels = np.full((HEIGHT, WIDTH), SKY, dtype=np.uint8)
    labels[16:64, :40] = BUILDING
    labels[24:64, 88:] = BUILDING
    labels[56:72, :] = SIDEWALK
    road = np.array([[0, HEIGHT], [48, 64], [80, 64], [WIDTH, HEIGHT]], dtype=np.int32)
    labels[64:, :] = SIDEWALK
    cv2.fillPoly(labels, [road], ROAD)
    cv2.circle(labels, (64, 36), 14, TREE, thickness=-1)
    labels[48:64, 62:66] = POLE
    labels[70:86, 76:108] = CAR
    labels[60:80, 20:26] = PEDESTRIAN
    return labels


def street_photo(labels: np.ndarray, scale: int = 2) -> np.ndarray:
    rng = np.random.default_rng(2023)
    big = cv2.resize(labels, (WIDTH * scale, HEIGHT * scale), interpolation=cv2.INTER_NEAREST)
    image = np.zeros((*big.shape, 3), dtype=np.float32)
    for class_id, colour in PAINT.items():
        image[big == class_id] = colour
    rows = np.linspace(-25.0, 25.0, big.shape[0], dtype=np.float32)[:, None, None]
    image += np.where((big == SKY)[..., None], rows, 0.0)  # a sky gradient
    window = (big == BUILDING) & ((np.arange(big.shape[1]) // 6) % 3 == 0)[None, :] & (
        (np.arange(big.shape[0]) // 8) % 2 == 0
    )[:, None]
    image[window] = (210, 220, 235)  # windows on the facades
    image += rng.normal(0.0, 6.0, size=image.shape).astype(np.float32)
    image = cv2.GaussianBlur(np.clip(image, 0, 255), (3, 3), 0)
    return image.astype(np.uint8)


def main() -> None:
    labels = street_labels()
    cv2.imwrite(str(HERE / "street_labels.png"), labels)
    photo = street_photo(labels)
    cv2.imwrite(str(HERE / "street_photo.jpg"), cv2.cvtColor(photo, cv2.COLOR_RGB2BGR),
                [cv2.IMWRITE_JPEG_QUALITY, 90])
    print(f"wrote {HERE / 'street_labels.png'} and {HERE / 'street_photo.jpg'}")


if __name__ == "__main__":
    main()
