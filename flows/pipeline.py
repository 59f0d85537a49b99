"""Prefect 3 flows: thin compositions of evaclip library calls (the same ones the CLI and dvc.yaml make).

    python -m flows.pipeline                      # the whole pipeline on params.yaml, ephemeral Prefect
    evaclip pipeline                              # the same flow from the CLI

Each task wraps one library function; retries are declared where failures are transient (the DVC remote,
the MLflow server; never on configuration or data errors). DVC commands are serialized by a lock in
`evaclip.data.versioning`.
"""

from __future__ import annotations

import json
from typing import Optional

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel, Field

from evaclip.config import Params, load_params, profile_path
from evaclip.data import prepare
from evaclip.eval import EvalResult, evaluate
from evaclip.init import initialize
from evaclip.tracking import Decision, TrackingRecord, log_run, register_and_promote
from evaclip.train import launch


class PipelineParameters(BaseModel):
    """What the Prefect UI shows as the run form."""

    params_file: str = Field("params.yaml", description="the params file (DVC tracks params.yaml)")
    profile: Optional[str] = Field(None, description="a profile from configs/ instead of params_file")
    overrides: list[str] = Field(default_factory=list, description="KEY.PATH=VALUE overrides, e.g. train.lr=1e-3")
    devices: Optional[int] = Field(None, gt=0, description="training processes (GPUs, or CPU processes)")
    data_source: Optional[str] = Field(None, description="fashion_mnist | image_folder | pairs | wds")


def resolve(parameters: PipelineParameters) -> Params:
    overrides = list(parameters.overrides)
    if parameters.devices:
        overrides.append(f"train.devices={parameters.devices}")
    if parameters.data_source:
        overrides.append(f"data.source={parameters.data_source}")
    path = profile_path(parameters.profile) if parameters.profile else parameters.params_file
    return load_params(path, overrides)


def transient(task, task_run, state) -> bool:
    """Retry only failures that a later attempt can fix: an unreachable server or a network error."""
    import requests

    from evaclip.tracking import TrackingUnavailableError

    try:
        state.result()
    except (TrackingUnavailableError, ConnectionError, TimeoutError, requests.RequestException):
        return True
    except Exception:  # noqa: BLE001 - a configuration or data error: retrying cannot help
        return False
    return False


@task  # DVC retries its own network calls; rebuilding shards on a retry would repeat minutes of work
def prepare_data(params: Params) -> dict:
    result = prepare(params)
    return {"samples": result.manifest["total"], "shards": len(result.manifest["shards"]),
            "data_version": result.data_version}


@task
def initialize_weights(params: Params) -> dict:
    result = initialize(params)
    return {"checkpoint": str(result.checkpoint), **result.report.counts()}


@task
def train_model(params: Params) -> str:
    logger = get_run_logger()
    return str(launch(params, on_output=logger.info))


@task
def evaluate_model(params: Params) -> EvalResult:
    return evaluate(params, progress=False)


@task(retries=3, retry_delay_seconds=[5, 30, 120], retry_condition_fn=transient)
def log_to_mlflow(params: Params, result: EvalResult) -> TrackingRecord:
    return log_run(params, result)


def evaluate_and_log(params: Params) -> TrackingRecord:
    return log_to_mlflow(params, evaluate_model(params))


@task(retries=3, retry_delay_seconds=[5, 30, 120], retry_condition_fn=transient)
def promote_model(params: Params, record: TrackingRecord) -> Decision:
    return register_and_promote(params, record)


@flow(name="evaclip-pipeline", log_prints=True)
def pipeline(parameters: PipelineParameters = PipelineParameters()) -> dict:
    """Data (prepare + DVC push) -> EVA init -> DeepSpeed training -> zero-shot evaluation -> promotion."""
    params = resolve(parameters)
    data = prepare_data(params)
    init = initialize_weights(params)
    train_model(params)
    record = evaluate_and_log(params)
    decision = promote_model(params, record)
    summary = {"data": data, "init": init, "metrics": record.metrics, "model_uri": record.model_uri,
               "eval_run_id": record.eval_run_id, "decision": decision.__dict__}
    create_markdown_artifact(markdown=summary_markdown(params, record, decision, data), key="evaclip-pipeline",
                             description="EVA-CLIP pipeline run")
    return summary


@flow(name="evaclip-train")
def train_flow(parameters: PipelineParameters = PipelineParameters()) -> str:
    return train_model(resolve(parameters))


@flow(name="evaclip-evaluate")
def evaluate_flow(parameters: PipelineParameters = PipelineParameters()) -> dict:
    return evaluate_and_log(resolve(parameters)).metrics


@flow(name="evaclip-promote")
def promote_flow(parameters: PipelineParameters = PipelineParameters()) -> dict:
    from pathlib import Path

    from evaclip.tracking import RECORD

    params = resolve(parameters)
    record = TrackingRecord(**json.loads((Path(params.eval.output_dir) / RECORD).read_text()))
    return promote_model(params, record).__dict__


def summary_markdown(params: Params, record: TrackingRecord, decision: Decision, data: dict) -> str:
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in record.metrics.items() if "/" not in k and k != "samples")
    verdict = "**promoted to champion**" if decision.promoted else "not promoted"
    return (
        f"# EVA-CLIP pipeline: {params.model.name} ({params.profile})\n\n"
        f"| metric | value |\n|---|---|\n{rows}\n\n"
        f"Model `{decision.name}` version {decision.version}: {verdict}. Reason: {decision.reason}. "
        f"Champion: version {decision.champion}.\n\n"
        f"MLflow run `{record.eval_run_id}` ({record.tracking_uri}); model `{record.model_uri}`.\n\n"
        f"Data version (data.dvc): `{data.get('data_version')}`; {data['samples']} training samples.\n"
    )


if __name__ == "__main__":
    print(json.dumps(pipeline(), indent=2, default=str))
