"""MLflow while training runs: the launcher owns the run, rank 0 logs into it.

The launcher opens the run before it starts the ranks (or reopens the one a resumed checkpoint belongs
to), hands its id to them, and closes it FINISHED or FAILED after they exit: it outlives a rank killed
with SIGKILL, so a crash still leaves a FAILED run holding every metric logged until then. Rank 0 logs each
`train.log_every` steps asynchronously (the step never waits for the store) plus MLflow's system metrics,
and records every checkpoint as a LoggedModel with its step.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import mlflow

from ..config import Params
from ..train.callbacks import BaseCallback
from .store import connect, experiment_id, tracking_uri

RUN_ID_ENV = "EVACLIP_MLFLOW_RUN_ID"
PARENT_RUN_ENV = "EVACLIP_PARENT_RUN_ID"  # the pipeline's parent run, set by the flow
RUN_FILE = "mlflow_run.json"  # beside the stage's outputs: which run they belong to


def open_run(params: Params, stage: str, out: Path, resume_run_id: Optional[str] = None) -> dict[str, str]:
    """Create the stage's run (or reopen `resume_run_id`); returns the environment the ranks need."""
    from .runs import flatten, run_tags

    client = connect(params)
    _fail_orphan(client, out / RUN_FILE, keep=resume_run_id)
    if resume_run_id:
        client.update_run(resume_run_id, status="RUNNING")
        run_id = resume_run_id
    else:
        tags = {**run_tags(params), "evaclip.stage": stage, "mlflow.runName": stage}
        if stage == "pretrain":
            tags["evaclip.teacher"] = str(params.pretrain.teacher)
        if os.environ.get(PARENT_RUN_ENV):
            tags["mlflow.parentRunId"] = os.environ[PARENT_RUN_ENV]
        run_id = client.create_run(experiment_id(client, params), tags=tags).info.run_id
        flat = flatten(params)
        keys = [k for k in flat if k.split(".")[0] in ("model", "train", "data", "init", "pretrain")]
        for start in range(0, len(keys), 90):
            client.log_batch(run_id, params=[mlflow.entities.Param(k, flat[k][:6000]) for k in keys[start:start + 90]])
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_FILE).write_text(json.dumps({"run_id": run_id, "tracking_uri": tracking_uri(params)}) + "\n")
    return {RUN_ID_ENV: run_id, "MLFLOW_TRACKING_URI": tracking_uri(params)}


def close_run(params: Params, run_id: str, succeeded: bool) -> None:
    connect(params).set_terminated(run_id, "FINISHED" if succeeded else "FAILED")


def run_id_of(out: Path) -> Optional[str]:
    """The MLflow run that the outputs in `out` belong to, if any."""
    try:
        return json.loads((Path(out) / RUN_FILE).read_text())["run_id"]
    except (OSError, ValueError, KeyError):
        return None


def _fail_orphan(client, run_file: Path, keep: Optional[str]) -> None:
    """A run left RUNNING by a launcher that died with its ranks is marked FAILED."""
    previous = run_id_of(run_file.parent)
    if not previous or previous == keep:
        return
    try:
        if client.get_run(previous).info.status == "RUNNING":
            client.set_terminated(previous, "FAILED")
    except mlflow.exceptions.MlflowException:
        pass  # another store, or deleted: not ours to fix


class MlflowLogger(BaseCallback):
    """Rank 0's metrics and checkpoints into the launcher's run (see `open_run`).

    The run id comes from the environment, read at the start of training: on several nodes it reaches rank 0
    from node 0's launcher once the ranks have joined (`train/distributed.py`). Without one it logs nothing.
    """

    def __init__(self, stage: str = "train", run_id: Optional[str] = None):
        self.stage, self.run_id = stage, run_id

    def on_train_start(self, info):
        self.run_id = self.run_id or os.environ.get(RUN_ID_ENV)
        if self.run_id is None:
            return
        mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
        mlflow.set_experiment(experiment_id=mlflow.MlflowClient().get_run(self.run_id).info.experiment_id)
        self.run = mlflow.start_run(run_id=self.run_id, log_system_metrics=True)

    def on_step(self, step, metrics):
        if self.run_id is None:
            return
        mlflow.log_metrics({k.replace("/", "_"): float(v) for k, v in metrics.items()}, step=step, synchronous=False)

    def on_checkpoint(self, step, path):
        if self.run_id is None:
            return
        mlflow.flush_async_logging()
        model = mlflow.initialize_logged_model(name=f"{self.stage}-checkpoint", source_run_id=self.run_id,
                                               params={"step": str(step), "path": str(path)},
                                               tags={"evaclip.stage": self.stage})
        mlflow.log_metric("checkpoint_step", step, step=step, model_id=model.model_id)
        mlflow.MlflowClient().finalize_logged_model(model.model_id, "READY")

    def on_train_end(self, info):
        if self.run_id is None:
            return
        if info.get("data_quality"):
            mlflow.log_dict(info["data_quality"], "data_quality.json")
        mlflow.flush_async_logging()
        mlflow.end_run()  # the launcher sets the final status once every rank has exited
