"""Zero-shot evaluation sets, found by pointing at a folder.

- CLIP_benchmark's webdataset layout: `*.tar` shards of `{key}.{webp,png,jpg}` + `{key}.cls`, with
  `classnames.txt` and `zeroshot_classification_templates.txt` (what `evaclip prepare` writes too).
- ImageNet-1k validation as synset folders (`n01440764/...`): open_clip's 1000 class names and its 80
  OpenAI templates.
- Any ImageFolder: one folder per class, names from `classnames.txt` (in sorted folder order) or the
  folder names, templates from `zeroshot_classification_templates.txt` or the 80 OpenAI ones.
- Caption sets for retrieval: a folder of `name.jpg` + `name.txt` (one caption per line).
Templates use CLIP_benchmark's `{c}` placeholder.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from PIL import Image

from ..errors import ConfigError
from .sources import IMAGE_EXTENSIONS

TEMPLATE_FILE = "zeroshot_classification_templates.txt"
CLASSNAMES_FILE = "classnames.txt"
_SYNSET = re.compile(r"^n\d{8}$")


# open_clip's metadata is imported where it is read: importing open_clip costs seconds (timm, torchvision),
# and the launcher of `evaclip train` imports this package for the data manifests alone.

def openai_templates() -> list[str]:
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return [t("{c}") for t in OPENAI_IMAGENET_TEMPLATES]


def simple_templates() -> list[str]:
    from open_clip.zero_shot_metadata import SIMPLE_IMAGENET_TEMPLATES

    return [t("{c}") for t in SIMPLE_IMAGENET_TEMPLATES]


@dataclass
class EvalSet:
    name: str
    kind: Literal["classification", "retrieval"]
    layout: str
    classnames: list[str]
    templates: list[str]
    samples: Callable[[], Iterator[tuple[Image.Image, object]]]  # (image, label) or (image, [captions])
    identity: str = ""  # name:fingerprint, set by load_eval_set


def load_eval_set(path: str | Path, templates: Optional[str] = None) -> EvalSet:
    """The evaluation set at `path`; `templates` is `openai`, `simple`, a file, or None (the set's own)."""
    root = Path(path)
    if not root.is_dir():
        raise ConfigError(f"evaluation set {root}: not a folder")
    if any(root.rglob("*.tar")):
        found = _clip_benchmark(root)
    else:
        folders = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if folders:
            found = _image_folder(root, folders)
        elif any(f.suffix.lower() in IMAGE_EXTENSIONS for f in root.iterdir()):
            found = _captions(root)
        else:
            raise ConfigError(f"evaluation set {root}: no shards, class folders or images found")
    if templates is not None:
        found.templates = _templates(templates)
    found.identity = f"{found.name}:{_fingerprint(root, found)}"
    return found


def _fingerprint(root: Path, evalset: EvalSet) -> str:
    """What makes two evaluations comparable: the same files (names and sizes), classes and templates.
    The folder's location does not matter, so a set mounted elsewhere compares equal."""
    import hashlib

    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(root)}:{file.stat().st_size}\n".encode())
    digest.update("\n".join(evalset.classnames + ["--"] + evalset.templates).encode())
    return digest.hexdigest()[:16]


def _templates(choice: str) -> list[str]:
    if choice == "openai":
        return openai_templates()
    if choice == "simple":
        return simple_templates()
    path = Path(choice)
    if not path.is_file():
        raise ConfigError(f"templates: {choice!r} is neither 'openai', 'simple' nor a file")
    return _read_lines(path)


def _read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _own_templates(root: Path) -> list[str]:
    file = root / TEMPLATE_FILE
    return _read_lines(file) if file.is_file() else openai_templates()


def _clip_benchmark(root: Path) -> EvalSet:
    import webdataset as wds

    names_file = root / CLASSNAMES_FILE
    if not names_file.is_file():
        raise ConfigError(f"evaluation set {root}: webdataset shards without {CLASSNAMES_FILE}")
    shards = sorted(str(p) for p in root.rglob("*.tar"))

    def samples():
        stream = wds.tariterators.tarfile_samples([{"url": s} for s in shards])
        for sample in stream:
            key = next((k for k in ("webp", "png", "jpg", "jpeg") if k in sample), None)
            if key is None or "cls" not in sample:
                continue
            yield Image.open(io.BytesIO(sample[key])).convert("RGB"), int(sample["cls"])

    return EvalSet(root.name, "classification", "clip_benchmark", _read_lines(names_file), _own_templates(root), samples)


def _image_folder(root: Path, folders: list[str]) -> EvalSet:
    if len(folders) == 1000 and all(_SYNSET.match(f) for f in folders):
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        classnames, layout = list(IMAGENET_CLASSNAMES), "imagenet"  # open_clip's names, sorted-synset order
    elif (root / CLASSNAMES_FILE).is_file():
        classnames, layout = _read_lines(root / CLASSNAMES_FILE), "image_folder"
        if len(classnames) != len(folders):
            raise ConfigError(f"{root / CLASSNAMES_FILE}: {len(classnames)} names for {len(folders)} class folders")
    else:
        classnames, layout = [f.replace("_", " ") for f in folders], "image_folder"

    def samples():
        for label, folder in enumerate(folders):
            for file in sorted((root / folder).rglob("*")):
                if file.suffix.lower() in IMAGE_EXTENSIONS:
                    yield Image.open(file).convert("RGB"), label

    return EvalSet(root.name, "classification", layout, classnames, _own_templates(root), samples)


def _captions(root: Path) -> EvalSet:
    def samples():
        for file in sorted(root.iterdir()):
            text = file.with_suffix(".txt")
            if file.suffix.lower() in IMAGE_EXTENSIONS and text.is_file():
                yield Image.open(file).convert("RGB"), _read_lines(text)

    return EvalSet(root.name, "retrieval", "captions", [], [], samples)
