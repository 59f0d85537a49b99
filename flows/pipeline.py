"""Prefect 3 flows: thin compositions of evaclip library calls.

    evaclip pipeline                              # the whole pipeline in this project, ephemeral Prefect
    python -m flows.pipeline                      # the same

The stages are dvc.yaml's: each task is `dvc repro --single-item STAGE`, run through DVC's API in this process
(an evaclip command too: `project.reproduce`), so DVC decides what is current and dvc.lock records what ran; `dvc status` is clean after every flow run. A run's inputs (overrides from the
Prefect form or `-s`, the bootstrap's teacher) are written to params.yaml first. The run is then saved as a
DVC experiment, whose name and commit, with dvc.lock's digests, go onto its MLflow runs and model version.
Retries are declared where failures are transient (the DVC remote, the MLflow server; never on
configuration or data errors). One pipeline run per project at a time: a second one waits.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Optional

from mlflow.entities import Param
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from pydantic import BaseModel, Field

from evaclip import project
from evaclip.cli import invoke
from evaclip.config import Params, load_params, profile_path
from evaclip.locations import remote_sources
from evaclip.tracking import RECORD, Decision, TrackingRecord, champion_uri, register_and_promote
from evaclip.tracking.runs import flatten
from evaclip.tracking.store import PARENT_RUN_ENV, connect, experiment_id, run_id_of
from flows.notifications import emit_champion_moved


class PipelineParameters(BaseModel):
    """What the Prefect UI shows as the run form."""

    params_file: str = Field("params.yaml", description="the run's base values (default: the project's params.yaml)")
    profile: Optional[str] = Field(None, description="a packaged profile (evaclip/profiles/) instead of params_file")
    overrides: list[str] = Field(default_factory=list, description="KEY.PATH=VALUE overrides, e.g. train.lr=1e-3")
    devices: Optional[int] = Field(None, gt=0, description="training processes (GPUs, or CPU processes)")
    data_source: Optional[str] = Field(None, description="fashion_mnist | image_folder | pairs | wds")
    force: bool = Field(False, description="run every stage, even those whose inputs did not change")
    bootstrap: bool = Field(False, description="EVA-02's loop: pre-train a fresh EVA from the registry's champion "
                                               "(masked image modelling) and start the new EVA-CLIP from it")


def overrides_of(parameters: PipelineParameters) -> list[str]:
    overrides = list(parameters.overrides)
    if parameters.devices:
        overrides.append(f"train.devices={parameters.devices}")
    if parameters.data_source:
        overrides.append(f"data.source={parameters.data_source}")
    return overrides


def base_file(parameters: PipelineParameters, root: Path) -> Optional[Path]:
    if parameters.profile:
        return profile_path(parameters.profile)
    path = (root / parameters.params_file).resolve()
    return None if path == (root / "params.yaml").resolve() else path


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


@task(retries=3, retry_delay_seconds=[5, 30, 120], retry_condition_fn=transient)
def find_teacher(params: Params) -> Optional[str]:
    return champion_uri(params)


@task
def write_run_params(root: Path, parameters: PipelineParameters, teacher: Optional[str]) -> Params:
    """This run's params.yaml: its base, the form's overrides, the bootstrap's teacher (DVC reads it all)."""
    overrides = overrides_of(parameters)
    if teacher:
        eva = load_params(base_file(parameters, root) or root / "params.yaml", overrides).pretrain.output_dir
        overrides += [f"pretrain.teacher={teacher}", f"init.vision={eva / 'eva.safetensors'}", "init.vision_format=eva"]
    path = project.run_params(root, overrides, base_file(parameters, root))
    return load_params(path)


@task
def run_stage(root: Path, stage: str, force: bool, parent_run_id: str) -> dict:
    """`dvc repro --single-item STAGE`: DVC runs it if its code, params or inputs changed (or `force`)."""
    logger = get_run_logger()
    started = time.perf_counter()
    ran = project.reproduce(root, stage, force, on_output=logger.info, env={PARENT_RUN_ENV: parent_run_id},
                            run_verb=invoke)
    if not ran:
        logger.info(f"{stage}: unchanged since dvc.lock recorded it, skipped")
    return {"skipped": not ran, "seconds": round(time.perf_counter() - started, 1)}


@task(retries=3, retry_delay_seconds=[5, 30, 120], retry_condition_fn=transient)
def open_parent_run(params: Params, name: str) -> str:
    client = connect(params)
    tags = {"evaclip.stage": "pipeline", "mlflow.runName": name, "evaclip.profile": params.profile}
    run_id = client.create_run(experiment_id(client, params), tags=tags).info.run_id
    flat = list(flatten(params).items())
    for start in range(0, len(flat), 90):
        client.log_batch(run_id, params=[Param(k, v[:6000]) for k, v in flat[start:start + 90]])
    return run_id


@task
def save_experiment(root: Path, name: str) -> dict[str, str]:
    """The run as a DVC experiment (`dvc exp apply NAME && dvc repro` reproduces it) and dvc.lock's digests."""
    return {"dvc.experiment": name, "dvc.experiment_rev": project.save_experiment(root, name),
            **project.lock_digests(root)}


@task(retries=3, retry_delay_seconds=[5, 30, 120], retry_condition_fn=transient)
def promote_model(params: Params, record: TrackingRecord, tags: dict[str, str]) -> Decision:
    return register_and_promote(params, record, tags)


@task(retries=3, retry_delay_seconds=[5, 30, 120], retry_condition_fn=transient)
def tag_runs(params: Params, run_ids: list[str], tags: dict[str, str], status: Optional[str] = None) -> None:
    client = connect(params)
    for run_id in filter(None, run_ids):
        for key, value in tags.items():
            client.set_tag(run_id, key, value)
    if status:
        client.set_terminated(run_ids[0], status)


@task(retries=3, retry_delay_seconds=[5, 30, 120])
def push(root: Path, remote: Optional[str]) -> None:
    logger = get_run_logger()
    project.push(root, remote, on_retry=lambda attempt, error: logger.warning(
        f"dvc push attempt {attempt} failed, retrying: {error.splitlines()[-1] if error else ''}"))


@flow(name="evaclip-pipeline", log_prints=True)
def pipeline(parameters: PipelineParameters = PipelineParameters()) -> dict:
    """dvc.yaml's stages (data, prepare, pretrain, init, train, evaluate), then promotion in the registry."""
    root = project.require_root()
    with contextlib.chdir(root), project.exclusive(root):
        name = f"{flow_run.get_name() or 'pipeline'}-{(flow_run.get_id() or '')[:8]}".strip("-")
        base = load_params(base_file(parameters, root) or root / "params.yaml", overrides_of(parameters))
        teacher = find_teacher(base) if parameters.bootstrap else None
        if parameters.bootstrap and teacher is None:
            print("bootstrap: the registry has no champion yet, so this run starts from random initialization")
        params = write_run_params(root, parameters, teacher)
        parent = open_parent_run(params, name)
        stages = {}
        try:
            for stage, target in project.stages(root).items():
                # Remote shards: prepare lists them again (their ETags) on every run; DVC cannot watch them.
                force = parameters.force or (stage == "prepare" and bool(remote_sources(params)))
                stages[stage] = run_stage.with_options(name=stage)(root, target, force, parent)
        except BaseException:
            tag_runs(params, [parent], {}, status="FAILED")
            raise
        record = TrackingRecord(**json.loads((Path(params.eval.output_dir) / RECORD).read_text()))
        started = time.perf_counter()
        refs = save_experiment(root, name) if params.data.version else project.lock_digests(root)
        decision = promote_model(params, record, refs)
        if decision.moved:
            emit_champion_moved(decision.name, decision.version, decision.previous, decision.reason)
        tag_runs(params, [parent, record.eval_run_id, record.parent_run_id, run_id_of(params.train.output_dir)],
                 refs, status=None)
        tag_runs(params, [parent], {"model_version": decision.version, "eval_run_id": record.eval_run_id},
                 status="FINISHED")
        if params.data.version:
            push(root, params.data.remote)
        stages["promote"] = {"skipped": False, "seconds": round(time.perf_counter() - started, 1)}
        summary = {"metrics": record.metrics, "model_uri": record.model_uri, "eval_run_id": record.eval_run_id,
                   "parent_run_id": parent, "train_run_id": run_id_of(params.train.output_dir),
                   "teacher": teacher, "dvc": refs, "decision": decision.__dict__, "stages": stages}
        create_markdown_artifact(markdown=summary_markdown(params, summary), key="evaclip-pipeline",
                                 description="EVA-CLIP pipeline run")
        return summary


def summary_markdown(params: Params, summary: dict) -> str:
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in summary["metrics"].items() if "/" not in k and k != "samples")
    timings = "\n".join(f"| {name} | {'skipped (unchanged)' if s['skipped'] else 'ran'} | {s['seconds']:.1f} |"
                        for name, s in summary["stages"].items())
    decision = summary["decision"]
    verdict = "**promoted to champion**" if decision["promoted"] else "not promoted"
    refs = summary["dvc"]
    return (
        f"# EVA-CLIP pipeline: {params.model.name} ({params.profile})\n\n"
        f"| metric | value |\n|---|---|\n{rows}\n\n"
        f"| stage | status | seconds |\n|---|---|---|\n{timings}\n\n"
        f"Model `{decision['name']}` version {decision['version']}: {verdict}. Reason: {decision['reason']}. "
        f"Champion: version {decision['champion']}.\n\n"
        f"MLflow run `{summary['eval_run_id']}`; model `{summary['model_uri']}`.\n\n"
        f"DVC experiment `{refs.get('dvc.experiment', '-')}` ({refs.get('dvc.experiment_rev', '-')[:12]}): "
        f"`dvc exp apply {refs.get('dvc.experiment', 'NAME')} && dvc repro` reproduces this run.\n"
    )


if __name__ == "__main__":
    print(json.dumps(pipeline(), indent=2, default=str))
