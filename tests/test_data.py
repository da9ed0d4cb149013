"""shared/semantic/data.py on tiny fake dataset folders (no real data needed)."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from shared.paths import REPO_ROOT
from shared.semantic import data
from shared.semantic.data import (
    CAMVID_CLASSES,
    CAMVID_COLORS,
    DatasetInfo,
    SegmentationPairs,
    camvid,
    cityscapes,
    coco_stuff,
    colorize,
)

H, W = 16, 24


def _image(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, (H, W, 3), dtype=np.uint8)


def _write_rgb(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def _write_labels(path: Path, lab: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), lab)


def make_camvid(root: Path, split: str = "train", n: int = 3, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for i in range(n):
        _write_rgb(root / split / "images" / f"f{i:03d}.png", _image(rng))
        lab = np.zeros((H, W), np.uint8)
        lab[:, : W // 2] = i % 12  # left half class i, right half a ramp over all ids
        lab[:, W // 2 :] = (np.arange(W - W // 2) % 12)[None]
        _write_labels(root / split / "labels" / f"f{i:03d}.png", lab)
    return root


def make_cityscapes(root: Path, split: str = "train") -> Path:
    rng = np.random.default_rng(1)
    for city, n in (("aachen", 2), ("bonn", 1)):
        for i in range(n):
            stem = f"{city}_{i:06d}_000019"
            _write_rgb(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", _image(rng))
            lab = np.full((H, W), 7, np.uint8)  # road
            lab[:4] = 33  # bicycle, the largest valid id
            lab[4:8] = 255  # license plate, -1 as an unsigned byte
            lab[8:10] = 40  # out of range
            _write_labels(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", lab)
    return root


def make_coco(root: Path, split: str = "val") -> Path:
    rng = np.random.default_rng(2)
    for i in range(2):
        path = root / "images" / f"{split}2017" / f"{i:012d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(path), _image(rng))
        lab = np.full((H, W), 181, np.uint8)
        lab[:5] = 255
        lab[5:8] = 0
        _write_labels(root / "annotations" / f"{split}2017" / f"{i:012d}.png", lab)
    return root


def test_constants() -> None:
    assert len(CAMVID_CLASSES) == 12 and CAMVID_CLASSES[11] == "void" and CAMVID_CLASSES[3] == "road"
    assert CAMVID_COLORS.shape == (12, 3) and CAMVID_COLORS.dtype == np.uint8
    assert CAMVID_COLORS[4].tolist() == [60, 40, 222]
    assert data.CAMVID_INFO == DatasetInfo("camvid", 12, 11, CAMVID_CLASSES)


def test_default_root_is_relative_to_repo(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    repo = REPO_ROOT
    monkeypatch.delenv("GESCO_DATA_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    assert data.default_data_root() == (repo / "../shared/data/camvid").resolve()
    monkeypatch.setenv("GESCO_DATA_ROOT", str(tmp_path / "x"))
    assert data.default_data_root() == tmp_path / "x"


def test_camvid_shapes_ranges_and_resize(tmp_path: Path) -> None:
    root = make_camvid(tmp_path / "camvid", n=3)
    ds = camvid(root, "train", (H, W))
    assert len(ds) == 3 and ds.info is not None and ds.info.num_classes == 12
    img, lab = ds[1]
    assert img.shape == (3, H, W) and img.dtype == torch.float32
    assert float(img.min()) >= -1.0 and float(img.max()) <= 1.0
    assert lab.shape == (H, W) and lab.dtype == torch.int64
    assert int(lab[0, 0]) == 1 and sorted(lab.unique().tolist()) == list(range(12))
    # pixel values survive exactly at native size
    raw = cv2.cvtColor(cv2.imread(str(ds.pairs[1][0])), cv2.COLOR_BGR2RGB)
    assert torch.allclose((img + 1) * 127.5, torch.from_numpy(raw).permute(2, 0, 1).float(), atol=1e-3)
    small = camvid(root, "train", (8, 12))
    img, lab = small[0]
    assert img.shape == (3, 8, 12) and lab.shape == (8, 12)
    assert set(lab.unique().tolist()) <= set(range(12))  # nearest neighbour: no new ids
    freq = ds.class_frequencies()
    assert freq.shape == (12,) and freq.sum() == pytest.approx(1.0)


def test_flip_moves_image_and_labels_together(tmp_path: Path) -> None:
    ds = camvid(make_camvid(tmp_path / "c", n=1), "train", (H, W), flip=True)
    plain = camvid(tmp_path / "c", "train", (H, W))
    x0, y0 = plain[0]
    seen = set()
    torch.manual_seed(0)
    for _ in range(20):
        x, y = ds[0]
        flipped = torch.equal(x, x0.flip(-1))
        assert flipped or torch.equal(x, x0)
        assert torch.equal(y, y0.flip(-1) if flipped else y0)
        seen.add(flipped)
    assert seen == {True, False}
    torch.manual_seed(5)
    a = [ds[0][0] for _ in range(6)]
    torch.manual_seed(5)
    b = [ds[0][0] for _ in range(6)]
    assert all(torch.equal(p, q) for p, q in zip(a, b))  # reproducible with torch's RNG


def test_cityscapes_label_mapping(tmp_path: Path) -> None:
    ds = cityscapes(make_cityscapes(tmp_path / "cs"), "train", (H, W))
    assert len(ds) == 3 and ds.num_classes == 35
    img, lab = ds[0]
    assert img.shape == (3, H, W)
    assert (lab[:4] == 33).all() and (lab[4:10] == 0).all() and (lab[10:] == 7).all()
    # a 16-bit file with -1 as 65535 maps the same way
    assert data.cityscapes_label_transform(np.array([[65535, 5]], np.uint16)).tolist() == [[0, 5]]
    assert data.cityscapes_label_transform(np.array([[-1, 33]], np.int32)).tolist() == [[0, 33]]


def test_coco_stuff_label_mapping(tmp_path: Path) -> None:
    ds = coco_stuff(make_coco(tmp_path / "coco"), "val", (H, W))
    assert len(ds) == 2 and ds.num_classes == 183 and ds.info.ignore_index == 182
    img, lab = ds[1]
    assert img.shape == (3, H, W) and float(img.abs().max()) <= 1.0
    assert (lab[:5] == 182).all() and (lab[5:8] == 0).all() and (lab[8:] == 181).all()


def test_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        camvid(tmp_path / "nowhere", "train", (H, W))
    (tmp_path / "empty" / "train" / "images").mkdir(parents=True)
    (tmp_path / "empty" / "train" / "labels").mkdir(parents=True)
    with pytest.raises(ValueError, match="no \\*.png"):
        camvid(tmp_path / "empty", "train", (H, W))
    root = make_camvid(tmp_path / "mm", n=2)
    (root / "train" / "labels" / "f001.png").rename(root / "train" / "labels" / "other.png")
    with pytest.raises(ValueError, match="f001.png"):
        camvid(root, "train", (H, W))
    with pytest.raises(ValueError, match="split"):
        camvid(root, "bogus", (H, W))
    cs = make_cityscapes(tmp_path / "cs")
    next((cs / "gtFine" / "train" / "bonn").glob("*.png")).unlink()
    with pytest.raises(ValueError, match="bonn"):
        cityscapes(cs, "train", (H, W))
    with pytest.raises(FileNotFoundError, match="leftImg8bit"):
        cityscapes(tmp_path / "nocs", "val", (H, W))
    with pytest.raises(FileNotFoundError, match="val2017"):
        coco_stuff(tmp_path / "nococo", "val", (H, W))
    with pytest.raises(ValueError, match="at least one"):
        SegmentationPairs([], (H, W), 12)


def test_out_of_range_labels_and_size_mismatch(tmp_path: Path) -> None:
    root = make_camvid(tmp_path / "c", n=1)
    lab_path = root / "train" / "labels" / "f000.png"
    _write_labels(lab_path, np.full((H, W), 12, np.uint8))
    with pytest.raises(ValueError, match="outside"):
        camvid(root, "train", (H, W))
    _write_labels(lab_path, np.zeros((H + 1, W), np.uint8))
    with pytest.raises(ValueError, match="label map"):
        camvid(root, "train", (H, W))


def test_colorize() -> None:
    lab = np.array([[0, 11], [4, 3]])
    rgb = colorize(lab)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0].tolist() == [128, 128, 128] and rgb[0, 1].tolist() == [0, 0, 0]
    assert rgb[1, 0].tolist() == [60, 40, 222]
    with pytest.raises(ValueError):
        colorize(np.array([[12]]))
    with pytest.raises(ValueError):
        colorize(np.zeros((2, 2, 3), int))


def test_archive_is_read_like_the_folder(tmp_path: Path) -> None:
    from scripts.gpu.make_data_archive import make_archive

    root = make_camvid(tmp_path / "camvid", "train", n=3)
    make_camvid(root, "val", n=2, seed=1)
    archive = tmp_path / "out" / "camvid-small.tar"
    counts = make_archive(root, archive, (8, 12), "png", 95)
    assert counts["train"] == 3 and counts["val"] == 2 and counts["bytes"] == archive.stat().st_size
    folder = camvid(root, "train", size=(8, 12))
    packed = camvid(archive, "train", size=(8, 12))
    np.testing.assert_array_equal(packed.images, folder.images)
    np.testing.assert_array_equal(packed.labels, folder.labels)
    assert (tmp_path / "out" / "camvid-small" / "train" / "labels").is_dir()
    assert data.unpack_archive(archive) == tmp_path / "out" / "camvid-small"  # already unpacked: no work
    jpg = tmp_path / "out" / "camvid-jpg.tar"
    make_archive(root, jpg, None, "jpg", 90)
    lossy = camvid(jpg, "val", size=(H, W))
    assert lossy.images.shape == (2, H, W, 3) and np.array_equal(lossy.labels, camvid(root, "val", size=(H, W)).labels)
    with pytest.raises(ValueError, match="not a data archive"):
        data.unpack_archive(tmp_path / "camvid" / "train" / "labels" / "f000.png")
