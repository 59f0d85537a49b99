"""MLflow while training runs: the launcher owns the run, rank 0 logs into it.

The launcher opens the run before it starts the ranks (or reopens the one a resumed checkpoint belongs
to), hands its id to them, and closes it FINISHED or FAILED after they exit: it outlives a rank killed
with SIGKILL, so a crash still leaves a FAILED run holding every metric logged until then. Rank 0 logs each
`train.log_every` steps asynchronously (the step never waits for the store) plus MLflow's system metrics,
and records every checkpoint as a LoggedModel with its step.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import mlflow
from mlflow.entities import Metric

from ..config import Params
from ..train.callbacks import BaseCallback
from .store import PARENT_RUN_ENV, RUN_FILE, connect, experiment_id, run_id_of, tracking_uri

RUN_ID_ENV = "EVACLIP_MLFLOW_RUN_ID"


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


def close_run(params: Params, run_id: str, succeeded: bool, stopped: bool = False) -> None:
    """FINISHED, FAILED, or KILLED when a signal stopped it (its last checkpoint resumes it, in this run)."""
    connect(params).set_terminated(run_id, "FINISHED" if succeeded else "KILLED" if stopped else "FAILED")


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


logger = logging.getLogger(__name__)
CHECKPOINT_DRAIN_S = 5.0
STOP_DRAIN_S = 5.0


class Outbox:
    """What rank 0 sends to the tracking server, in order, from a thread: kept and retried while it is away.

    `put` never blocks the training step. `close(timeout)` waits until everything was sent (or the timeout passed,
    after which what is left is written to `spill` as JSON lines and named in the log).
    """

    def __init__(self, client, run_id: str, spill: Path, batch: int = 500, retry_s: tuple[float, float] = (1, 30)):
        self.client, self.run_id, self.spill, self.batch = client, run_id, Path(spill), batch
        self.retry_s = retry_s
        self.items: deque = deque()  # Metric, or a callable (a checkpoint's record)
        self.ready = threading.Condition()
        self.closing = False
        self.away_since: Optional[float] = None
        self.thread = threading.Thread(target=self._send_loop, name="mlflow-outbox", daemon=True)
        self.thread.start()

    def put_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        with self.ready:
            self.items.extend(Metric(key, float(value), now, step) for key, value in metrics.items())
            self.ready.notify_all()

    def put_call(self, call: Callable[[], None]) -> None:
        with self.ready:
            self.items.append(call)
            self.ready.notify_all()

    def drain(self, timeout: float) -> bool:
        """Wait (at most `timeout`) until everything put so far was sent; True if it was."""
        with self.ready:
            return self.ready.wait_for(lambda: not self.items, timeout)

    def close(self, timeout: float) -> bool:
        """Send what is left; True if everything reached the server."""
        with self.ready:
            self.closing = True
            self.ready.notify_all()
        self.thread.join(timeout)
        if not self.items:
            return True
        left = list(self.items)
        metrics = [m for m in left if isinstance(m, Metric)]
        self._spill(metrics)
        logger.error("tracking server unreachable for %.0f s at the end of training: %d metrics of run %s kept in %s "
                     "(and %d checkpoint records not sent)", timeout, len(metrics), self.run_id, self.spill,
                     len(left) - len(metrics))
        return False

    def _spill(self, metrics: list[Metric]) -> None:
        with open(self.spill, "a") as handle:
            for m in metrics:
                handle.write(json.dumps({"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step}) + "\n")

    def _send_loop(self) -> None:
        delay = self.retry_s[0]
        while True:
            with self.ready:
                while not self.items and not self.closing:
                    self.ready.wait()
                if not self.items:
                    return
                head = self.items[0]
                chunk = _leading_metrics(self.items, self.batch) if isinstance(head, Metric) else [head]
            try:
                if isinstance(head, Metric):
                    self.client.log_batch(self.run_id, metrics=chunk, synchronous=True)
                else:
                    head()
            except Exception as error:  # noqa: BLE001 - sorted below
                if not _transient(error):  # refused (a permission, a deleted run): retrying cannot help
                    logger.error("tracking server refused %s for run %s: %s", type(head).__name__ if not
                                 isinstance(head, Metric) else f"{len(chunk)} metrics", self.run_id, error)
                    self._spill([m for m in chunk if isinstance(m, Metric)])
                    with self.ready:
                        for _ in range(len(chunk)):
                            self.items.popleft()
                        self.ready.notify_all()
                    continue
                if self.away_since is None:
                    self.away_since = time.monotonic()
                    logger.warning("tracking server not answering (%s); metrics are kept and sent once it is back",
                                   type(error).__name__)
                time.sleep(delay)
                delay = min(delay * 2, self.retry_s[1])
                continue
            if self.away_since is not None:
                logger.warning("tracking server back after %.0f s; sending what was kept",
                               time.monotonic() - self.away_since)
                self.away_since = None
            delay = self.retry_s[0]
            with self.ready:
                for _ in range(len(chunk)):
                    self.items.popleft()
                self.ready.notify_all()


def _transient(error: Exception) -> bool:
    """A server away or overloaded (connection errors, 5xx, 429), not a refusal (4xx)."""
    if isinstance(error, mlflow.exceptions.MlflowException):
        status = error.get_http_status_code()
        return status >= 500 or status == 429
    return True  # connection errors and timeouts from requests/urllib3


def _leading_metrics(items: deque, limit: int) -> list[Metric]:
    """The metrics at the front of `items`, up to `limit`, stopping at the first record (order is kept)."""
    chunk = []
    for item in items:
        if not isinstance(item, Metric) or len(chunk) == limit:
            break
        chunk.append(item)
    return chunk


class MlflowLogger(BaseCallback):
    """Rank 0's metrics and checkpoints into the launcher's run (see `open_run`), through an `Outbox`.

    The run id comes from the environment, read at the start of training: on several nodes it reaches rank 0
    from node 0's launcher once the ranks have joined (`train/distributed.py`). Without one it logs nothing.
    """

    def __init__(self, stage: str = "train", run_id: Optional[str] = None, out: Optional[Path] = None,
                 flush_timeout_s: float = 600):
        self.stage, self.run_id, self.out, self.flush_timeout_s = stage, run_id, out, flush_timeout_s
        self.outbox: Optional[Outbox] = None

    def on_train_start(self, info):
        self.run_id = self.run_id or os.environ.get(RUN_ID_ENV)
        if self.run_id is None:
            return
        mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
        client = mlflow.MlflowClient()
        mlflow.set_experiment(experiment_id=client.get_run(self.run_id).info.experiment_id)
        self.run = mlflow.start_run(run_id=self.run_id, log_system_metrics=True)
        if info.get("precision"):  # what `train.precision: auto` became on this hardware
            mlflow.set_tag("evaclip.precision", info["precision"])
        self.outbox = Outbox(client, self.run_id, Path(self.out or ".") / "unsent_metrics.jsonl")

    def on_step(self, step, metrics):
        if self.outbox is not None:
            self.outbox.put_metrics({k.replace("/", "_"): v for k, v in metrics.items()}, step)

    def on_checkpoint(self, step, path):
        if self.outbox is None:
            return
        stage, run_id = self.stage, self.run_id

        def record() -> None:
            client = mlflow.MlflowClient()
            model = client.create_logged_model(self.run.info.experiment_id, name=f"{stage}-checkpoint",
                                               source_run_id=run_id, params={"step": str(step), "path": str(path)},
                                               tags={"evaclip.stage": stage})
            client.log_batch(run_id, metrics=[Metric("checkpoint_step", step, int(time.time() * 1000), step,
                                                     model_id=model.model_id)])
            client.finalize_logged_model(model.model_id, "READY")

        self.outbox.put_call(record)
        # A run killed later still holds every step up to its last checkpoint; a server that is away costs
        # the step this wait, not the training.
        self.outbox.drain(CHECKPOINT_DRAIN_S)

    def on_train_end(self, info):
        if self.outbox is None:
            return
        if info.get("data_quality"):
            quality = info["data_quality"]
            self.outbox.put_call(lambda: mlflow.MlflowClient().log_dict(self.run_id, quality, "data_quality.json"))
        if info.get("stopped"):  # a signal: torchrun kills the ranks 25 s after it; what is left is spilled
            self.outbox.close(STOP_DRAIN_S)
            return
        self.outbox.close(self.flush_timeout_s)
        try:
            mlflow.end_run()  # stops the system metrics; the launcher sets the final status once every rank exited
        except Exception as error:  # noqa: BLE001 - the server is away: the launcher closes the run
            logger.warning("could not end run %s from rank 0 (%s)", self.run_id, type(error).__name__)
