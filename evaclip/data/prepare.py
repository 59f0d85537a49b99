"""`evaclip prepare`: a data source -> webdataset shards in data.output_dir (dvc.yaml's `prepare` stage).

Layout of `data.output_dir` (a DVC-cached output of that stage):
    train/             shard-*.tar, manifest.json, quality.json   (image, caption, class)
    eval/<name>/       shard-*.tar, manifest.json, classnames.txt, zeroshot_classification_templates.txt
    train/mix/<name>/  manifest.json, quality.json of a data.mix entry used in place (training depends on train/)
    dedup.json         training images that duplicate evaluation images, per set (exact, near)
Existing webdataset shards (`data.source: wds`, local or remote) are used in place: train/ then holds only
their manifest (evaclip.data.index), which DVC versions instead of the bytes.
"""

from __future__ import annotations

import itertools
import json
import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..config import Params
from ..errors import ConfigError
from . import storage
from .dedup import DEDUP_REPORT, EvalIndex, image_hashes
from .evalsets import load_eval_set, openai_templates
from .index import index_shards
from .loader import mix_folder
from .shards import write_shard_set
from .sources import SOURCES, Item, Sample

log = logging.getLogger(__name__)


@dataclass
class PrepareResult:
    train_dir: Path
    manifest: Optional[dict]  # None: data.mix alone is the training data
    eval_dirs: list[Path]
    manifests: dict[str, dict]  # every shard set written: folder -> its manifest


def prepare(params: Params) -> PrepareResult:
    cfg = params.data
    out = Path(cfg.output_dir)
    _warn_if_unwatched(cfg)
    evals = EvalIndex(cfg.near_duplicate_bits)
    eval_dirs: list[Path] = []
    manifest = None
    if cfg.source == "wds":
        if cfg.path is None and not cfg.mix:
            raise ConfigError("data.path: required for data.source wds (webdataset shards: a folder, s3://..., https://...)")
        _add_eval_sets(evals, params)
        if cfg.path is not None:  # else the mixture's entries are the training data
            manifest = index_shards(cfg.path, out / "train", cfg.max_skipped_fraction, evals, cfg.dedup_against_eval)
    else:
        source = SOURCES[cfg.source](
            path=cfg.path, templates=cfg.caption_templates, seed=cfg.seed,
            image_column=cfg.image_column, caption_column=cfg.caption_column,
        )
        described = {"source": {"type": cfg.source, "path": str(cfg.path) if cfg.path else None}}
        if source.classnames:
            described["classnames"] = source.classnames
        if source.eval_samples is not None:  # first: its images are what training images are checked against
            eval_dir = out / "eval" / cfg.source
            write_shard_set(
                _hashed(source.eval_samples, evals, cfg.source), eval_dir, cfg.samples_per_shard,
                cfg.max_skipped_fraction, needs_caption=False,
                extra_manifest=dict(described, split="test"),
                extra_files={
                    "classnames.txt": "\n".join(source.classnames or []) + "\n",
                    "zeroshot_classification_templates.txt": "\n".join(openai_templates()) + "\n",
                },
            )
            eval_dirs.append(eval_dir)
        _add_eval_sets(evals, params)
        manifest = write_shard_set(
            _deduplicated(source.samples, evals, cfg.dedup_against_eval), out / "train", cfg.samples_per_shard,
            cfg.max_skipped_fraction, extra_manifest=described,
        )
    manifests = {str(out / "train"): manifest} if manifest else {}
    (out / "train").mkdir(parents=True, exist_ok=True)  # the training data's folder (what train depends on), even mix-only
    shutil.rmtree(out / "train" / "mix", ignore_errors=True)  # no manifest of an earlier mixture stays behind
    for index, entry in enumerate(cfg.mix):  # shards used in place: indexed, never copied
        folder = mix_folder(cfg, index)
        if folder != Path(entry.path):
            manifests[str(folder)] = index_shards(entry.path, folder, cfg.max_skipped_fraction, evals,
                                                  cfg.dedup_against_eval)
    (out / DEDUP_REPORT).write_text(json.dumps(evals.report(), indent=2) + "\n")
    return PrepareResult(out / "train", manifest, eval_dirs, manifests)


def _warn_if_unwatched(cfg) -> None:
    """dvc.yaml's prepare watches data/ (data.dvc's folder): a local source elsewhere changes unseen."""
    if cfg.source == "wds" or cfg.path is None or storage.is_remote(cfg.path):
        return
    path = Path(cfg.path).resolve()
    if not path.is_relative_to(Path("data").resolve()):
        log.warning("data.path %s is outside data/: `dvc repro` does not see it change (track it with "
                    "`dvc import-url %s data`, or run `dvc repro -f -s prepare` after a change)", cfg.path, cfg.path)


def _hashed(items: Iterator[Item], evals: EvalIndex, name: str) -> Iterator[Item]:
    for item in items:
        if isinstance(item, Sample):
            try:
                evals.add(name, item.image)
            except Exception:  # noqa: BLE001 - an undecodable image is reported by the shard writer
                pass
        yield item


def _deduplicated(items: Iterator[Item], evals: EvalIndex, drop: bool, block: int = 512) -> Iterator[Item]:
    """`items`, each training image checked against the evaluation images (in blocks: one vectorised search)."""
    if not evals.names:
        yield from items
        return
    for chunk in iter(lambda: list(itertools.islice(items, block)), []):
        hashes, checked = [], []
        for item in chunk:
            try:
                hashes.append(image_hashes(item.image))
                checked.append(item)
            except Exception:  # noqa: BLE001 - a Skip, or an undecodable image: the shard writer counts it
                pass
        duplicates = {id(item) for item, dup in zip(checked, evals.check_many(hashes), strict=True) if dup}
        for item in chunk:
            if drop and id(item) in duplicates:
                evals.dropped += 1
                continue
            yield item


def _add_eval_sets(evals: EvalIndex, params: Params) -> None:
    """The configured evaluation sets that exist now, except those this stage writes itself."""
    written = Path(params.data.output_dir).resolve()
    for path in params.eval.sets:
        root = Path(path).resolve()
        if root.is_relative_to(written) or not root.exists():
            continue
        for image, _ in load_eval_set(root).samples():
            evals.add(root.name, image)
