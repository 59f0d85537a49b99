"""Skipping unchanged stages: what `dvc repro` does for dvc.yaml, for the Prefect flow and `evaclip pipeline`.

A stage's key digests what defines its result: its parameters and the identity of its inputs (the
data source's files, the shard checksums, the weight files, the tracking store). After a stage runs,
a stamp beside its output folder (`<output_dir>.stage.json`, as `data.dvc` sits beside `data/`)
records the key, a signature of the outputs and the stage's summary. A stage is current when the key
matches and its outputs are untouched; anything else (a changed parameter, new data, a deleted or
edited output) runs it again.

Prefect's own task cache is not used: its key is computed before a run and cannot check that the
outputs it would skip to still exist on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional

from .config import Params

STAGES = ("prepare", "pretrain", "init", "train", "evaluate")

# data.* keys that shape the shards; the others only steer the loader.
_PREPARE_KEYS = ("source", "path", "image_column", "caption_column", "caption_templates", "eval_path",
                 "output_dir", "samples_per_shard", "max_skipped_fraction", "version", "remote", "seed")


def output_dir(params: Params, stage: str) -> Path:
    return Path({"prepare": params.data.output_dir, "pretrain": params.pretrain.output_dir,
                 "init": params.init.output_dir,
                 "train": params.train.output_dir, "evaluate": params.eval.output_dir}[stage])


def stamp_path(params: Params, stage: str) -> Path:
    out = output_dir(params, stage).resolve()
    return out.with_name(f"{out.name}.stage.json")


def stage_key(params: Params, stage: str) -> str:
    """The digest of everything that decides the stage's outputs."""
    return _digest(_key_parts(params, stage))


def current(params: Params, stage: str, key: Optional[str] = None) -> Optional[dict]:
    """The summary recorded by the last run of `stage` if its key and outputs are unchanged, else None.

    `key`: the stage's key if the caller has it already (it hashes weight files: compute it once)."""
    path = stamp_path(params, stage)
    try:
        stamp = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if stamp.get("key") != (key or stage_key(params, stage)):
        return None
    if stamp.get("outputs") != tree_signature(output_dir(params, stage)):
        return None
    return stamp["summary"]


def record(params: Params, stage: str, summary: dict, key: Optional[str] = None) -> None:
    """Remember that `stage` ran with `key` (default: the current one) and produced the outputs now on disk."""
    path = stamp_path(params, stage)
    stamp = {"stage": stage, "key": key or stage_key(params, stage),
             "outputs": tree_signature(output_dir(params, stage)), "summary": summary}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(stamp, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def forget(params: Params, stage: str) -> None:
    stamp_path(params, stage).unlink(missing_ok=True)


def tree_signature(path: Path) -> str:
    """Names, sizes and modification times of every file under `path` (cheap: nothing is read)."""
    path = Path(path)
    if path.is_file():
        stat = path.stat()
        return _digest([path.name, stat.st_size, stat.st_mtime_ns])
    if not path.is_dir():
        return "missing"
    entries = []
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        stat = file.stat()
        entries.append([str(file.relative_to(path)), stat.st_size, stat.st_mtime_ns])
    return _digest(entries)


def _key_parts(params: Params, stage: str) -> dict[str, Any]:
    if stage == "prepare":
        from .data.sources import FASHION_MNIST_DIR

        data = params.data.model_dump(mode="json")
        source = params.data.path or (FASHION_MNIST_DIR if params.data.source == "fashion_mnist" else None)
        return {"data": {k: data[k] for k in _PREPARE_KEYS},
                "source_files": tree_signature(source) if source else None,
                "eval_files": tree_signature(params.data.eval_path) if params.data.eval_path else None}
    if stage == "pretrain":
        from .data.loader import shard_sets_manifests

        teacher = params.pretrain.teacher or ""
        return {"model": params.model.name, "pretrain": params.pretrain.model_dump(mode="json"),
                "teacher": teacher if teacher.startswith("models:/") else tree_signature(teacher) if teacher else None,
                "data": _digest(shard_sets_manifests(params.data)),
                "hardware": {k: getattr(params.train, k) for k in ("devices", "nodes", "precision", "zero_stage")}}
    if stage == "init":
        init = params.init.model_dump(mode="json")
        return {"model": params.model.name, "init": init,
                "weights": {k: tree_signature(init[k]) for k in ("vision", "text") if init[k]}}
    if stage == "train":
        from .train.engine import init_checkpoint, run_recipe

        start = init_checkpoint(params)
        return run_recipe(params, Path(start) if start is not None and Path(start).is_file() else None)
    if stage == "evaluate":
        from .data.evalsets import load_eval_set
        from .data.shards import sha256
        from .eval import default_checkpoint
        from .tracking.store import tracking_uri

        checkpoint = Path(params.eval.checkpoint or default_checkpoint(params))
        return {"model": params.model.name, "eval": params.eval.model_dump(mode="json"),
                "checkpoint": sha256(checkpoint) if checkpoint.is_file() else "missing",
                "sets": [load_eval_set(s, params.eval.templates).identity for s in params.eval.sets],
                "tracking": {**params.tracking.model_dump(mode="json"), "resolved_uri": tracking_uri(params)}}
    raise ValueError(f"unknown stage {stage!r}; one of {STAGES}")


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
