"""`evaclip prepare`: a data source -> webdataset shards in data.output_dir (dvc.yaml's `prepare` stage).

Layout of `data.output_dir` (a DVC-cached output of that stage):
    train/             shard-*.tar, manifest.json, quality.json   (image, caption, class)
    eval/<name>/       shard-*.tar, manifest.json, classnames.txt, zeroshot_classification_templates.txt
existing webdataset shards (`data.source: wds`) are used in place: train/ then holds only their manifest.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..config import Params
from ..errors import ConfigError, EvaclipError
from .evalsets import openai_templates
from .shards import QUALITY, build_manifest, write_shard_set
from .sources import SOURCES, check_tar


@dataclass
class PrepareResult:
    train_dir: Path
    manifest: dict
    eval_dirs: list[Path]


def prepare(params: Params) -> PrepareResult:
    cfg = params.data
    out = Path(cfg.output_dir)
    if cfg.source == "wds":
        manifest = index_existing_shards(cfg.path, out / "train", cfg.max_skipped_fraction)
        eval_dirs: list[Path] = []
    else:
        source = SOURCES[cfg.source](
            path=cfg.path, templates=cfg.caption_templates, seed=cfg.seed,
            image_column=cfg.image_column, caption_column=cfg.caption_column,
        )
        described = {"source": {"type": cfg.source, "path": str(cfg.path) if cfg.path else None}}
        if source.classnames:
            described["classnames"] = source.classnames
        manifest = write_shard_set(
            source.samples, out / "train", cfg.samples_per_shard, cfg.max_skipped_fraction, extra_manifest=described,
        )
        eval_dirs = []
        if source.eval_samples is not None:
            eval_dir = out / "eval" / cfg.source
            write_shard_set(
                source.eval_samples, eval_dir, cfg.samples_per_shard, cfg.max_skipped_fraction,
                needs_caption=False,
                extra_manifest=dict(described, split="test"),
                extra_files={
                    "classnames.txt": "\n".join(source.classnames or []) + "\n",
                    "zeroshot_classification_templates.txt": "\n".join(openai_templates()) + "\n",
                },
            )
            eval_dirs.append(eval_dir)
    return PrepareResult(out / "train", manifest, eval_dirs)


def index_existing_shards(path: Optional[Path], out_dir: Path, max_skipped_fraction: float) -> dict:
    """img2dataset shards used in place: a manifest of absolute paths; truncated tars are skipped."""
    if path is None or not Path(path).is_dir():
        raise ConfigError(f"data.path: {path} is not a folder of webdataset shards (.tar)")
    shards = sorted(Path(path).resolve().rglob("*.tar"))
    if not shards:
        raise ConfigError(f"data.path: no .tar shards in {path}")
    good, bad = [], {}
    for shard in shards:
        _, error = check_tar(shard)
        if error:
            bad[str(shard)] = error
        else:
            good.append(shard)
    fraction = len(bad) / len(shards)
    quality = {"seen_shards": len(shards), "skipped": {"truncated_tar": len(bad)} if bad else {},
               "skipped_fraction": round(fraction, 6), "max_skipped_fraction": max_skipped_fraction,
               "examples": {"truncated_tar": list(bad.items())[:10]} if bad else {}}
    if fraction > max_skipped_fraction or not good:
        raise EvaclipError(f"{path}: {len(bad)} of {len(shards)} shards unreadable: {json.dumps(quality['examples'])}")
    manifest = build_manifest(good, {"source": {"type": "wds", "path": str(Path(path).resolve())}})
    for entry, shard in zip(manifest["shards"], good, strict=True):
        entry["name"] = str(shard)  # absolute: the shards stay where they are
    # Replace the folder whole: no stale shards of an earlier source stay beside the new manifest.
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    (tmp / QUALITY).write_text(json.dumps(quality, indent=2) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return manifest
