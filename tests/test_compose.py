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
    assert "${BIND_ADDRESS:-127.0.0.1}:5000:5000" in services["mlflow"]["ports"]
    assert "${BIND_ADDRESS:-127.0.0.1}:4200:4200" in services["prefect-server"]["ports"]
    assert "${BIND_ADDRESS:-127.0.0.1}:9000:9000" in services["minio"]["ports"]
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
    mlflow = _compose()["services"]["mlflow"]
    assert mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://")
    assert "--artifacts-destination s3://" in mlflow["command"][0]


def test_doors_are_locked():
    """Published only on BIND_ADDRESS (the TLS proxy apart), MLflow behind basic-auth, Prefect behind its auth string,
    the worker as the pipeline's identity; every credential comes from .env."""
    services = _compose()["services"]
    for name, service in services.items():
        for port in service.get("ports", []):
            assert port.startswith("${BIND_ADDRESS:-127.0.0.1}:") or "tls" in service.get("profiles", []), (name, port)
    assert "--app-name basic-auth" in services["mlflow"]["command"][0]
    assert services["mlflow"]["environment"]["MLFLOW_AUTH_ADMIN_PASSWORD"] == "${MLFLOW_ADMIN_PASSWORD}"
    assert services["prefect-server"]["environment"]["PREFECT_SERVER_API_AUTH_STRING"] == "${PREFECT_AUTH_STRING}"
    worker = services["prefect-worker"]["environment"]
    assert worker["PREFECT_API_AUTH_STRING"] == "${PREFECT_AUTH_STRING}"
    assert worker["MLFLOW_TRACKING_USERNAME"] == "${MLFLOW_PIPELINE_USERNAME}"
    assert "deploy/stack.py --mlflow-users" in services["mlflow-users"]["command"]
    text = (REPO / "docker-compose.yml").read_text()
    assert not re.search(r"(PASSWORD|SECRET|AUTH_STRING)\w*: (?!\$\{)", text)  # no literal credential


def test_every_variable_has_an_example_and_no_secret_is_committed():
    used = set(re.findall(r"\$\{(\w+)\}", (REPO / "docker-compose.yml").read_text()))
    example = dict(line.split("=", 1) for line in (REPO / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    assert used <= set(example), used - set(example)
    assert not (REPO / ".env").exists() or ".env" in (REPO / ".gitignore").read_text()
