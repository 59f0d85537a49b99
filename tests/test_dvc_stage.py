"""`dvc repro` runs the same `evaclip` verbs as users do, in a real git + DVC repository."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO

BIN = Path(sys.executable).parent


def _run(args, cwd):
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", DVC_NO_ANALYTICS="1")
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{args}: {result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture
def project(tmp_path):
    """A copy of this project's pipeline files in a fresh git repository with DVC initialized."""
    root = tmp_path / "project"
    root.mkdir()
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, root / name)
    shutil.copytree(REPO / "evaclip", root / "evaclip", ignore=shutil.ignore_patterns("__pycache__"))
    _run(["git", "init", "-q"], root)
    _run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "root"], root)
    _run(["dvc", "init", "-q"], root)
    return root


def test_dvc_repro_runs_init_once_and_again_only_when_its_params_change(project):
    _run(["dvc", "repro"], project)
    checkpoint = project / "outputs/init/model.safetensors"
    assert checkpoint.is_file() and (project / "outputs/init/init_report.json").is_file()
    first = checkpoint.read_bytes()

    assert "didn't change" in _run(["dvc", "repro"], project)

    params = project / "params.yaml"
    params.write_text(params.read_text().replace("  seed: 0\n", "  seed: 1\n", 1))  # init.seed
    assert "Running stage 'init'" in _run(["dvc", "repro"], project)
    assert checkpoint.read_bytes() != first
    assert "init.seed" in _run(["dvc", "params", "diff"], project)
