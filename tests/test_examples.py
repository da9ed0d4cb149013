"""The bundled examples: the drawn street is what make_examples.py draws, looks like a CamVid
frame, and the shipped segmenter reads the bundled photo as that street."""
from __future__ import annotations

import sys

import cv2
import numpy as np
import pytest

from shared.paths import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "examples"))
import make_examples  # noqa: E402

LABELS = REPO_ROOT / "examples" / "street_labels.png"
PHOTO = REPO_ROOT / "examples" / "street_photo.jpg"
SEGMENTER = REPO_ROOT / "models" / "segmenter-camvid.pt"
# Measured when the photo was made: 85.8% of the pixels agree (the other seeds: 76-86%).
MIN_AGREEMENT = 0.80


def test_the_label_map_is_the_drawing_of_make_examples() -> None:
    committed = cv2.imread(str(LABELS), cv2.IMREAD_UNCHANGED)
    assert committed.dtype == np.uint8 and committed.shape == (96, 128)
    assert np.array_equal(committed, make_examples.street_labels())


def test_the_street_has_a_camvid_frame_layout() -> None:
    labels = make_examples.street_labels()
    share = np.bincount(labels.ravel(), minlength=12) / labels.size
    m = make_examples
    # The large classes in about CamVid's proportions (val means: road 0.29, building 0.26,
    # tree 0.16, sky 0.09, sidewalk 0.09), and the small ones present.
    for class_id, low, high in ((m.ROAD, 0.2, 0.4), (m.BUILDING, 0.2, 0.4), (m.TREE, 0.1, 0.25),
                                (m.SKY, 0.05, 0.15), (m.SIDEWALK, 0.03, 0.15)):
        assert low <= share[class_id] <= high, (class_id, share[class_id])
    for class_id in (m.POLE, m.SIGN, m.FENCE, m.CAR, m.PEDESTRIAN):
        assert share[class_id] > 0.005, class_id
    assert share[m.VOID] == 0
    # Sky on top, road at the bottom.
    assert np.mean(labels[:10, 40:90] == m.SKY) > 0.5 and np.mean(labels[-10:] == m.ROAD) > 0.8


@pytest.mark.skipif(not SEGMENTER.is_file(), reason="the shipped segmenter checkpoint is missing")
def test_the_shipped_segmenter_reads_the_photo_as_the_drawn_street() -> None:
    from shared.semantic.segmenter import Segmenter

    segmenter = Segmenter.from_checkpoint(SEGMENTER, device="cpu")
    photo = cv2.cvtColor(cv2.imread(str(PHOTO)), cv2.COLOR_BGR2RGB)
    labels = cv2.imread(str(LABELS), cv2.IMREAD_UNCHANGED)
    assert make_examples.pixel_agreement(segmenter, photo, labels) >= MIN_AGREEMENT
