"""Reading and writing weight files, safely.

Reading never executes code from a file: safetensors, or `torch.load(weights_only=True)` for
PyTorch pickles. TorchScript archives (OpenAI's original CLIP `.pt` files) can run code when loaded,
so they are read only when the user says they trust them (`init.trust_torchscript`).
Writing is atomic: a temporary name in the same folder, then a rename.
"""

from __future__ import annotations

import argparse
import os
import pickle
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import CheckpointError

# Plain-data classes that real training checkpoints pickle beside the weights (EVA's scripts save
# their argparse namespace as `args`); allowing them lets weights_only loading read those files.
SAFE_GLOBALS = [argparse.Namespace]

# Wrappers that training scripts put around a model's state dict (EVA, DeiT, DeepSpeed, Lightning).
WRAPPER_KEYS = ("model_ema", "model", "module", "state_dict")


def read_state_dict(path: str | Path, trust_torchscript: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a weight file, unwrapped from `model`/`module`/`model_ema`/`state_dict`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weight file not found")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as err:  # safetensors raises its own error types for truncated files
            raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
    if _is_torchscript(path):
        if not trust_torchscript:
            raise CheckpointError(
                f"{path}: refused: a TorchScript archive (like OpenAI's original CLIP .pt files) can run code "
                "when loaded. If you trust it, set init.trust_torchscript=true, or convert it once to safetensors."
            )
        return _read_torchscript(path)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path}: refused: this pickle needs code execution to load ({str(err).splitlines()[0]}). "
            "Only tensors and plain containers are loaded, so a file from an untrusted source cannot run "
            "code. If you trust it, convert it once to safetensors: "
            "`safetensors.torch.save_file(torch.load(path, weights_only=False)['model'], 'out.safetensors')`."
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint, truncated or corrupt? ({err})") from None
    return unwrap_state_dict(obj, path)


def unwrap_state_dict(obj: object, path: str | Path = "<memory>") -> dict[str, torch.Tensor]:
    """Descend through the wrapper keys training scripts use; keep only the tensors."""
    while isinstance(obj, Mapping):
        wrapper = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if wrapper is None:
            break
        obj = obj[wrapper]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state dict (a mapping of names to tensors), got {type(obj).__name__}")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: holds no tensors (keys: {', '.join(list(obj)[:10])})")
    return tensors


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


def _read_torchscript(path: Path) -> dict[str, torch.Tensor]:
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except RuntimeError as err:
        raise CheckpointError(f"{path}: not a readable TorchScript archive ({err})") from None
    return dict(module.state_dict())


def write_state_dict(state_dict: Mapping[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Save tensors as safetensors, atomically (a crash never leaves a half-written file at `path`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def load_model_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Load one of our own checkpoints (the full model's state dict) strictly, naming every mismatch."""
    state_dict = read_state_dict(path)
    problems = state_dict_mismatches(model.state_dict(), state_dict)
    if problems:
        raise CheckpointError(f"{path}: does not fit the model:\n" + "\n".join(f"  {p}" for p in problems))
    model.load_state_dict(state_dict, strict=True)


def state_dict_mismatches(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> list[str]:
    """Missing, unexpected and wrongly shaped keys, one line each."""
    problems = [f"missing: {k} {tuple(v.shape)}" for k, v in expected.items() if k not in given]
    problems += [f"unexpected: {k} {tuple(v.shape)}" for k, v in given.items() if k not in expected]
    problems += [
        f"shape: {k} is {tuple(given[k].shape)} in the file, {tuple(v.shape)} in the model"
        for k, v in expected.items()
        if k in given and tuple(given[k].shape) != tuple(v.shape)
    ]
    return problems
