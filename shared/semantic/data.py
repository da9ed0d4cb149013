"""Semantic segmentation datasets: CamVid (the project default), Cityscapes and COCO-Stuff.

Every dataset is a list of (image, label map) file pairs wrapped in `SegmentationPairs`, which
reads all pairs once, resizes them to one (H, W) and keeps them in memory as uint8 arrays (CamVid
at 192x256 is about 60 MB). Items are `(image, labels)`:

* image: float32 tensor (3, H, W), RGB scaled to [-1, 1] (resized with INTER_AREA),
* labels: int64 tensor (H, W) of class ids in [0, num_classes) (resized with INTER_NEAREST).

Label conventions:

* CamVid: ids 0..10 are the 11 classes, 11 is void/unlabelled (K = 12, ignore_index 11).
* Cityscapes: the `*_gtFine_labelIds.png` ids 0..33 (K = 35, so the head has room for every id
  in the official label table); "license plate" has id -1, which cannot be stored in an 8-bit PNG
  as such (it shows up as 255 in uint8 files, 65535 in 16-bit ones): every id outside 0..33,
  -1 included, is mapped to 0 ("unlabeled"), which is also the ignore index.
* COCO-Stuff (2017 pixel maps): ids 0..181, 255 = unlabelled is mapped to 182 (K = 183,
  ignore_index 182); any other id above 181 is treated as unlabelled too.

The default data root is `$GESCO_DATA_ROOT` or `../shared/data/camvid`; a relative path is
resolved against the repository root, not the current directory. A root may also be a `.tar`
archive of such a folder (scripts/gpu/make_data_archive.py makes one for machines that get only the
repository): it is unpacked once beside the archive and read from there.
"""
from __future__ import annotations

import os
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from shared.paths import resolve_repo_path


CAMVID_CLASSES: tuple[str, ...] = (
    "sky",
    "building",
    "pole",
    "road",
    "sidewalk",
    "tree",
    "sign/symbol",
    "fence",
    "car",
    "pedestrian",
    "bicyclist",
    "void",
)

# RGB palette from the dataset README; row = class id.
CAMVID_COLORS: np.ndarray = np.array(
    [
        [128, 128, 128],  # sky
        [128, 0, 0],  # building
        [192, 192, 128],  # pole
        [128, 64, 128],  # road
        [60, 40, 222],  # sidewalk
        [128, 128, 0],  # tree
        [192, 128, 128],  # sign/symbol
        [64, 64, 128],  # fence
        [64, 0, 128],  # car
        [64, 64, 0],  # pedestrian
        [0, 128, 192],  # bicyclist
        [0, 0, 0],  # void
    ],
    dtype=np.uint8,
)
CAMVID_COLORS.setflags(write=False)


def default_data_root() -> Path:
    """`$GESCO_DATA_ROOT` or `../shared/data/camvid`, relative paths taken from the repo root."""
    return resolve_repo_path(os.environ.get("GESCO_DATA_ROOT", "../shared/data/camvid"))


DEFAULT_DATA_ROOT: Path = default_data_root()


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a label space."""

    name: str
    num_classes: int
    ignore_index: int | None
    class_names: tuple[str, ...] = ()


CAMVID_INFO = DatasetInfo("camvid", 12, 11, CAMVID_CLASSES)
CITYSCAPES_INFO = DatasetInfo("cityscapes", 35, 0)
COCO_STUFF_INFO = DatasetInfo("coco_stuff", 183, 182)

LabelTransform = Callable[[np.ndarray], np.ndarray]


def _read_image(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"could not read image {path}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _read_labels(path: Path) -> np.ndarray:
    lab = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if lab is None:
        raise ValueError(f"could not read label map {path}")
    if lab.ndim == 3:
        raise ValueError(f"label map {path} has {lab.shape[2]} channels, expected a single-channel id map")
    return lab


class SegmentationPairs(Dataset):
    """Image/label pairs, resized once to `size` = (H, W) and cached in memory.

    `label_transform` maps a raw label array (as read from the file) to class ids in
    [0, num_classes); it runs before resizing. With `flip=True` each item is mirrored
    left-right with probability 1/2 (image and labels together), drawn from torch's RNG so
    that `torch.manual_seed` and DataLoader worker seeding make it reproducible.
    """

    def __init__(
        self,
        pairs: list[tuple[Path, Path]],
        size: tuple[int, int],
        num_classes: int,
        label_transform: LabelTransform | None = None,
        flip: bool = False,
        info: DatasetInfo | None = None,
    ) -> None:
        if not pairs:
            raise ValueError("SegmentationPairs needs at least one (image, label) pair")
        if len(size) != 2 or min(size) <= 0:
            raise ValueError(f"size must be (H, W) with positive entries, not {size!r}")
        if num_classes < 1 or num_classes > 256:
            raise ValueError(f"num_classes must be in 1..256 (labels are cached as uint8), not {num_classes}")
        self.pairs = [(Path(i), Path(l)) for i, l in pairs]
        self.size = (int(size[0]), int(size[1]))
        self.num_classes = num_classes
        self.flip = flip
        self.info = info
        h, w = self.size
        images = np.empty((len(self.pairs), h, w, 3), dtype=np.uint8)
        labels = np.empty((len(self.pairs), h, w), dtype=np.uint8)
        for n, (ip, lp) in enumerate(self.pairs):
            img = _read_image(ip)
            lab = _read_labels(lp)
            if img.shape[:2] != lab.shape[:2]:
                raise ValueError(f"{ip} is {img.shape[:2]} but its label map {lp} is {lab.shape[:2]}")
            if label_transform is not None:
                lab = label_transform(lab)
            lab = np.asarray(lab)
            if lab.size and (lab.min() < 0 or lab.max() >= num_classes):
                raise ValueError(
                    f"label map {lp} has ids in [{lab.min()}, {lab.max()}], outside [0, {num_classes})"
                )
            lab = lab.astype(np.uint8)
            if img.shape[:2] != (h, w):
                img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
                lab = cv2.resize(lab, (w, h), interpolation=cv2.INTER_NEAREST)
            images[n] = img
            labels[n] = lab
        self.images = images  # (N, H, W, 3) uint8 RGB
        self.labels = labels  # (N, H, W) uint8 ids

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = torch.from_numpy(self.images[index]).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
        lab = torch.from_numpy(self.labels[index].astype(np.int64))
        if self.flip and torch.rand(()) < 0.5:
            img = img.flip(-1)
            lab = lab.flip(-1)
        return img.contiguous(), lab.contiguous()

    def class_frequencies(self) -> np.ndarray:
        """Share of pixels per class id over the cached labels, shape (num_classes,)."""
        counts = np.bincount(self.labels.ravel(), minlength=self.num_classes).astype(np.float64)
        return counts / max(counts.sum(), 1.0)


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{what} folder not found: {path}")
    return path


def _check_split(split: str, allowed: tuple[str, ...]) -> None:
    if split not in allowed:
        raise ValueError(f"split must be one of {allowed}, not {split!r}")


ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_UNPACKED_MARKER = ".unpacked"


def unpack_archive(archive: str | os.PathLike[str]) -> Path:
    """Unpack a data archive into the folder beside it named after it (`x.tar` -> `x/`), once:
    a marker file written after the last member makes later calls return at once, and a
    half-unpacked folder (an interrupted run) is unpacked again."""
    archive = Path(archive)
    name = archive.name
    suffix = next((s for s in ARCHIVE_SUFFIXES if name.endswith(s)), None)
    if suffix is None:
        raise ValueError(f"{archive} is not a data archive (expected one of {ARCHIVE_SUFFIXES})")
    dest = archive.with_name(name[: -len(suffix)])
    marker = dest / _UNPACKED_MARKER
    if marker.is_file() and marker.read_text() == f"{archive.stat().st_size} {archive.stat().st_mtime_ns}":
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")  # "data": no absolute paths, links out or devices
    marker.write_text(f"{archive.stat().st_size} {archive.stat().st_mtime_ns}")
    return dest


def _root(root: str | os.PathLike[str] | None) -> Path:
    path = DEFAULT_DATA_ROOT if root is None else Path(root).expanduser()
    return unpack_archive(path) if path.is_file() else path


IMAGE_SUFFIXES = (".png", ".jpg")


def camvid_pairs(root: str | os.PathLike[str] | None, split: str) -> list[tuple[Path, Path]]:
    """`<root>/<split>/images/*.png` (or `*.jpg`) with `<root>/<split>/labels/<same stem>.png`."""
    _check_split(split, ("train", "val", "test"))
    base = _require_dir(_root(root) / split, f"CamVid {split}")
    img_dir = _require_dir(base / "images", "CamVid images")
    lab_dir = _require_dir(base / "labels", "CamVid labels")
    images = {p.stem: p for p in img_dir.iterdir() if p.suffix in IMAGE_SUFFIXES}
    labels = {p.stem: p for p in lab_dir.glob("*.png")}
    if not images:
        raise ValueError(f"no *.png or *.jpg images in {img_dir}")
    if images.keys() != labels.keys():
        missing = sorted(images[k].name for k in images.keys() - labels.keys())[:3]
        extra = sorted(labels[k].name for k in labels.keys() - images.keys())[:3]
        raise ValueError(
            f"image and label names differ in {base}: images without labels {missing}, labels without images {extra}"
        )
    return [(images[k], labels[k]) for k in sorted(images)]


def camvid(
    root: str | os.PathLike[str] | None = None, split: str = "train", size: tuple[int, int] = (192, 256), flip: bool = False
) -> SegmentationPairs:
    """CamVid (11 classes + void = 12 ids) from `root` (default `DEFAULT_DATA_ROOT`)."""
    return SegmentationPairs(camvid_pairs(root, split), size, CAMVID_INFO.num_classes, flip=flip, info=CAMVID_INFO)


def cityscapes_label_transform(lab: np.ndarray) -> np.ndarray:
    """labelIds -> 0..33; -1 ("license plate", stored as 255 / 65535 when unsigned) and any other
    out-of-range id -> 0 ("unlabeled")."""
    out = lab.astype(np.int64)
    out[(out < 0) | (out > 33)] = 0
    return out


def cityscapes_pairs(root: str | os.PathLike[str], split: str) -> list[tuple[Path, Path]]:
    _check_split(split, ("train", "val", "test"))
    root = Path(root).expanduser()
    img_dir = _require_dir(root / "leftImg8bit" / split, "Cityscapes images")
    lab_dir = _require_dir(root / "gtFine" / split, "Cityscapes labels")
    pairs = []
    for ip in sorted(img_dir.glob("*/*_leftImg8bit.png")):
        city = ip.parent.name
        stem = ip.name[: -len("_leftImg8bit.png")]
        lp = lab_dir / city / f"{stem}_gtFine_labelIds.png"
        if not lp.is_file():
            raise ValueError(f"Cityscapes label map missing for {ip}: expected {lp}")
        pairs.append((ip, lp))
    if not pairs:
        raise ValueError(f"no <city>/*_leftImg8bit.png images in {img_dir}")
    return pairs


def cityscapes(
    root: str | os.PathLike[str], split: str = "train", size: tuple[int, int] = (256, 512), flip: bool = False
) -> SegmentationPairs:
    """Cityscapes gtFine labelIds (K = 35)."""
    return SegmentationPairs(
        cityscapes_pairs(root, split),
        size,
        CITYSCAPES_INFO.num_classes,
        label_transform=cityscapes_label_transform,
        flip=flip,
        info=CITYSCAPES_INFO,
    )


def coco_stuff_label_transform(lab: np.ndarray) -> np.ndarray:
    """ids 0..181 kept; 255 (unlabelled) and any other id above 181 -> 182."""
    out = lab.astype(np.int64)
    out[(out < 0) | (out > 181)] = 182
    return out


def coco_stuff_pairs(root: str | os.PathLike[str], split: str) -> list[tuple[Path, Path]]:
    _check_split(split, ("train", "val"))
    root = Path(root).expanduser()
    img_dir = _require_dir(root / "images" / f"{split}2017", "COCO-Stuff images")
    lab_dir = _require_dir(root / "annotations" / f"{split}2017", "COCO-Stuff annotations")
    images = {p.stem: p for p in img_dir.glob("*.jpg")}
    labels = {p.stem: p for p in lab_dir.glob("*.png")}
    if not images:
        raise ValueError(f"no *.jpg images in {img_dir}")
    missing = sorted(images.keys() - labels.keys())
    if missing:
        raise ValueError(f"COCO-Stuff annotations missing in {lab_dir} for {len(missing)} images, e.g. {missing[:3]}")
    return [(images[k], labels[k]) for k in sorted(images)]


def coco_stuff(
    root: str | os.PathLike[str], split: str = "train", size: tuple[int, int] = (256, 256), flip: bool = False
) -> SegmentationPairs:
    """COCO-Stuff 2017 pixel maps (K = 183, 182 = unlabelled)."""
    return SegmentationPairs(
        coco_stuff_pairs(root, split),
        size,
        COCO_STUFF_INFO.num_classes,
        label_transform=coco_stuff_label_transform,
        flip=flip,
        info=COCO_STUFF_INFO,
    )


def colorize(labels: np.ndarray, palette: np.ndarray = CAMVID_COLORS) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8 RGB; ids beyond the palette raise ValueError."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be a 2-D id map, got shape {labels.shape}")
    palette = np.asarray(palette, dtype=np.uint8)
    if labels.size and (labels.min() < 0 or labels.max() >= len(palette)):
        raise ValueError(f"label ids must be in [0, {len(palette)}), got [{labels.min()}, {labels.max()}]")
    return palette[labels.astype(np.intp)]
