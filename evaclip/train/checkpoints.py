"""Training checkpoints: DeepSpeed's own files, written atomically, the last K kept.

A checkpoint is a folder `step_NNNNNNN/` holding DeepSpeed's model and (per-rank, ZeRO-partitioned)
optimizer states, the LR scheduler and loss scaler, our `trainer_state` (step, samples seen, epoch)
and every rank's RNG states. It is written under a temporary name and renamed once all ranks are
done, so a crash at any moment leaves only complete checkpoints; `latest` names the newest.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

LATEST = "latest"
TRAINER_STATE = "trainer_state.json"


def _tag(step: int) -> str:
    return f"step_{step:07d}"


def latest_checkpoint(root: Path) -> Optional[Path]:
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    path = Path(root) / pointer.read_text().strip()
    return path if path.is_dir() else None


def trainer_state(path: Path) -> dict:
    """The trainer state of a checkpoint, read without loading the model (for checks before resuming)."""
    meta = Path(path) / TRAINER_STATE
    return json.loads(meta.read_text()) if meta.is_file() else {}


def remove_all(root: Path) -> None:
    """Drop every checkpoint in `root` (another recipe's: resuming them would mix two runs)."""
    for path in Path(root).glob("step_*"):
        shutil.rmtree(path, ignore_errors=True)
    (Path(root) / LATEST).unlink(missing_ok=True)


def save(engine, root: Path, state: dict, keep: int, rank_state: Optional[dict] = None) -> Path:
    """Collective: every rank calls it. Returns the checkpoint folder. `rank_state`: this rank's own
    JSON-able state (its data streams' positions), read back by `load_rank_state`."""
    root = Path(root)
    rank = dist.get_rank()
    tag = _tag(state["step"])
    tmp_tag = f".tmp-{tag}"
    if rank == 0:
        shutil.rmtree(root / tmp_tag, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    engine.save_checkpoint(str(root), tag=tmp_tag, client_state={"trainer_state": state}, save_latest=False)
    torch.save(_rng_state(), root / tmp_tag / f"rng_rank{rank}.pt")
    if rank_state is not None:
        (root / tmp_tag / f"rank{rank}_state.json").write_text(json.dumps(rank_state) + "\n")
    if rank == 0:
        (root / tmp_tag / TRAINER_STATE).write_text(json.dumps(state, indent=2) + "\n")
    dist.barrier()
    if rank == 0:
        final = root / tag
        shutil.rmtree(final, ignore_errors=True)
        os.replace(root / tmp_tag, final)
        pointer = root / f".{LATEST}.tmp"
        pointer.write_text(tag + "\n")
        os.replace(pointer, root / LATEST)
        # Keep the newest `keep` up to this step; never the one just written, nor a longer earlier run's.
        earlier = sorted(p for p in root.glob("step_*") if p.name < tag)
        for old in earlier[: max(0, len(earlier) - (keep - 1))]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return root / tag


def load(engine, path: Path) -> dict:
    """Restore model, optimizer, scheduler, loss scaler and this rank's RNG; returns the trainer state."""
    path = Path(path)
    _, client_state = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                             load_lr_scheduler_states=True)
    rng_file = path / f"rng_rank{dist.get_rank()}.pt"
    if rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=True))
    return client_state["trainer_state"]


def load_rank_state(path: Path) -> dict:
    """What `save` wrote as this rank's `rank_state` ({} for checkpoints without one)."""
    file = Path(path) / f"rank{dist.get_rank()}_state.json"
    return json.loads(file.read_text()) if file.is_file() else {}


def _rng_state() -> dict:
    # Plain tuples, ints and tensors only, so that loading needs no pickled classes (weights_only=True).
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(gauss))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
