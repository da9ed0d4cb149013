"""Debug PNGs of what the receiver got: class maps coloured by argmax with a fixed palette.

The palette is a function of the class id only, so the same class has the same colour in every
picture, whatever model or dataset sent it.
"""
from __future__ import annotations

import colorsys

import cv2
import numpy as np

from shared.semantic.codec import labels_from_maps
from shared.wire.imageio import encode_png

# Hues spread by the golden angle, so neighbouring ids never get similar colours.
_GOLDEN_ANGLE = 0.381966
_LIGHTNESS_CYCLE = (0.5, 0.35, 0.65)
_SATURATION_CYCLE = (0.85, 0.6)


def class_palette(num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8 RGB colours, one per class id."""
    colours = []
    for class_id in range(num_classes):
        hue = (class_id * _GOLDEN_ANGLE) % 1.0
        lightness = _LIGHTNESS_CYCLE[class_id % len(_LIGHTNESS_CYCLE)]
        saturation = _SATURATION_CYCLE[(class_id // len(_LIGHTNESS_CYCLE)) % len(_SATURATION_CYCLE)]
        colours.append(colorsys.hls_to_rgb(hue, lightness, saturation))
    return np.rint(np.asarray(colours, dtype=np.float64).reshape(-1, 3) * 255).astype(np.uint8)


def colorize_labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8 RGB."""
    return class_palette(num_classes)[labels]


def maps_png(maps: np.ndarray) -> bytes:
    """PNG of the argmax of (K, H, W) maps, coloured by class."""
    return encode_png(colorize_labels(labels_from_maps(maps), maps.shape[0]))


def labels_png(maps: np.ndarray) -> bytes:
    """PNG whose pixel values are the argmax class ids: 8-bit for K <= 256, 16-bit above."""
    labels = labels_from_maps(maps)
    if labels.dtype == np.uint8:
        return encode_png(labels)
    ok, data = cv2.imencode(".png", labels.astype(np.uint16))
    if not ok:
        raise ValueError(f"PNG encoding failed for labels of shape {labels.shape}")
    return data.tobytes()
