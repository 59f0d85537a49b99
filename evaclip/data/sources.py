"""Data sources: each yields image-caption samples (or the reason a sample was skipped).

Adding a source means adding one generator here and one line in `SOURCES`.
Sources only read; validation of image bytes and captions happens once, in `shards.py`.
"""

from __future__ import annotations

import gzip
import io
import struct
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np
from PIL import Image

from ..errors import ConfigError, EvaclipError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "t-shirt", "trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclass
class Sample:
    key: str
    image: bytes
    ext: str                      # "png", "jpg", ... as stored in the shard
    caption: Optional[bytes]      # raw bytes: decoding (UTF-8) is validated when writing
    label: Optional[int] = None
    meta: dict = field(default_factory=dict)


@dataclass
class Skip:
    key: str
    kind: str                     # e.g. "missing_caption", "unreadable_file"
    detail: str = ""


Item = Union[Sample, Skip]


@dataclass
class Source:
    """A prepared source: its training samples, its class names, and an optional evaluation split."""

    samples: Iterator[Item]
    classnames: Optional[list[str]] = None
    eval_samples: Optional[Iterator[Item]] = None


def caption_for(classname: str, key: str, templates: list[str], seed: int) -> bytes:
    """A caption from a class name; the template is a fixed function of (seed, key): deterministic."""
    index = zlib.crc32(f"{seed}:{key}".encode()) % len(templates)
    return templates[index].format(classname).encode()


# --- Fashion-MNIST (Debian package dataset-fashion-mnist) -----------------------------------------

def fashion_mnist(path: Optional[Path], templates: list[str], seed: int, **_) -> Source:
    root = Path(path) if path else FASHION_MNIST_DIR
    files = {split: (root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz")
             for split, prefix in (("train", "train"), ("test", "t10k"))}
    missing = [str(f) for pair in files.values() for f in pair if not f.is_file()]
    if missing:
        raise EvaclipError(
            f"Fashion-MNIST not found ({', '.join(missing)}). Install it with "
            "`sudo apt-get install dataset-fashion-mnist` (or `make setup` as root), or set data.path "
            "to a folder with the four idx .gz files."
        )

    def split(name: str, with_captions: bool) -> Iterator[Item]:
        images, labels = (_read_idx(f) for f in files[name])
        for index, (pixels, label) in enumerate(zip(images, labels, strict=True)):
            key = f"fmnist-{name}-{index:05d}"
            classname = FASHION_MNIST_CLASSES[int(label)]
            caption = caption_for(classname, key, templates, seed) if with_captions else None
            yield Sample(key, _png(pixels), "png", caption, int(label))

    return Source(split("train", True), list(FASHION_MNIST_CLASSES), split("test", False))


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    magic, count = struct.unpack(">II", data[:8])
    if magic == 2051:
        rows, cols = struct.unpack(">II", data[8:16])
        return np.frombuffer(data, np.uint8, count * rows * cols, 16).reshape(count, rows, cols)
    if magic == 2049:
        return np.frombuffer(data, np.uint8, count, 8)
    raise EvaclipError(f"{path}: not an idx image or label file (magic {magic})")


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


# --- ImageFolder: one folder per class -------------------------------------------------------------

def image_folder(path: Optional[Path], templates: list[str], seed: int, **_) -> Source:
    root = _existing_dir(path, "data.path (an ImageFolder: one sub-folder per class)")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ConfigError(f"data.path: {root} has no class sub-folders")
    classnames = [c.replace("_", " ") for c in classes]

    def samples() -> Iterator[Item]:
        for label, folder in enumerate(classes):
            for file in sorted((root / folder).rglob("*")):
                if file.suffix.lower() in IMAGE_EXTENSIONS:
                    key = _key(file.relative_to(root))
                    caption = caption_for(classnames[label], key, templates, seed)
                    yield _file_sample(file, key, caption, label)

    return Source(samples(), classnames)


# --- Image-caption pairs: a folder of name.jpg + name.txt, or a CSV / Parquet table ----------------

def pairs(path: Optional[Path], image_column: str, caption_column: str, **_) -> Source:
    if path is not None and Path(path).is_file():
        return Source(_table_pairs(Path(path), image_column, caption_column))
    root = _existing_dir(path, "data.path (a folder of name.jpg + name.txt, or a .csv / .parquet file)")

    def samples() -> Iterator[Item]:
        for file in sorted(root.rglob("*")):
            if file.suffix.lower() in IMAGE_EXTENSIONS:
                text = file.with_suffix(".txt")
                caption = text.read_bytes() if text.is_file() else None
                yield _file_sample(file, _key(file.relative_to(root)), caption)

    return Source(samples())


def _table_pairs(path: Path, image_column: str, caption_column: str) -> Iterator[Item]:
    import pandas as pd

    if path.suffix.lower() == ".parquet":
        table = pd.read_parquet(path)
    elif path.suffix.lower() in (".csv", ".tsv"):
        table = pd.read_csv(path, sep="\t" if path.suffix.lower() == ".tsv" else ",", dtype=str, keep_default_na=False)
    else:
        raise ConfigError(f"data.path: {path} is neither a folder nor a .csv / .tsv / .parquet table")
    for option, column in (("data.image_column", image_column), ("data.caption_column", caption_column)):
        if column not in table.columns:
            raise ConfigError(f"{option}: column {column!r} not in {path} (columns: {', '.join(map(str, table.columns))})")

    def samples() -> Iterator[Item]:
        for row, (image, caption) in enumerate(zip(table[image_column], table[caption_column], strict=True)):
            file = path.parent / str(image)
            caption = caption.encode() if isinstance(caption, str) else caption if isinstance(caption, bytes) else None
            yield _file_sample(file, f"row-{row:09d}", caption)

    return samples()


# --- helpers ---------------------------------------------------------------------------------------

def _existing_dir(path: Optional[Path], what: str) -> Path:
    if path is None:
        raise ConfigError(f"data.path: required for this source: {what}")
    root = Path(path)
    if not root.is_dir():
        raise ConfigError(f"data.path: {root} is not a readable folder ({what})")
    return root


def _key(relative: Path) -> str:
    # webdataset splits keys at the first dot of the file name: keep dots out of keys.
    return str(relative.with_suffix("")).replace(".", "_")


def _file_sample(file: Path, key: str, caption: Optional[bytes], label: Optional[int] = None) -> Item:
    try:
        data = file.read_bytes()
    except OSError as err:
        return Skip(key, "unreadable_file", f"{file}: {err.strerror}")
    ext = file.suffix.lower().lstrip(".").replace("jpeg", "jpg")
    return Sample(key, data, ext, caption, label)


def check_tar(path: Path) -> tuple[int, Optional[str]]:
    """Samples in an existing webdataset shard, and the error if the tar is truncated or corrupt."""
    keys = set()
    try:
        with tarfile.open(path) as archive:
            for member in archive:
                if member.isfile():  # webdataset's key: the path up to the first dot of the file name
                    folder, _, base = member.name.removeprefix("./").rpartition("/")
                    keys.add(f"{folder}/{base.split('.', 1)[0]}")
    except (tarfile.TarError, EOFError, OSError) as err:
        return len(keys), str(err)
    return len(keys), None


SOURCES = {
    "fashion_mnist": fashion_mnist,
    "image_folder": image_folder,
    "pairs": pairs,
}
