"""Deterministic webdataset shards with a manifest and a data-quality report.

The same input gives byte-identical shards (fixed tar metadata, no timestamps anywhere), hence the
same DVC hash. Bad samples are skipped and counted by kind; too many of them fail the stage.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import webdataset as wds
from PIL import Image

from ..errors import EvaclipError
from .sources import Item, Sample, Skip

MANIFEST = "manifest.json"
QUALITY = "quality.json"
SHARD_PATTERN = "shard-%06d.tar"


@dataclass
class QualityReport:
    seen: int = 0
    written: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=lambda: defaultdict(list))

    def skip(self, key: str, kind: str, detail: str = "") -> None:
        self.skipped[kind] += 1
        if len(self.examples[kind]) < 10:
            self.examples[kind].append(f"{key}: {detail}" if detail else key)

    @property
    def skipped_fraction(self) -> float:
        return sum(self.skipped.values()) / self.seen if self.seen else 0.0

    def to_dict(self, max_fraction: float) -> dict:
        return {
            "seen": self.seen,
            "written": self.written,
            "skipped": dict(sorted(self.skipped.items())),
            "skipped_fraction": round(self.skipped_fraction, 6),
            "max_skipped_fraction": max_fraction,
            "examples": {k: v for k, v in sorted(self.examples.items())},
        }


def validate(item: Item, needs_caption: bool) -> Optional[tuple[str, str]]:
    """(kind, detail) when the sample must be skipped, else None."""
    if isinstance(item, Skip):
        return item.kind, item.detail
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(item.image)) as image:
                image.load()  # decodes every pixel: catches truncated files, not only bad headers
    except Exception as err:  # PIL raises many types for corrupt data
        return "corrupt_image", f"{type(err).__name__}: {err}"
    if needs_caption:
        if item.caption is None:
            return "missing_caption", ""
        try:
            text = item.caption.decode("utf-8")
        except UnicodeDecodeError as err:
            return "non_utf8_caption", str(err)
        if not text.strip():
            return "empty_caption", ""
    return None


def write_shard_set(
    items: Iterable[Item],
    out_dir: Path,
    samples_per_shard: int,
    max_skipped_fraction: float,
    needs_caption: bool = True,
    extra_manifest: Optional[dict] = None,
    extra_files: Optional[dict[str, str]] = None,
) -> dict:
    """Write validated samples as shards into `out_dir` atomically; returns the manifest.

    Everything is written into a temporary sibling folder that replaces `out_dir` only on success,
    so a failure never leaves a half-written shard set behind.
    """
    out_dir = Path(out_dir)
    tmp_dir = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    try:
        quality = _write(items, tmp_dir, samples_per_shard, needs_caption)
        report = quality.to_dict(max_skipped_fraction)
        _atomic_json(tmp_dir / QUALITY, report)
        if quality.written == 0:
            raise EvaclipError(f"{out_dir}: no valid samples (skipped: {dict(quality.skipped) or 'none seen'})")
        if quality.skipped_fraction > max_skipped_fraction:
            raise EvaclipError(
                f"{out_dir}: {sum(quality.skipped.values())} of {quality.seen} samples skipped "
                f"({quality.skipped_fraction:.2%} > data.max_skipped_fraction {max_skipped_fraction:.2%}): "
                f"{dict(quality.skipped)}; examples: {json.dumps(report['examples'])}"
            )
        manifest = build_manifest(sorted(tmp_dir.glob("shard-*.tar")), extra_manifest)
        _atomic_json(tmp_dir / MANIFEST, manifest)
        for name, text in (extra_files or {}).items():
            (tmp_dir / name).write_text(text, encoding="utf-8")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp_dir, out_dir)
        return manifest
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _write(items: Iterable[Item], out_dir: Path, samples_per_shard: int, needs_caption: bool) -> QualityReport:
    quality = QualityReport()
    pattern = str(out_dir / SHARD_PATTERN)
    # mtime=0 and webdataset's fixed user/group/mode make the tar bytes a function of the samples only.
    with wds.ShardWriter(pattern, maxcount=samples_per_shard, verbose=0, mtime=0) as writer:
        for item in items:
            quality.seen += 1
            problem = validate(item, needs_caption)
            if problem:
                quality.skip(item.key, *problem)
                continue
            writer.write(_record(item))
            quality.written += 1
    return quality


def _record(sample: Sample) -> dict:
    record = {"__key__": sample.key, sample.ext: sample.image}
    if sample.caption is not None:
        record["txt"] = sample.caption
    if sample.label is not None:
        record["cls"] = str(sample.label).encode()
    return record


def build_manifest(shards: list[Path], extra: Optional[dict] = None) -> dict:
    """Samples per shard, total, sizes and SHA-256 checksums. No timestamps: deterministic."""
    from .sources import check_tar

    entries = []
    for shard in shards:
        samples, error = check_tar(shard)
        if error:
            raise EvaclipError(f"{shard}: unreadable tar ({error})")
        entries.append({
            "name": shard.name,
            "samples": samples,
            "bytes": shard.stat().st_size,
            "sha256": sha256(shard),
        })
    manifest = {"format": "evaclip-shards/1", "total": sum(e["samples"] for e in entries), "shards": entries}
    manifest.update(extra or {})
    return manifest


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(shard_dir: Path) -> dict:
    path = Path(shard_dir) / MANIFEST
    if not path.is_file():
        raise EvaclipError(f"{shard_dir}: no {MANIFEST}; run `evaclip prepare` first (or `dvc pull`)")
    return json.loads(path.read_text())


def verify_shards(shard_dir: Path, manifest: Optional[dict] = None) -> None:
    """Check that every shard of the manifest exists with its checksum (e.g. after `dvc pull`)."""
    manifest = manifest or read_manifest(shard_dir)
    for entry in manifest["shards"]:
        path = shard_path(shard_dir, entry["name"])
        if not path.is_file():
            raise EvaclipError(f"{path}: shard listed in the manifest is missing")
        if sha256(path) != entry["sha256"]:
            raise EvaclipError(f"{path}: checksum differs from the manifest (truncated or modified)")


def shard_path(shard_dir: Path, name: str) -> Path:
    path = Path(name)
    return path if path.is_absolute() else Path(shard_dir) / path


def _atomic_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
