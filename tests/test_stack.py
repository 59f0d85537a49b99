"""`make stack` for real: PostgreSQL, S3 (rclone), the MLflow server, the Prefect server and a process worker on
loopback, the docker-compose topology. A deployment run of the pipeline (`prefect deployment run --watch`) ends
COMPLETED with its data version pushed to S3 by DVC, the model's files in the S3 bucket, and a champion in the
MLflow server's registry that loads as a pyfunc."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from deploy.stack import PG_BIN, Stack, free_port

from .conftest import REPO, git_commit, make_project
from .test_data import image_folder, red_blue_pairs

BIN = Path(sys.executable).parent


@pytest.fixture
def project(tmp_path):
    """A checkout of its own (git + DVC), as a worker machine would hold, with a micro-model params.yaml."""
    source = red_blue_pairs(tmp_path / "pairs", 64)
    evalset = image_folder(tmp_path / "evalset", per_class=2)
    root = make_project(tmp_path / "project", [
        "model.name=evaclip-micro", "data.source=pairs", f"data.path={source}", "data.samples_per_shard=16",
        "data.remote=stack", "data.workers=0", "train.steps=4", "train.warmup_steps=1", "train.batch_size=8",
        f"eval.sets=[{evalset}]", "eval.templates=simple",
    ], remote=tmp_path / "local-remote")
    shutil.copytree(REPO / "flows", root / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "prefect.yaml", root / "prefect.yaml")
    git_commit(root, "flows")
    return root


def test_a_deployment_run_on_the_native_stack(project, monkeypatch):
    if not (PG_BIN / "initdb").is_file():
        pytest.skip("PostgreSQL 15 server binaries are not installed")
    state = Path(tempfile.mkdtemp(prefix="evaclip-stack-"))  # pytest's tmp folders are closed to `postgres`
    state.chmod(0o755)
    ports = {name: free_port() for name in ("postgres", "s3", "mlflow", "prefect")}
    try:
        with Stack(state, project, ports) as stack:
            env = dict(os.environ, **stack.env, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}",
                       PREFECT_HOME=str(state / "prefect"))
            result = subprocess.run([str(BIN / "prefect"), "deployment", "run", "evaclip-pipeline/weekly-retraining",
                                     "--watch"], cwd=project, env=env, capture_output=True, text=True, timeout=900)
            logs = "".join(p.read_text(errors="replace")[-3000:] for p in (state / "logs").glob("*worker*"))
            assert result.returncode == 0 and "COMPLETED" in result.stdout.upper(), result.stdout[-3000:] + logs

            uri = stack.env["MLFLOW_TRACKING_URI"]
            client = mlflow.tracking.MlflowClient(uri, registry_uri=uri)
            champion = client.get_model_version_by_alias("evaclip-micro", "champion")
            assert str(champion.version) == "1"
            assert client.get_run(champion.run_id).data.tags["data_version"]  # the DVC version it trained on
            # MLflow's process-wide URIs (set by earlier tests' stores) win over the variable: set both, then
            # give them back, since this server is gone after the test.
            before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
            mlflow.set_tracking_uri(uri)
            mlflow.set_registry_uri(uri)
            try:
                model = mlflow.pyfunc.load_model("models:/evaclip-micro@champion")
            finally:
                mlflow.set_tracking_uri(before[0])
                mlflow.set_registry_uri(before[1])
            output = model.predict(pd.DataFrame({"image": [""], "text": ["a red square"]}))
            assert len(output.embedding[0]) == 32
        assert any(p.name == "MLmodel" for p in (state / "s3" / "mlflow").rglob("*"))  # artifacts went to S3
        assert any(p.is_file() for p in (state / "s3" / "dvc").rglob("*"))  # and the data version too
    finally:
        shutil.rmtree(state, ignore_errors=True)
