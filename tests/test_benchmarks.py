"""The benchmark scripts keep working: the GPU check runs its commands on the CPU (`--smoke`), and the
summary collects whatever results exist."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .conftest import REPO


def test_the_gpu_check_runs_evaclip_prepare_train_and_evaluate_on_a_cpu(tmp_path):
    """benchmarks/gpu_check.py --smoke: the commands the GPU check runs, on evaclip-micro in fp32."""
    out = tmp_path / "gpu.json"
    env = dict(os.environ, OMP_NUM_THREADS="2")
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--smoke",
                             "--work", str(tmp_path / "work"), "--out", str(out)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["batch_per_gpu"] == 8 and report["model"] == "evaclip-micro"
    for name, masking in (("fp32_mask0.5", 0.5), ("fp32_mask0", 0.0)):
        run = report["runs"][name]
        assert run["token_masking"] == masking and run["steps"] == 4  # the real loop's own metrics file
        assert run["samples_per_s"] > 0 and run["mfu"] > 0
        assert (tmp_path / "work" / "runs" / name / "model.safetensors").is_file()
    assert report["masking_speedup_0_5"] == pytest.approx(
        report["runs"]["fp32_mask0.5"]["samples_per_s"] / report["runs"]["fp32_mask0"]["samples_per_s"])
    assert report["evaluate"]["dtype"] == "float32" and report["evaluate"]["device"] == "cpu"
    assert not (tmp_path / "work" / "runs" / "fp32_mask0" / "mlflow_run.json").exists()  # tracking off


