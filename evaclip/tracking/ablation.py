"""The ablation study in MLflow: one run per cell (tagged with the cell's key, so that a later invocation finds
what is finished and runs only the rest), the cell's training run nested under it, and the report."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import mlflow
from mlflow.entities import Metric, RunTag

from ..ablation import Cell
from ..config import Params
from .runs import adopt_stage_run, flatten
from .store import PARENT_RUN_ENV, connect, experiment_id

KEY_TAG = "evaclip.ablation.key"
_METRICS = ("top1", "top5", "samples_seen", "train_seconds", "samples_per_s")
_METRIC_NAMES = {"top1": "zeroshot_top1", "top5": "zeroshot_top5"}
CURVE_METRIC = "curve_zeroshot_top1"  # step = samples seen


def finished_cells(params: Params) -> dict[str, Cell]:
    """The study's finished cells in the experiment `params.tracking.experiment`, by key (the latest if twice)."""
    client = connect(params)
    runs = client.search_runs([experiment_id(client, params)], filter_string="attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time ASC"], max_results=5000)
    cells = {}
    for run in runs:
        tags = run.data.tags
        if KEY_TAG not in tags or not {"evaclip.ablation.kind", "evaclip.ablation.arm", "evaclip.ablation.seed",
                                       "evaclip.ablation.lr"} <= set(tags):
            continue  # not a cell, or one logged by hand without its description
        metrics = run.data.metrics
        cell = Cell(tags["evaclip.ablation.kind"], tags["evaclip.ablation.arm"], int(tags["evaclip.ablation.seed"]),
                    float(tags["evaclip.ablation.lr"]), tags[KEY_TAG], run_id=run.info.run_id,
                    weights=tags.get("evaclip.ablation.weights"),
                    pretrain_steps=int(tags["evaclip.ablation.pretrain_steps"])
                    if "evaclip.ablation.pretrain_steps" in tags else None)
        for name in _METRICS:
            if _METRIC_NAMES.get(name, name) in metrics:
                setattr(cell, name, metrics[_METRIC_NAMES.get(name, name)])
        cell.samples_seen = int(cell.samples_seen)
        if CURVE_METRIC in metrics:
            history = client.get_metric_history(run.info.run_id, CURVE_METRIC)
            cell.curve = sorted((m.step, m.value) for m in history)
        cells[cell.key] = cell
    return cells


@contextmanager
def cell_run(params: Params, cell: Cell) -> Iterator[str]:
    """A run for the cell, FINISHED with its results (`record`) or FAILED if the body raises; the training run that
    the launcher opens inside nests under it."""
    client = connect(params)
    tags = {KEY_TAG: cell.key, "evaclip.ablation.kind": cell.kind, "evaclip.ablation.arm": cell.arm,
            "evaclip.ablation.seed": str(cell.seed), "evaclip.ablation.lr": repr(cell.lr),
            "evaclip.stage": "ablation", "mlflow.runName": f"{cell.kind}-{cell.arm}-seed{cell.seed}"}
    run_id = client.create_run(experiment_id(client, params), tags=tags).info.run_id
    flat = list(flatten(params).items())
    for start in range(0, len(flat), 90):
        client.log_batch(run_id, params=[mlflow.entities.Param(k, v[:6000]) for k, v in flat[start:start + 90]])
    previous = os.environ.get(PARENT_RUN_ENV)
    os.environ[PARENT_RUN_ENV] = run_id
    try:
        yield run_id
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    finally:
        if previous is None:
            os.environ.pop(PARENT_RUN_ENV, None)
        else:
            os.environ[PARENT_RUN_ENV] = previous


def record_cell(params: Params, cell: Cell, output_dir: Path) -> None:
    """The cell's results on its run (metrics, the curve as a history over samples seen), then FINISHED."""
    client = connect(params)
    metrics = [Metric(_METRIC_NAMES.get(name, name), float(getattr(cell, name)), 0, 0)
               for name in _METRICS if getattr(cell, name) is not None]
    metrics += [Metric(CURVE_METRIC, top1, 0, samples) for samples, top1 in cell.curve]
    tags = [RunTag("evaclip.ablation.weights", cell.weights or "")]
    if cell.pretrain_steps is not None:
        tags.append(RunTag("evaclip.ablation.pretrain_steps", str(cell.pretrain_steps)))
    client.log_batch(cell.run_id, metrics=metrics, tags=tags)
    adopt_stage_run(output_dir, cell.run_id)
    client.set_terminated(cell.run_id, "FINISHED")


def log_report(params: Params, markdown: str, summary: dict, plot: Optional[Path]) -> str:
    """The report as a run of its own in the study's experiment: table, summary JSON and the curve plot."""
    client = connect(params)
    run_id = client.create_run(experiment_id(client, params), tags={"evaclip.stage": "ablation-report",
                                                                     "mlflow.runName": "ablation-report"}).info.run_id
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "ablation.md").write_text(markdown)
        (Path(tmp) / "ablation.json").write_text(json.dumps(summary, indent=2) + "\n")
        client.log_artifact(run_id, str(Path(tmp) / "ablation.md"))
        client.log_artifact(run_id, str(Path(tmp) / "ablation.json"))
    if plot:
        client.log_artifact(run_id, str(plot))
    client.set_terminated(run_id, "FINISHED")
    return run_id
