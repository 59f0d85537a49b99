"""Training checkpoints: DeepSpeed's own files, written atomically, the last K kept.

A checkpoint is a folder `step_NNNNNNN/` holding DeepSpeed's model and (per-rank, ZeRO-partitioned)
optimizer states, the LR scheduler and loss scaler, our `trainer_state` (step, samples seen, epoch,
world size) and every rank's RNG states. It is written under a temporary name and renamed once all
ranks are done, so a crash at any moment leaves only complete checkpoints; `latest` names the newest.

With `train.checkpoint_uri` (object storage), DeepSpeed still writes locally; then each rank uploads
the files it wrote (its ZeRO partition, RNG and data state; rank 0 the model and trainer state), and
the remote `latest` moves only once every rank's upload succeeded. Before a resume, each node's
launcher downloads the newest checkpoint (`fetch_latest`): nodes need no shared filesystem.

A resume on another number of processes converts the checkpoint once into DeepSpeed's universal
format (`step_NNNNNNN/universal/`: per-parameter fp32 weights and optimizer moments), which any
ZeRO partitioning loads; DeepSpeed refuses its ZeRO-1 files on another data-parallel size.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from types import MethodType
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
    JSON-able state (its data streams' positions), read back by `load_rank_state`.

    Nodes may or may not share `root`: global rank 0 finalizes first, then each other node's first rank
    finalizes what its own disk holds (nothing left there on a shared filesystem)."""
    root = Path(root)
    rank, local_rank = dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    tag = _tag(state["step"])
    tmp_tag = f".tmp-{tag}"
    if rank == 0:
        shutil.rmtree(root / tmp_tag, ignore_errors=True)
    dist.barrier()
    if local_rank == 0:  # another node's disk: its own leftovers
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
        _finalize(root, tmp_tag, tag, keep)
    dist.barrier()
    if local_rank == 0 and rank != 0 and (root / tmp_tag).is_dir():
        _finalize(root, tmp_tag, tag, keep)
    dist.barrier()
    return root / tag


def _finalize(root: Path, tmp_tag: str, tag: str, keep: int) -> None:
    final = root / tag
    shutil.rmtree(final, ignore_errors=True)
    os.replace(root / tmp_tag, final)
    pointer = root / f".{LATEST}.{socket.gethostname()}.tmp"
    pointer.write_text(tag + "\n")
    os.replace(pointer, root / LATEST)
    # Keep the newest `keep` up to this step; never the one just written, nor a longer earlier run's.
    earlier = sorted(p for p in root.glob("step_*") if p.name < tag)
    for old in earlier[: max(0, len(earlier) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)


UNIVERSAL = "universal"


def to_universal(path: Path) -> Path:
    """Collective: the checkpoint in DeepSpeed's universal format, converted by each node's first rank if
    absent (nodes need not share a filesystem); the conversion is kept beside the checkpoint."""
    path = Path(path)
    target = path / UNIVERSAL
    error = None
    if int(os.environ.get("LOCAL_RANK", "0")) == 0 and not target.is_dir():
        try:
            _convert_to_universal(path, target)
        except Exception as err:  # noqa: BLE001 - every rank must hear of it, not wait at the barrier
            error = f"{type(err).__name__}: {err}"
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    if any(errors):
        from ..errors import EvaclipError

        raise EvaclipError(f"converting {path} for a resume on {dist.get_world_size()} processes failed: "
                           f"{next(e for e in errors if e)}")
    return target


def _convert_to_universal(path: Path, target: Path) -> None:
    from argparse import Namespace

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    work = path / f".{UNIVERSAL}.{socket.gethostname()}.{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    source = _with_scalars_as_vectors(path, work / "source")
    # One worker: no process pool inside a training rank. Our client state carries no universal-checkpoint
    # marker, which the converter wants: it injects one.
    ds_to_universal(Namespace(input_folder=str(source), output_folder=str(work / "out"), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True))
    for model_states in path.glob("mp_rank_*_model_states.pt"):  # the original metadata, not the view's
        shutil.copy2(model_states, work / "out" / model_states.name)
    try:
        os.replace(work / "out", target)
    except OSError:  # another node converted it into the same (shared) folder first
        pass
    shutil.rmtree(work, ignore_errors=True)


def _with_scalars_as_vectors(path: Path, view: Path) -> Path:
    """The checkpoint as DeepSpeed 0.19.7's converter can read it: it concatenates each parameter's pieces,
    which fails on 0-dim ones (open_clip's `logit_scale`), so the view records them as shape [1]. The
    optimizer files are linked, not copied; loading matches the universal files by element count."""
    view.mkdir(parents=True)
    for file in path.iterdir():
        if file.name.startswith("mp_rank_") and file.name.endswith("_model_states.pt"):
            states = torch.load(file, map_location="cpu", weights_only=False)
            states["param_shapes"] = [{name: shape if len(shape) else torch.Size([1]) for name, shape in group.items()}
                                      for group in states["param_shapes"]]
            torch.save(states, view / file.name)
        elif file.is_file():
            os.symlink(file.resolve(), view / file.name)
    return view


# DeepSpeed's per-rank optimizer files (`bf16_zero_pp_rank_N_...` in bf16) and ours.
_RANK_FILES = re.compile(r"^(?:(?:bf16_)?zero_pp_rank_(\d+)_.*|rng_rank(\d+)\.pt|rank(\d+)_state\.json)$")


def _owner(name: str) -> int:
    """The rank that wrote a checkpoint file: its own partition and state files; rank 0 the rest."""
    match = _RANK_FILES.match(name)
    return int(next(group for group in match.groups() if group is not None)) if match else 0


def upload(path: Path, uri: str, keep: int) -> bool:
    """Collective, after `save`: every rank uploads its files of checkpoint `path` to `uri`/<tag>/; rank 0 then
    points `uri`/latest at it and drops the remote checkpoints past the newest `keep`. Returns whether the
    upload succeeded everywhere; a failure leaves the remote `latest` where it was (and the local copy), is
    reported, and training goes on."""
    from ..data.storage import filesystem

    path, rank = Path(path), dist.get_rank()
    error = None
    try:
        fs, base = filesystem(uri)
        for file in sorted(p for p in path.iterdir() if p.is_file() and _owner(p.name) == rank):
            fs.put_file(str(file), f"{base}/{path.name}/{file.name}")
    except Exception as err:  # noqa: BLE001 - any store error: reported, the run goes on from the local copy
        error = f"rank {rank}: {type(err).__name__}: {err}"
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    errors = [e for e in errors if e]
    if rank == 0 and not errors:
        try:
            fs.pipe_file(f"{base}/{LATEST}", (path.name + "\n").encode())
            remote = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(base, detail=False))
            older = [tag for tag in remote if tag.startswith("step_") and tag < path.name]
            for tag in older[: max(0, len(older) - (keep - 1))]:
                fs.rm(f"{base}/{tag}", recursive=True)
        except Exception as err:  # noqa: BLE001 - as above: the previous `latest` (or this one) stays valid
            errors.append(f"rank 0, moving {LATEST}: {type(err).__name__}: {err}")
    if rank == 0 and errors:
        print(f"warning: checkpoint {path.name} not uploaded to {uri} ({'; '.join(errors)}); it is kept in "
              f"{path.parent}, and {uri}/{LATEST} still names the previous one", flush=True)
    dist.barrier()
    return not errors


def fetch_latest(uri: str, root: Path, accept: Callable[[dict], bool] = lambda state: True) -> Optional[Path]:
    """Before a resume, on each node: make the checkpoint that `uri`/latest names complete in `root` (every
    rank's files: a node's own disk holds only its ranks'), unless `accept(its trainer state)` refuses it.
    The store is the reference: a newer local checkpoint that never reached it is not resumed. Returns the
    local checkpoint, or None."""
    from ..data.storage import filesystem
    from ..errors import EvaclipError

    root = Path(root)
    fs, base = filesystem(uri)
    try:
        tag = fs.cat_file(f"{base}/{LATEST}").decode().strip()
        state = json.loads(fs.cat_file(f"{base}/{tag}/{TRAINER_STATE}"))
    except FileNotFoundError:
        return None  # nothing uploaded yet
    except Exception as err:  # noqa: BLE001 - unreachable, refused: say which store
        raise EvaclipError(f"train.checkpoint_uri: cannot read {uri}/{LATEST}: {type(err).__name__}: {err}") from err
    if not accept(state):
        return None
    target = root / tag
    target.mkdir(parents=True, exist_ok=True)
    for remote, info in fs.find(f"{base}/{tag}", detail=True).items():
        local = target / remote[len(f"{base}/{tag}/"):]
        if local.is_file() and local.stat().st_size == info.get("size"):
            continue
        local.parent.mkdir(parents=True, exist_ok=True)
        partial = local.with_name(f".{local.name}.{socket.gethostname()}.{os.getpid()}")
        fs.get_file(remote, str(partial))
        os.replace(partial, local)  # whole files only, even with several nodes on one shared folder
    pointer = root / f".{LATEST}.{socket.gethostname()}.{os.getpid()}.tmp"
    pointer.write_text(tag + "\n")
    os.replace(pointer, root / LATEST)
    return target


RUN_OUTPUTS = ("model.safetensors", "metrics.jsonl", "metrics.csv", "data_report.json")


def upload_outputs(out: Path, uri: str) -> None:
    """Rank 0, at the end: the run's outputs beside its checkpoints (what a TrainJob hands to evaluation)."""
    from ..data.storage import filesystem

    fs, base = filesystem(uri)
    for name in RUN_OUTPUTS:
        if (Path(out) / name).is_file():
            fs.put_file(str(Path(out) / name), f"{base}/outputs/{name}")


def fetch_outputs(uri: str, out: Path) -> None:
    from ..data.storage import filesystem

    fs, base = filesystem(uri)
    Path(out).mkdir(parents=True, exist_ok=True)
    for name in RUN_OUTPUTS:
        if fs.exists(f"{base}/outputs/{name}"):
            fs.get_file(f"{base}/outputs/{name}", str(Path(out) / name))


def load(engine, path: Path, universal: bool = False) -> dict:
    """Restore model, optimizer, scheduler, loss scaler and this rank's RNG; returns the trainer state.
    `universal`: from `to_universal(path)` (the engine was configured with `load_universal`)."""
    path = Path(path)
    load_dir, tag = (path, UNIVERSAL) if universal else (path.parent, path.name)
    if universal:
        engine.optimizer.load_hp_checkpoint_state_from_checkpoint_dir = MethodType(
            _load_universal_zero_partition, engine.optimizer)
    _, client_state = engine.load_checkpoint(str(load_dir), tag=tag, load_optimizer_states=True,
                                             load_lr_scheduler_states=True)
    rng_file = path / f"rng_rank{dist.get_rank()}.pt"
    if rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=True))
    return client_state["trainer_state"]


def load_rank_state(path: Path) -> dict:
    """What `save` wrote as this rank's `rank_state` ({} for checkpoints without one)."""
    file = Path(path) / f"rank{dist.get_rank()}_state.json"
    return json.loads(file.read_text()) if file.is_file() else {}


def has_rank_rng(path: Path) -> bool:
    """Whether this rank existed when the checkpoint was written (not after a resume on more processes)."""
    return (Path(path) / f"rng_rank{dist.get_rank()}.pt").is_file()


def skipped_shards(path: Path) -> dict[str, str]:
    """The shards every rank of the saved run had skipped (whatever the number of ranks now)."""
    skipped: dict[str, str] = {}
    for file in sorted(Path(path).glob("rank*_state.json")):
        skipped.update(json.loads(file.read_text()).get("data", {}).get("skipped", {}))
    return skipped


def _load_universal_zero_partition(self, lp_groups_name: str, checkpoint_dir: str) -> None:
    """DeepSpeed 0.19.7's `load_hp_checkpoint_state_from_checkpoint_dir` for ZeRO-1/2 without tensor or
    expert parallelism, and with one fix: a rank that owns no element of a parameter group loads only its
    hyperparameters. DeepSpeed's indexes an empty list there, and open_clip's `logit_scale` is a group of
    one element, which every rank but the first holds as padding only."""
    from deepspeed.utils.tensor_fragment import map_to_flat_opt_states

    checkpoint_dir = os.path.join(checkpoint_dir, "zero")
    saved = torch.load(os.path.join(checkpoint_dir, "optimizer_state.pt"), weights_only=False)
    self._load_global_state(saved)
    lp_groups = getattr(self, lp_groups_name)
    for group, saved_group, lp_group in zip(self.optimizer.param_groups, saved["param_groups"], lp_groups,
                                            strict=True):
        owned = [lp for lp in lp_group if lp._hp_mapping is not None]
        steps = [lp.load_hp_checkpoint_state(os.path.join(checkpoint_dir, self.param_names[lp]), 0, 1)
                 for lp in owned]
        if owned:
            flat = group["params"][0]
            if steps[0] is not None:
                self.optimizer.state[flat]["step"] = steps[0]
            keys = {key for lp in owned for key in lp._hp_mapping.get_optim_state_keys()}
            map_to_flat_opt_states(flat, lp_group, self.optimizer.state, keys)
        group.update({key: value for key, value in saved_group.items() if key != "params"})


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
