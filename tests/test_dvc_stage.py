"""`dvc repro` runs the same `evaclip` verbs as users do, in a real git + DVC repository.

The whole pipeline under `dvc repro` (every stage, a changed parameter rerunning only what it touches, `dvc
metrics show`) is tested in tests/test_flows.py, whose flow runs each stage through DVC; here, one stage alone.
"""

from __future__ import annotations

import os
import subprocess

from .conftest import BIN, make_project, sh
from .test_data import image_folder


def _run(args, cwd):
    return sh(args, cwd, env={"OMP_NUM_THREADS": "1"})


def test_dvc_repro_runs_init_once_and_again_only_when_its_params_change(tmp_path):
    source = image_folder(tmp_path / "source", per_class=2)
    project = make_project(tmp_path / "project", ["data.source=image_folder", f"data.path={source}",
                                                  "data.samples_per_shard=4"])
    # No virtualenv activated, nothing of it on PATH: the stages' bin/evaclip finds the project's .venv.
    bare = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    bare["PATH"] = "/usr/local/bin:/usr/bin:/bin"
    result = subprocess.run([str(BIN / "dvc"), "repro", "init"], cwd=project, env=bare, capture_output=True, text=True)
    out = result.stdout
    assert result.returncode == 0, out[-3000:] + result.stderr[-3000:]
    assert "Running stage 'prepare'" in out and "Running stage 'pretrain'" in out  # upstream of init
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
