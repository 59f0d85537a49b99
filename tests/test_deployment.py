"""prefect.yaml for real: a `prefect server`, a process work pool and worker, `prefect deploy`, and a run
triggered with `prefect deployment run --watch` that ends COMPLETED with a new model version in MLflow."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import yaml

from evaclip.config import load_params

from .conftest import REPO
from .test_data import image_folder, red_blue_pairs
from .test_tracking import free_port, wait_http

BIN = Path(sys.executable).parent


def test_prefect_yaml_declares_a_weekly_schedule_on_a_process_pool():
    config = yaml.safe_load((REPO / "prefect.yaml").read_text())
    (deployment,) = config["deployments"]
    assert deployment["entrypoint"] == "flows/pipeline.py:pipeline"
    assert deployment["schedules"][0]["cron"] == "0 3 * * 1"
    assert deployment["work_pool"]["name"] == "evaclip"


def test_deploy_and_run_the_pipeline_on_a_real_prefect_server(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    shutil.copytree(REPO / "flows", project / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "prefect.yaml", project / "prefect.yaml")
    source = red_blue_pairs(tmp_path / "pairs", 64)
    evalset = image_folder(tmp_path / "evalset", per_class=2)
    params = load_params(REPO / "params.yaml", [
        "model.name=evaclip-micro", "data.source=pairs", f"data.path={source}", "data.samples_per_shard=16",
        "data.version=false", "data.workers=0", "train.steps=4", "train.warmup_steps=1", "train.batch_size=8",
        f"eval.sets=[{evalset}]", "eval.templates=simple",
    ])
    (project / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))

    port = free_port()
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", PREFECT_HOME=str(tmp_path / "prefect"),
               PREFECT_API_URL=f"http://127.0.0.1:{port}/api", EVACLIP_HOME=str(project),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1", OMP_NUM_THREADS="1",
               PREFECT_SERVER_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{tmp_path / 'prefect.db'}")
    env.pop("MLFLOW_TRACKING_URI", None)
    processes = []

    def run(*args, timeout=600):
        result = subprocess.run([str(BIN / "prefect"), *args], cwd=project, env=env, capture_output=True, text=True,
                                timeout=timeout)
        assert result.returncode == 0, f"prefect {args}: {result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        return result.stdout

    try:
        processes.append(subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                                           "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL, start_new_session=True))
        wait_http(f"http://127.0.0.1:{port}/api/health", 180)
        run("work-pool", "create", "evaclip", "--type", "process")
        run("--no-prompt", "deploy", "--all")
        processes.append(subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "evaclip"], cwd=project,
                                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                          start_new_session=True))
        output = run("deployment", "run", "evaclip-pipeline/weekly-retraining", "--watch", timeout=900)
        assert "COMPLETED" in output.upper()
    finally:
        for process in reversed(processes):
            for _ in range(2):  # a worker ignores the first SIGTERM
                try:
                    os.killpg(process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    break
                try:
                    process.wait(timeout=20)
                    break
                except subprocess.TimeoutExpired:
                    continue
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)

    uri = f"sqlite:///{project / 'outputs' / 'mlflow' / 'mlflow.db'}"
    client = mlflow.tracking.MlflowClient(uri, registry_uri=uri)
    versions = client.search_model_versions("name='evaclip-micro'")
    assert len(versions) == 1 and str(client.get_model_version_by_alias("evaclip-micro", "champion").version) == "1"
