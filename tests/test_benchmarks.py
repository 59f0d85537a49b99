"""The benchmark scripts keep working: the GPU check runs its own code path on the CPU (`--smoke`), and the
summary collects whatever results exist."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from deploy.stack import free_port

from .conftest import REPO


def test_the_gpu_check_runs_its_training_steps_on_a_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    env = dict(os.environ, MASTER_PORT=str(free_port()), OMP_NUM_THREADS="2")
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--smoke", "--out", str(out)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["batch"] == 4 and report["zero_stage"] == 1
    for masking in ("0.0", "0.5"):
        figures = report["masking"][masking]
        assert figures["samples_per_s"] > 0 and 0 < figures["mfu"]
    assert report["masking_speedup_0_5"] > 0
