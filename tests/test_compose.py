"""docker-compose.yml: valid against the compose specification, and wired to what the code reads."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

from .conftest import REPO

BIN = Path(sys.executable).parent


def _compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_compose_file_is_valid_against_the_compose_specification():
    result = subprocess.run([str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
                             str(REPO / "docker-compose.yml")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_services_ports_and_healthchecks():
    services = _compose()["services"]
    assert {"postgres", "minio", "minio-buckets", "mlflow", "prefect-server", "prefect-worker"} <= set(services)
    assert "5000:5000" in services["mlflow"]["ports"] and "4200:4200" in services["prefect-server"]["ports"]
    assert "9000:9000" in services["minio"]["ports"]
    for name in ("postgres", "minio", "mlflow", "prefect-server"):
        assert "healthcheck" in services[name], name
    gpu = services["prefect-worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert services["prefect-worker"]["build"]["dockerfile"] == "docker/Dockerfile"


def test_the_worker_gets_the_variables_the_code_reads():
    worker = _compose()["services"]["prefect-worker"]["environment"]
    assert worker["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"  # evaclip.tracking.store reads it
    assert worker["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert {"MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(worker)
    mlflow_command = _compose()["services"]["mlflow"]["command"]
    assert "postgresql+psycopg2://" in mlflow_command and "--artifacts-destination s3://" in mlflow_command


def test_every_variable_has_an_example_and_no_secret_is_committed():
    used = set(re.findall(r"\$\{(\w+)\}", (REPO / "docker-compose.yml").read_text()))
    example = dict(line.split("=", 1) for line in (REPO / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    assert used <= set(example), used - set(example)
    assert not (REPO / ".env").exists() or ".env" in (REPO / ".gitignore").read_text()
