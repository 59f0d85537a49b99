"""Prefect 3 flows: thin compositions of evaclip library calls (the same ones the CLI and dvc.yaml make).

    python -m flows.pipeline                      # the whole pipeline on params.yaml, ephemeral Prefect
    evaclip pipeline                              # the same flow from the CLI

Each task wraps one library function; retries are declared where failures are transient (the DVC remote,
the MLflow server; never on configuration or data errors). DVC commands are serialized by a lock in
`evaclip.data.versioning`. A stage whose parameters and inputs did not change since its last run is
skipped (`evaclip.stages`); `force=True` runs everything.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel, Field

from evaclip import stages
from evaclip.config import Params, load_params, profile_path
from evaclip.data import prepare
from evaclip.eval import EvalResult, evaluate
from evaclip.init import initialize
from evaclip.tracking import Decision, TrackingRecord, champion_uri, log_pretrain_run, log_run, register_and_promote
from evaclip.train import launch


class PipelineParameters(BaseModel):
    """What the Prefect UI shows as the run form."""

    params_file: str = Field("params.yaml", description="the params file (DVC tracks params.yaml)")
    profile: Optional[str] = Field(None, description="a profile from configs/ instead of params_file")
    overrides: list[str] = Field(default_factory=list, description="KEY.PATH=VALUE overrides, e.g. train.lr=1e-3")
    devices: Optional[int] = Field(None, gt=0, description="training processes (GPUs, or CPU processes)")
    data_source: Optional[str] = Field(None, description="fashion_mnist | image_folder | pairs | wds")
    force: bool = Field(False, description="run every stage, even those whose inputs did not change")
    bootstrap: bool = Field(False, description="EVA-02's loop: pre-train a fresh EVA from the registry's champion "
                                               "(masked image modelling) and start the new EVA-CLIP from it")


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


@task(retries=3, retry_delay_seconds=[5, 30, 120], retry_condition_fn=transient)
def find_teacher(params: Params) -> Optional[str]:
    return champion_uri(params)


@task
def pretrain_weights(params: Params) -> dict:
    logger = get_run_logger()
    checkpoint = launch(params, on_output=logger.info, stage="pretrain")
    return {"checkpoint": str(checkpoint), "teacher": params.pretrain.teacher,
            "mlflow_run_id": log_pretrain_run(params, checkpoint)}


def bootstrap(params: Params, force: bool) -> tuple[Params, dict]:
    """EVA-02's recipe: the champion teaches a fresh EVA by masked image modelling; init starts from it."""
    logger = get_run_logger()
    teacher = find_teacher(params)
    if teacher is None:
        logger.info("bootstrap: the registry has no champion yet, so this run starts from random initialization")
        return params, {"skipped": True, "seconds": 0.0, "teacher": None}
    eva = Path(params.pretrain.output_dir) / "eva.safetensors"
    params = params.model_copy(update={
        "pretrain": params.pretrain.model_copy(update={"teacher": teacher}),
        "init": params.init.model_copy(update={"vision": eva, "vision_format": "eva"}),
    })
    logger.info(f"bootstrap: pre-training a fresh EVA from {teacher}'s features, then initializing from {eva}")
    return params, run_stage("pretrain", params, pretrain_weights, force)


@task
def initialize_weights(params: Params) -> dict:
    result = initialize(params)
    return {"checkpoint": str(result.checkpoint), **result.report.counts()}


@task
def train_model(params: Params) -> dict:
    logger = get_run_logger()
    return {"model": str(launch(params, on_output=logger.info))}


@task
def evaluate_model(params: Params) -> EvalResult:
    return evaluate(params, progress=False)


@task(retries=3, retry_delay_seconds=[5, 30, 120], retry_condition_fn=transient)
def log_to_mlflow(params: Params, result: EvalResult) -> TrackingRecord:
    return log_run(params, result)


def evaluate_and_log(params: Params) -> dict:
    return asdict(log_to_mlflow(params, evaluate_model(params)))


@task(retries=3, retry_delay_seconds=[5, 30, 120], retry_condition_fn=transient)
def promote_model(params: Params, record: TrackingRecord) -> Decision:
    return register_and_promote(params, record)


def run_stage(stage: str, params: Params, run: Callable[[Params], dict], force: bool = False) -> dict:
    """Run `stage` unless its parameters, inputs and outputs are as its last run left them."""
    logger = get_run_logger()
    started = time.perf_counter()
    key = stages.stage_key(params, stage)  # a stage never changes its own inputs: this key holds after it runs
    summary = None if force else stages.current(params, stage, key)
    skipped = summary is not None
    if skipped:
        logger.info(f"{stage}: unchanged since its last run (key {key[:12]}), skipped")
    else:
        if stage == "train" and stages.stamp_path(params, stage).is_file():
            # The finished run in train.output_dir had another recipe (new data, new parameters):
            # start a new one instead of refusing to resume it. Its model is in the MLflow registry.
            params = params.model_copy(update={"train": params.train.model_copy(update={"resume": False})})
        stages.forget(params, stage)  # a stage that fails half-way leaves no stamp behind
        summary = run(params)
        stages.record(params, stage, summary, key)
    return {**summary, "skipped": skipped, "seconds": time.perf_counter() - started}


@flow(name="evaclip-pipeline", log_prints=True)
def pipeline(parameters: PipelineParameters = PipelineParameters()) -> dict:
    """Data (prepare + DVC push) -> EVA init -> DeepSpeed training -> zero-shot evaluation -> promotion."""
    params = resolve(parameters)
    force = parameters.force
    data = run_stage("prepare", params, prepare_data, force)
    pretrained = None
    if parameters.bootstrap:
        params, pretrained = bootstrap(params, force)
    init = run_stage("init", params, initialize_weights, force)
    train = run_stage("train", params, train_model, force)
    evaluation = run_stage("evaluate", params, evaluate_and_log, force)
    record = TrackingRecord(**{k: evaluation[k] for k in TrackingRecord.__dataclass_fields__})
    started = time.perf_counter()
    decision = promote_model(params, record)
    stage_report = {"prepare": data, **({"pretrain": pretrained} if pretrained else {}), "init": init, "train": train,
                    "evaluate": evaluation, "promote": {"skipped": False, "seconds": time.perf_counter() - started}}
    summary = {"data": data, "pretrain": pretrained, "init": init, "train": train, "metrics": record.metrics, "model_uri": record.model_uri,
               "eval_run_id": record.eval_run_id, "decision": decision.__dict__,
               "stages": {name: {"skipped": s["skipped"], "seconds": round(s["seconds"], 1)}
                          for name, s in stage_report.items()}}
    create_markdown_artifact(markdown=summary_markdown(params, record, decision, data, summary["stages"]),
                             key="evaclip-pipeline", description="EVA-CLIP pipeline run")
    return summary


@flow(name="evaclip-data")
def data_flow(parameters: PipelineParameters = PipelineParameters()) -> dict:
    return run_stage("prepare", resolve(parameters), prepare_data, parameters.force)


@flow(name="evaclip-train")
def train_flow(parameters: PipelineParameters = PipelineParameters()) -> dict:
    return train_model(resolve(parameters))


@flow(name="evaclip-evaluate")
def evaluate_flow(parameters: PipelineParameters = PipelineParameters()) -> dict:
    return evaluate_and_log(resolve(parameters))["metrics"]


@flow(name="evaclip-promote")
def promote_flow(parameters: PipelineParameters = PipelineParameters()) -> dict:
    from evaclip.tracking import RECORD

    params = resolve(parameters)
    record = TrackingRecord(**json.loads((Path(params.eval.output_dir) / RECORD).read_text()))
    return promote_model(params, record).__dict__


def summary_markdown(params: Params, record: TrackingRecord, decision: Decision, data: dict,
                     stage_report: dict) -> str:
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in record.metrics.items() if "/" not in k and k != "samples")
    timings = "\n".join(f"| {name} | {'skipped (unchanged)' if s['skipped'] else 'ran'} | {s['seconds']:.1f} |"
                        for name, s in stage_report.items())
    verdict = "**promoted to champion**" if decision.promoted else "not promoted"
    return (
        f"# EVA-CLIP pipeline: {params.model.name} ({params.profile})\n\n"
        f"| metric | value |\n|---|---|\n{rows}\n\n"
        f"| stage | status | seconds |\n|---|---|---|\n{timings}\n\n"
        f"Model `{decision.name}` version {decision.version}: {verdict}. Reason: {decision.reason}. "
        f"Champion: version {decision.champion}.\n\n"
        f"MLflow run `{record.eval_run_id}` ({record.tracking_uri}); model `{record.model_uri}`.\n\n"
        f"Data version (data.dvc): `{data.get('data_version')}`; {data['samples']} training samples.\n"
    )


if __name__ == "__main__":
    print(json.dumps(pipeline(), indent=2, default=str))
