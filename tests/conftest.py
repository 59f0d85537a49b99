"""Shared fixtures: the demo params, and weight files in the real published key layouts.

No weights can be downloaded here, so the tests write small files themselves, laid out exactly as
the published formats are (timm, original EVA/EVA-02 MIM, EVA-CLIP, open_clip, OpenAI, Hugging Face).
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import timm
import torch

import evaclip.model  # noqa: F401  (registers the demo towers with timm)
from evaclip.config import load_params
from evaclip.model import create_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Flows run outside `prefect_test_harness` start Prefect's ephemeral server on PREFECT_HOME's database: one of
# this session's own (each xdist worker's), never the user's ~/.prefect. Set before Prefect is imported.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="evaclip-tests-prefect-")
atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], ignore_errors=True)  # after Prefect's server stops
REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@pytest.fixture(autouse=True)
def _tracking_env_restored():
    """MLflow writes MLFLOW_* variables into os.environ (set_tracking_uri, runs); the flows read EVACLIP_HOME.
    Each test gets them back as they were, so that no test's store or project leaks into the next one."""
    prefixes = ("MLFLOW_", "EVACLIP_")
    saved = {k: v for k, v in os.environ.items() if k.startswith(prefixes)}
    yield
    for key in [k for k in os.environ if k.startswith(prefixes)]:
        del os.environ[key]
    os.environ.update(saved)


def sh(args, cwd, env=None, timeout=900) -> str:
    """Run a command as a user would (the venv's tools on PATH); fail the test with its output."""
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", DVC_NO_ANALYTICS="1", **(env or {}))
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{args}: {result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def git_commit(root: Path, message: str = "step") -> None:
    sh(["git", "add", "-A"], root)
    sh(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", message], root)


def make_project(root: Path, overrides: list[str], remote: Path | None = None, data_dvc: bool = False) -> Path:
    """This project's pipeline (dvc.yaml, bin/, evaclip/, params.yaml with `overrides`) in a new git + DVC repo."""
    import yaml

    root.mkdir(parents=True)
    for name in ("dvc.yaml", ".dvcignore", ".gitignore", *(["data.dvc"] if data_dvc else [])):
        shutil.copy(REPO / name, root / name)
    shutil.copytree(REPO / "bin", root / "bin")
    shutil.copytree(REPO / "evaclip", root / "evaclip", ignore=shutil.ignore_patterns("__pycache__"))
    params = load_params(REPO / "params.yaml", overrides)
    (root / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
    (root / ".venv").symlink_to(Path(sys.prefix))  # as `make setup` leaves it: bin/evaclip finds it
    if not data_dvc:
        (root / "data").mkdir()  # the source folder dvc.yaml's prepare watches (data.dvc's, in the real project)
    sh(["git", "init", "-q"], root)
    (root / ".git" / "info" / "exclude").write_text(".venv\n")
    sh(["dvc", "init", "-q"], root)
    if remote is not None:
        sh(["dvc", "remote", "add", "-d", "local", str(remote)], root)
    git_commit(root, "project")
    return root

# timm key -> original EVA-02 key (the inverse of timm's checkpoint_filter_fn renames).
TIMM_TO_EVA = {
    "attn.norm.": "attn.inner_attn_ln.",
    "mlp.norm.": "mlp.ffn_ln.",
    "mlp.fc1_g.": "mlp.w1.",
    "mlp.fc1_x.": "mlp.w2.",
    "mlp.fc2.": "mlp.w3.",
    "attn.q_proj.bias": "attn.q_bias",
    "attn.v_proj.bias": "attn.v_bias",
}


def to_eva_layout(timm_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in timm_state.items():
        for old, new in TIMM_TO_EVA.items():
            key = key.replace(old, new)
        out[key] = value
    return out


def randomized(state: dict[str, torch.Tensor], seed: int = 1) -> dict[str, torch.Tensor]:
    """Distinct random values in every tensor, so a tensor loaded into the wrong place is caught."""
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen) for k, v in state.items()}


@pytest.fixture
def params(tmp_path):
    """The demo profile, writing into a temporary folder."""
    return load_params(REPO / "params.yaml", [f"init.output_dir={tmp_path / 'init'}"])


@pytest.fixture(scope="session")
def demo_model_state():
    from evaclip.config import ModelConfig

    torch.manual_seed(0)
    return randomized(create_model(ModelConfig()).state_dict(), seed=7)


@pytest.fixture
def eva_mim_checkpoint(tmp_path):
    """An original EVA-02 MIM checkpoint: patch 6 on a 7x7 grid (resampled to the demo's 4 / 8x8),
    EVA key names, MIM-only tensors, rope buffers, an argparse namespace, wrapped in `model`."""
    import argparse

    source = timm.create_model("eva02_demo_patch4_mim_32", img_size=42, patch_size=6)
    timm_state = randomized(source.state_dict(), seed=3)
    eva_state = to_eva_layout(timm_state)
    dim = timm_state["cls_token"].shape[-1]
    eva_state.update({
        "mask_token": torch.zeros(1, 1, dim),
        "lm_head.weight": torch.randn(1024, dim),
        "lm_head.bias": torch.zeros(1024),
        "rope.freqs_cos": torch.randn(49, 64),
        "rope.freqs_sin": torch.randn(49, 64),
    })
    path = tmp_path / "eva02_demo_mim.pt"
    torch.save({"model": eva_state, "args": argparse.Namespace(lr=1.5e-3), "epoch": 299}, path)
    return path, timm_state
