"""What a pipeline run logs: one parent run, a nested run per stage, and the model as a pyfunc."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow

import evaclip as evaclip_package

from ..config import Params
from ..project import data_version, find_root, lock_digests
from .store import connect, experiment_id, run_id_of

if TYPE_CHECKING:
    from ..eval import EvalResult

# torch, the model and its export load inside the functions that log a model: the pipeline's flow process
# imports this module for its records and parameters and needs none of them (about 4 s of its start).

RECORD = "tracking.json"  # beside the evaluation outputs: what `evaclip promote` picks up


@dataclass
class TrackingRecord:
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    eval_run_id: str
    model_uri: str
    metrics: dict
    eval_set: str
    data_version: str | None
    data_manifest: str | None = None
    other_sets: dict = field(default_factory=dict)  # name -> identity of every evaluation set after the first


def flatten(params: Params) -> dict[str, str]:
    flat: dict[str, str] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else key, inner)
        else:
            flat[prefix] = json.dumps(value) if isinstance(value, list) else str(value)

    walk("", params.model_dump(mode="json"))
    return flat


def run_tags(params: Params) -> dict[str, str]:
    tags = {"evaclip.profile": params.profile, "evaclip.model": params.model.name,
            "host": platform.node(), "device": _device()}
    root = find_root()
    version_ = data_version(root, params)
    if version_:
        tags["data_version"] = version_
    from ..data.loader import data_manifest_version

    tags["data_manifest"] = data_manifest_version(params.data)[:16]  # the training shards' identities
    if root is not None:
        tags.update(lock_digests(root))
    tags.update(_git())
    for package in ("evaclip", "torch", "open_clip_torch", "timm", "deepspeed", "mlflow", "dvc", "prefect"):
        try:
            tags[f"version.{package}"] = version(package)
        except PackageNotFoundError:
            pass
    return tags


def _device() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({os.cpu_count()} cores)"


def _git() -> dict[str, str]:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        return {}
    return {"git_commit": commit, "git_dirty": str(dirty).lower()}


def log_run(params: Params, evaluation: EvalResult, parent_run_id: str | None = None) -> TrackingRecord:
    """Log the pipeline's stages and the model; returns what promotion needs.

    A parent run (or the given one) holds the resolved config and the tags; nested runs hold the init
    report, the data manifest and quality report, the training curves and the evaluation.
    """
    from ..checkpoint import atomic_write_text

    client = connect(params)
    experiment = experiment_id(client, params)
    mlflow.set_experiment(experiment_id=experiment)
    tags = run_tags(params)
    parent_run_id = parent_run_id or os.environ.get("EVACLIP_PARENT_RUN_ID")
    with mlflow.start_run(run_id=parent_run_id, run_name=None if parent_run_id else f"pipeline-{params.profile}",
                          tags=tags) as parent:
        if not parent_run_id:
            mlflow.log_params(flatten(params))
        _log_stage_data(params, tags)
        _log_stage_init(params, tags)
        adopt_stage_run(params.train.output_dir, parent.info.run_id)
        adopt_stage_run(params.pretrain.output_dir, parent.info.run_id)
        record = _log_stage_evaluate(params, evaluation, tags, parent.info.run_id, experiment)
    record.tracking_uri = mlflow.get_tracking_uri()
    atomic_write_text(Path(params.eval.output_dir) / RECORD, json.dumps(asdict(record), indent=2) + "\n")
    return record


def _log_stage_data(params: Params, tags: dict) -> None:
    folder = Path(params.data.output_dir) / "train"
    with mlflow.start_run(run_name="data", nested=True, tags=tags):
        mlflow.log_params({"data.source": params.data.source, "data.output_dir": str(params.data.output_dir)})
        for name in ("manifest.json", "quality.json"):
            if (folder / name).is_file():
                mlflow.log_artifact(str(folder / name), artifact_path="data")
        if (folder / "manifest.json").is_file():
            mlflow.log_metric("samples", json.loads((folder / "manifest.json").read_text())["total"])
        from ..data.dedup import DEDUP_REPORT

        dedup = Path(params.data.output_dir) / DEDUP_REPORT
        if dedup.is_file():
            mlflow.log_artifact(str(dedup), artifact_path="data")
            mlflow.log_metrics(duplicate_metrics(params))


def duplicate_metrics(params: Params) -> dict[str, float]:
    """Training images that duplicate each evaluation set's images (prepare's dedup.json), as metrics."""
    from ..data.dedup import DEDUP_REPORT

    file = Path(params.data.output_dir) / DEDUP_REPORT
    report = json.loads(file.read_text()) if file.is_file() else {"sets": {}}
    metrics = {f"train_duplicates_{kind}_{name}": float(count)
               for name, counts in report["sets"].items() for kind, count in counts.items()}
    if not file.is_file():
        return {}
    return {**metrics, "train_duplicates_dropped": float(report.get("dropped", 0)),
            "train_images_checked_for_duplicates": float(report.get("training_images_checked", 0))}


def _log_stage_init(params: Params, tags: dict) -> None:
    report = Path(params.init.output_dir) / "init_report.json"
    with mlflow.start_run(run_name="init", nested=True, tags=tags):
        if report.is_file():
            mlflow.log_artifact(str(report), artifact_path="init")
            for status, count in json.loads(report.read_text())["counts"].items():
                mlflow.log_metric(f"keys_{status}", count)


def adopt_stage_run(output_dir: Path, parent_run_id: str) -> None:
    """Nest a training or pre-training run (opened live by the launcher) under the pipeline's run, if not yet."""

    run_id = run_id_of(Path(output_dir))
    if not run_id:
        return
    client = mlflow.tracking.MlflowClient()
    try:
        run = client.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return  # logged to another store
    if "mlflow.parentRunId" not in run.data.tags and run_id != parent_run_id:
        client.set_tag(run_id, "mlflow.parentRunId", parent_run_id)


def _log_stage_evaluate(params: Params, evaluation: EvalResult, tags: dict, parent_id: str, experiment: str) -> TrackingRecord:
    from ..export import export_open_clip
    from . import pyfunc

    out = Path(params.eval.output_dir)
    with mlflow.start_run(run_name="evaluate", nested=True, tags=tags) as run:
        first = evaluation.sets[0]
        mlflow.log_params({"eval.checkpoint": evaluation.checkpoint, "eval.set": first.path,
                           "eval.templates": str(params.eval.templates)})
        mlflow.log_metrics({k.replace("/", "_").replace("@", "_at_"): v for k, v in evaluation.metrics.items()})
        mlflow.log_metrics(duplicate_metrics(params))  # beside the zero-shot figures they may inflate
        for file in sorted(out.glob("*")):
            if file.suffix in (".json", ".csv", ".png") and file.name != RECORD:
                mlflow.log_artifact(str(file), artifact_path="eval")
        with tempfile.TemporaryDirectory() as tmp:
            export = export_open_clip(params, evaluation.checkpoint, Path(tmp) / "open_clip")
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(Path(pyfunc.__file__).with_name("pyfunc_model.py")),  # code, not a pickle
                artifacts={"open_clip": str(export.directory)},
                signature=pyfunc.signature(),
                input_example=_input_example(first),
                pip_requirements=[f"{p}=={version(p).split('+')[0]}"
                                  for p in ("torch", "torchvision", "open_clip_torch", "timm", "pydantic", "pyyaml")],
                code_paths=[str(Path(evaclip_package.__file__).parent)],  # our tower sizes and the pyfunc class
            )
        mlflow.set_tag("model_uri", info.model_uri)
        return TrackingRecord("", experiment, parent_id, run.info.run_id, info.model_uri,
                              evaluation.metrics, first.identity or first.path, tags.get("data_version"),
                              tags.get("data_manifest"),
                              {s.name: s.identity or s.path for s in evaluation.sets[1:]})


def _input_example(first):
    import io

    import pandas as pd
    from PIL import Image

    from . import pyfunc

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (128, 64, 32)).save(buffer, format="PNG")
    return pd.DataFrame({"image": [pyfunc.encode_image(buffer.getvalue()), ""], "text": ["", "a photo of a bag."]})
