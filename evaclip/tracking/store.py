"""Where runs go: `tracking.uri`, else $MLFLOW_TRACKING_URI, else SQLite plus a local artifact folder.

A tracking server that does not answer gets `tracking.retries` attempts with backoff, then a clear error.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional

import mlflow
from mlflow.tracking import MlflowClient

from ..config import Params
from ..errors import EvaclipError

# As the user set it: `mlflow.set_tracking_uri` writes this variable too, so read it before MLflow does.
_USER_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI")


PARENT_RUN_ENV = "EVACLIP_PARENT_RUN_ID"  # the pipeline's parent run, set by the flow
RUN_FILE = "mlflow_run.json"  # beside a stage's outputs: which run they belong to


def run_id_of(out: Path) -> Optional[str]:
    """The MLflow run that the outputs in `out` belong to, if any."""
    try:
        return json.loads((Path(out) / RUN_FILE).read_text())["run_id"]
    except (OSError, ValueError, KeyError):
        return None


class TrackingUnavailableError(EvaclipError):
    exit_code = 6


def tracking_uri(params: Params) -> str:
    if params.tracking.uri:
        return params.tracking.uri
    if _USER_TRACKING_URI:
        return _USER_TRACKING_URI
    store = Path(params.tracking.default_store).resolve()
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


def connect(params: Params) -> MlflowClient:
    """Point MLflow at the store, check that it answers, and return a client."""
    uri = tracking_uri(params)
    # MLflow's own HTTP retries, for the calls made after the check below.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(params.tracking.retries))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if uri.startswith(("http://", "https://")):
        _wait_for_server(uri, params.tracking.retries)
    return MlflowClient(uri, registry_uri=uri)


def _wait_for_server(uri: str, retries: int) -> None:
    import requests

    last = None
    for attempt in range(retries + 1):
        try:
            if requests.get(f"{uri.rstrip('/')}/health", timeout=5).status_code == 200:
                return
            last = "unhealthy answer"
        except requests.RequestException as err:
            last = f"{type(err).__name__}"
        if attempt < retries:
            time.sleep(min(2**attempt, 8))
    raise TrackingUnavailableError(
        f"MLflow tracking server {uri} unreachable after {retries + 1} attempts ({last}); nothing was logged "
        "or promoted. Start the server, or unset MLFLOW_TRACKING_URI and tracking.uri for the local SQLite store."
    )


def experiment_id(client: MlflowClient, params: Params) -> str:
    name = params.tracking.experiment
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if tracking_uri(params).startswith("sqlite:"):
        location = (Path(params.tracking.default_store).resolve() / "artifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except mlflow.exceptions.MlflowException:  # created meanwhile by a concurrent run
        return client.get_experiment_by_name(name).experiment_id
