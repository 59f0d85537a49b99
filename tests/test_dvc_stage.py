"""`dvc repro` runs the same `evaclip` verbs as users do, in a real git + DVC repository."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from evaclip.config import load_params

from .conftest import REPO
from .test_data import image_folder, red_blue_pairs

BIN = Path(sys.executable).parent


def _run(args, cwd):
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", DVC_NO_ANALYTICS="1", OMP_NUM_THREADS="1")
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{args}: {result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def _project(root: Path, overrides: list[str]) -> Path:
    """This project's pipeline files in a fresh git repository with DVC and a local remote."""
    root.mkdir()
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    shutil.copytree(REPO / "evaclip", root / "evaclip", ignore=shutil.ignore_patterns("__pycache__"))
    params = load_params(REPO / "params.yaml", overrides)
    (root / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
    _run(["git", "init", "-q"], root)
    _run(["dvc", "init", "-q"], root)
    _run(["dvc", "remote", "add", "-d", "local", str(root.parent / "remote")], root)
    _commit(root)
    return root


def _commit(root: Path) -> None:
    _run(["git", "add", "-A"], root)
    _run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "step"], root)


def test_dvc_repro_runs_init_once_and_again_only_when_its_params_change(tmp_path):
    source = image_folder(tmp_path / "source", per_class=2)
    project = _project(tmp_path / "project", ["data.source=image_folder", f"data.path={source}",
                                              "data.samples_per_shard=4"])
    _run(["evaclip", "prepare"], project)
    _commit(project)
    out = _run(["dvc", "repro", "init"], project)
    assert "Running stage 'pretrain'" in out  # upstream of init; without a teacher it only says so
    assert "pretrain.teacher is not set" in out
    checkpoint = project / "outputs/init/model.safetensors"
    assert checkpoint.is_file() and (project / "outputs/init/init_report.json").is_file()
    first = checkpoint.read_bytes()

    assert "didn't change" in _run(["dvc", "repro", "init"], project)

    params = project / "params.yaml"
    params.write_text(params.read_text().replace("  seed: 0\n", "  seed: 1\n", 1))  # init.seed
    assert "Running stage 'init'" in _run(["dvc", "repro", "init"], project)
    assert checkpoint.read_bytes() != first
    assert "init.seed" in _run(["dvc", "params", "diff"], project)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_dvc_repro_pipeline_reruns_only_what_a_changed_train_param_touches(tmp_path):
    source = red_blue_pairs(tmp_path / "pairs", 64)
    evalset = image_folder(tmp_path / "evalset", per_class=2)
    project = _project(tmp_path / "project", [
        "model.name=evaclip-micro", "data.source=pairs", f"data.path={source}", "data.samples_per_shard=16",
        "data.workers=0", "train.steps=4", "train.warmup_steps=1", "train.batch_size=8", "train.log_every=1",
        "train.checkpoint_every=4", f"eval.sets=[{evalset}]", "eval.templates=simple",
    ])
    _run(["evaclip", "prepare"], project)  # data/ + data.dvc, pushed
    _commit(project)

    first = _run(["dvc", "repro"], project)
    for stage in ("pretrain", "init", "train", "evaluate"):
        assert f"Running stage '{stage}'" in first
    assert "zeroshot_top1" in _run(["dvc", "metrics", "show"], project)
    assert (project / "outputs/train/metrics.csv").read_text().startswith("step,")
    _commit(project)
    second = _run(["dvc", "repro"], project)
    assert "Running stage" not in second  # nothing changed: nothing runs

    params = project / "params.yaml"
    params.write_text(params.read_text().replace("  lr: 0.002\n", "  lr: 0.001\n", 1))  # train.lr
    third = _run(["dvc", "repro"], project)
    assert "Running stage 'init'" not in third
    assert "Running stage 'train'" in third and "Running stage 'evaluate'" in third
    assert "train.lr" in _run(["dvc", "params", "diff"], project)
