"""Pack the CamVid folder into one compact .tar for machines that get only the repository.

    python -m scripts.gpu.make_data_archive --data-root ../shared/data/camvid --size 96x128 \\
        --out data-archive/camvid-96x128.tar

The archive holds `train/` and `val/` in the folder layout `shared.semantic.data.camvid` reads
(images/*.png or *.jpg, labels/*.png), resized to `--size` (images INTER_AREA, labels nearest),
plus the source README. Every loader takes the .tar itself as its data root and unpacks it once
beside it. `data-archive/` is ignored by git: the data must not enter the repository.

Sizes (CamVid, 367 + 101 pairs): the 192x256 source as PNG is about 39 MB; `--size 96x128` is
about a quarter of that, and `--image-format jpg` shrinks the images further at a small loss.
"""
from __future__ import annotations

import argparse
import io
import tarfile
from pathlib import Path

import cv2
import numpy as np

from shared.paths import resolve_repo_path
from shared.semantic.data import camvid_pairs


def parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be HxW, e.g. 96x128, not {text!r}") from None
    if h < 8 or w < 8:
        raise argparse.ArgumentTypeError(f"size must be at least 8x8, not {text!r}")
    return h, w


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def encode(image: np.ndarray, ext: str, quality: int) -> bytes:
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if ext == ".jpg" else [cv2.IMWRITE_PNG_COMPRESSION, 9]
    ok, data = cv2.imencode(ext, image, params)
    if not ok:
        raise ValueError(f"could not encode an image of shape {image.shape} as {ext}")
    return data.tobytes()


def make_archive(data_root: Path, out: Path, size: tuple[int, int] | None, image_format: str, quality: int,
                 splits: tuple[str, ...] = ("train", "val")) -> dict[str, int]:
    """Write the archive; returns pairs per split and the archive's bytes."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    counts: dict[str, int] = {}
    with tarfile.open(tmp, "w") as tar:
        readme = data_root / "README.md"
        if readme.is_file():
            note = f"\n\nPacked by scripts/gpu/make_data_archive.py: size {size or 'as in the source'}, images {image_format}.\n"
            _add(tar, "README.md", readme.read_bytes() + note.encode())
        for split in splits:
            pairs = camvid_pairs(data_root, split)
            for image_path, label_path in pairs:
                image = cv2.imread(str(image_path), cv2.IMREAD_COLOR)
                labels = cv2.imread(str(label_path), cv2.IMREAD_UNCHANGED)
                if image is None or labels is None:
                    raise ValueError(f"could not read {image_path} or {label_path}")
                if size is not None and image.shape[:2] != size:
                    image = cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_AREA)
                    labels = cv2.resize(labels, (size[1], size[0]), interpolation=cv2.INTER_NEAREST)
                stem = image_path.stem
                _add(tar, f"{split}/images/{stem}.{image_format}", encode(image, f".{image_format}", quality))
                _add(tar, f"{split}/labels/{stem}.png", encode(labels, ".png", quality))
            counts[split] = len(pairs)
    tmp.replace(out)
    return counts | {"bytes": out.stat().st_size}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default="../shared/data/camvid")
    parser.add_argument("--out", default="data-archive/camvid-96x128.tar")
    parser.add_argument("--size", type=parse_size, default=None, help="HxW; default: the source's size")
    parser.add_argument("--image-format", choices=("png", "jpg"), default="png")
    parser.add_argument("--jpeg-quality", type=int, default=95)
    args = parser.parse_args(argv)
    if not 1 <= args.jpeg_quality <= 100:
        parser.error(f"--jpeg-quality must be in 1..100, not {args.jpeg_quality}")
    out = resolve_repo_path(args.out)
    counts = make_archive(resolve_repo_path(args.data_root), out, args.size, args.image_format, args.jpeg_quality)
    print(f"{out}: {counts['train']} train / {counts['val']} val pairs, {counts['bytes'] / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
