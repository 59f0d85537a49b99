"""What defines a training run (its recipe), for a resume to check that it continues the same run.

Kept apart from the training loop: the launcher checks the recipe before it starts any rank, without
importing the model and DeepSpeed.
"""

from __future__ import annotations

import math
from pathlib import Path

from ..config import Params
from ..errors import EvaclipError


def init_checkpoint(params: Params) -> Path | None:
    if params.train.init_checkpoint is not None:
        return params.train.init_checkpoint
    default = Path(params.init.output_dir) / "model.safetensors"
    return default if default.is_file() else None


# Settings that may change between a run and its resume; everything else must match.
RESUMABLE = {"train.resume", "train.output_dir", "train.log_every", "train.checkpoint_every",
             "train.keep_checkpoints", "train.launcher", "train.max_nonfinite_steps", "data.workers",
             "data.read_retries", "data.retry_delay", "data.near_duplicate_bits", "data.dedup_against_eval",
             # where it runs: any number of nodes and processes, as long as the global batch stays (below)
             "train.devices", "train.nodes", "train.batch_size", "train.grad_accum_steps", "train.hostfile",
             "train.rdzv_endpoint", "train.checkpoint_uri", "train.kubernetes"}
# (what deduplication changed is in data.shards: the manifests' exclusion lists are part of it)


def run_recipe(params: Params, init_checkpoint: Path | None = None) -> dict[str, str]:
    """What defines a training run, flattened: a resume must continue the same recipe, on the same data
    (the shard checksums of the manifests) from the same initial weights (their SHA-256)."""
    from ..data.loader import data_manifest_version
    from ..data.shards import sha256

    flat: dict[str, str] = {}
    for section in ("model", "train", "data"):
        for key, value in getattr(params, section).model_dump(mode="json").items():
            name = f"{section}.{key}"
            if name not in RESUMABLE:
                flat[name] = str(value)
    flat["train.global_batch_size"] = str(params.train.global_batch_size)
    flat["data.shards"] = data_manifest_version(params.data)
    flat["init.weights"] = sha256(Path(init_checkpoint)) if init_checkpoint else "random"
    return flat


def recipe_changes(saved: dict, current: dict) -> list[str]:
    """The recipe keys whose values differ. Settings that may change between a run and its resume are left
    out even where an older checkpoint recorded them, and its global batch is worked out from them."""
    parts = ("train.batch_size", "train.devices", "train.nodes", "train.grad_accum_steps")
    kept = {k: v for k, v in saved.items() if k not in RESUMABLE}
    if saved and "train.global_batch_size" not in saved and all(k in saved for k in parts):
        kept["train.global_batch_size"] = str(math.prod(int(saved[k]) for k in parts))
    return sorted(k for k in set(kept) | set(current) if kept.get(k) != current.get(k))


def check_same_recipe(saved: dict, current: dict, checkpoint: Path) -> None:
    changed = recipe_changes(saved, current)
    if saved and changed:
        raise EvaclipError(
            f"{checkpoint} was written by a different configuration ({', '.join(changed[:8])} changed): "
            "resuming it would mix two runs. Use another train.output_dir, or train.resume=false to start over."
        )
