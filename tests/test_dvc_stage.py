"""`dvc repro` runs the same `evaclip` verbs as users do, in a real git + DVC repository."""

from __future__ import annotations

import os
import subprocess

import pytest

from .conftest import BIN, git_commit, make_project, sh
from .test_data import image_folder, red_blue_pairs


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


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_dvc_repro_pipeline_reruns_only_what_a_changed_train_param_touches(tmp_path):
    source = red_blue_pairs(tmp_path / "pairs", 64)
    evalset = image_folder(tmp_path / "evalset", per_class=2)
    project = make_project(tmp_path / "project", [
        "model.name=evaclip-micro", "data.source=pairs", f"data.path={source}", "data.samples_per_shard=16",
        "data.workers=0", "train.steps=4", "train.warmup_steps=1", "train.batch_size=8", "train.log_every=1",
        "train.checkpoint_every=4", f"eval.sets=[{evalset}]", "eval.templates=simple",
    ])
    first = _run(["dvc", "repro"], project)
    for stage in ("prepare", "pretrain", "init", "train", "evaluate"):
        assert f"Running stage '{stage}'" in first
    assert "zeroshot_top1" in _run(["dvc", "metrics", "show"], project)
    assert (project / "outputs/train/metrics.csv").read_text().startswith("step,")
    git_commit(project)
    second = _run(["dvc", "repro"], project)
    assert "Running stage" not in second  # nothing changed: nothing runs

    params = project / "params.yaml"
    params.write_text(params.read_text().replace("  lr: 0.002\n", "  lr: 0.001\n", 1))  # train.lr
    third = _run(["dvc", "repro"], project)
    assert "Running stage 'init'" not in third and "Running stage 'prepare'" not in third
    assert "Running stage 'train'" in third and "Running stage 'evaluate'" in third
    assert "train.lr" in _run(["dvc", "params", "diff"], project)
