"""The Prefect pipeline flow against a real (ephemeral) Prefect API, real DeepSpeed, real MLflow."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from .conftest import REPO
from .test_data import git_dvc_repo, image_folder, png, red_blue_pairs

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def prefect_api():
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="module")
def first_run(prefect_api, tmp_path_factory):
    """One pipeline run on a micro model; later tests re-run it with the same or changed parameters."""
    from flows.pipeline import PipelineParameters, pipeline

    tmp_path = tmp_path_factory.mktemp("flow")
    source = red_blue_pairs(tmp_path / "pairs", 128)
    evalset = tmp_path / "eval"
    for name, color in (("red", (250, 0, 5)), ("blue", (5, 0, 250))):
        (evalset / name).mkdir(parents=True)
        for i in range(3):
            (evalset / name / f"{i}.png").write_bytes(png(color, size=(32, 32)))
    out = tmp_path / "out"
    overrides = [
        "model.name=evaclip-micro", "data.source=pairs", f"data.path={source}", f"data.output_dir={out / 'data'}",
        "data.version=false", "data.samples_per_shard=16", "data.workers=0", f"init.output_dir={out / 'init'}",
        f"train.output_dir={out / 'train'}", "train.steps=6", "train.warmup_steps=1", "train.batch_size=16",
        "train.checkpoint_every=3", f"eval.sets=[{evalset}]", f"eval.output_dir={out / 'eval'}",
        "eval.templates=simple", f"tracking.default_store={out / 'mlflow'}",
    ]
    summary = pipeline(PipelineParameters(params_file=str(REPO / "params.yaml"), overrides=overrides, devices=2))
    return summary, overrides, out


def test_pipeline_flow_prepares_trains_evaluates_and_promotes(first_run):
    from prefect.client.orchestration import get_client

    summary, _, out = first_run
    assert not any(stage["skipped"] for stage in summary["stages"].values())
    assert summary["data"]["samples"] == 128 and summary["init"]["loaded"] == 0
    assert 0.0 <= summary["metrics"]["zeroshot_top1"] <= 1.0
    assert summary["decision"]["promoted"] and summary["decision"]["reason"] == "no champion yet"
    uri = f"sqlite:///{out / 'mlflow' / 'mlflow.db'}"
    client = mlflow.tracking.MlflowClient(uri, registry_uri=uri)
    assert client.get_model_version_by_alias("evaclip-micro", "champion").version == summary["decision"]["version"]

    async def artifact():
        async with get_client() as prefect:
            return await prefect.read_artifacts(limit=5)

    markdown = [a for a in asyncio.run(artifact()) if a.key == "evaclip-pipeline"]
    assert markdown and "zeroshot_top1" in markdown[0].data and "promoted to champion" in markdown[0].data


def test_a_second_run_skips_what_did_not_change_and_a_new_parameter_reruns_training(first_run):
    from flows.pipeline import PipelineParameters, pipeline

    summary, overrides, out = first_run
    params_file = str(REPO / "params.yaml")
    again = pipeline(PipelineParameters(params_file=params_file, overrides=overrides, devices=2))
    assert {name for name, stage in again["stages"].items() if stage["skipped"]} == {"prepare", "init", "train", "evaluate"}
    assert again["decision"]["version"] == summary["decision"]["version"]  # same run: same model version
    assert again["metrics"] == summary["metrics"]

    # The CLI front door runs the same flow and ends with the summary table.
    from typer.testing import CliRunner

    from evaclip.cli import app

    args = [arg for override in overrides for arg in ("-s", override)]
    result = CliRunner().invoke(app, ["pipeline", "-p", params_file, *args, "-s", "train.devices=2"])
    assert result.exit_code == 0, result.output
    assert "skipped (unchanged)" in result.output and "mlflow ui --backend-store-uri" in result.output
    assert f"zero-shot top-1: {summary['metrics']['zeroshot_top1']:.3f}" in result.output

    # Only training's recipe changes: data and init are reused, training starts over, evaluation follows.
    changed = pipeline(PipelineParameters(params_file=params_file, overrides=[*overrides, "train.steps=4"], devices=2))
    assert {name for name, stage in changed["stages"].items() if stage["skipped"]} == {"prepare", "init"}
    assert changed["decision"]["version"] != summary["decision"]["version"]

    # An output deleted behind the pipeline's back is rebuilt, not trusted.
    (out / "init" / "model.safetensors").unlink()
    rebuilt = pipeline(PipelineParameters(params_file=params_file, overrides=[*overrides, "train.steps=4"], devices=2))
    assert not rebuilt["stages"]["init"]["skipped"] and rebuilt["stages"]["prepare"]["skipped"]


def test_two_flow_runs_at_once_do_not_collide_on_dvc(prefect_api, tmp_path):
    """Two data flows in two processes version two folders of one DVC repository at the same time."""
    from prefect.settings import PREFECT_API_URL

    repo = git_dvc_repo(tmp_path / "repo", tmp_path / "remote")
    script = (
        "import sys; from flows.pipeline import PipelineParameters, data_flow; "
        "data_flow(PipelineParameters(params_file=sys.argv[1], overrides=sys.argv[2:]))"
    )
    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value(), PYTHONPATH=str(REPO), DVC_NO_ANALYTICS="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    runs = []
    for name in ("a", "b"):
        source = image_folder(tmp_path / f"source-{name}", per_class=4)
        overrides = ["data.source=image_folder", f"data.path={source}", f"data.output_dir={repo / name}",
                     "data.samples_per_shard=4"]
        runs.append(subprocess.Popen([sys.executable, "-c", script, str(REPO / "params.yaml"), *overrides], cwd=repo,
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [process.communicate(timeout=600)[0] for process in runs]
    for process, output in zip(runs, outputs, strict=True):
        assert process.returncode == 0, output[-3000:]
    assert (repo / "a.dvc").is_file() and (repo / "b.dvc").is_file()
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "--cloud"], cwd=repo, env=env, capture_output=True,
                            text=True, check=True)
    assert "in sync" in status.stdout  # both folders reached the remote


def test_bootstrap_pretrains_a_fresh_eva_from_the_champion_and_starts_from_it(first_run, tmp_path):
    """EVA-02's loop: the registry's champion teaches a new EVA (MIM); the next EVA-CLIP starts from it."""
    import mlflow as mlflow_module

    from flows.pipeline import PipelineParameters, pipeline

    summary, overrides, out = first_run
    uri = f"sqlite:///{out / 'mlflow' / 'mlflow.db'}"
    champion = mlflow_module.tracking.MlflowClient(uri, registry_uri=uri).get_model_version_by_alias(
        "evaclip-micro", "champion").version
    bootstrap = [*overrides, "pretrain.steps=3", "pretrain.batch_size=8", "pretrain.warmup_steps=1",
                 f"pretrain.output_dir={tmp_path / 'pretrain'}", f"init.output_dir={tmp_path / 'init'}",
                 f"train.output_dir={tmp_path / 'train'}", f"eval.output_dir={tmp_path / 'eval'}"]
    result = pipeline(PipelineParameters(params_file=str(REPO / "params.yaml"), overrides=bootstrap, devices=2,
                                         bootstrap=True))
    assert result["pretrain"]["teacher"] == f"models:/evaclip-micro/{champion}"
    assert not result["stages"]["pretrain"]["skipped"] and (tmp_path / "pretrain" / "eva.safetensors").is_file()
    assert result["init"]["loaded"] > 0 and result["init"]["dropped"] >= 3  # vision tower from the EVA; MIM keys dropped
    client = mlflow_module.tracking.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("evaclip").experiment_id],
                              "tags.`evaclip.stage` = 'pretrain'")
    assert runs and runs[0].data.tags["evaclip.teacher"] == result["pretrain"]["teacher"]
    assert "loss" in runs[0].data.metrics


def test_the_ablation_flow_runs_rows_and_writes_the_table(prefect_api, first_run, tmp_path):
    from evaclip.checkpoint import write_state_dict
    from evaclip.pretrain import MIMStudent
    from flows.ablation import AblationParameters, ablation

    _, overrides, _ = first_run
    eva = write_state_dict(MIMStudent("evaclip-micro", 8).eva_state_dict(), tmp_path / "eva.safetensors")
    result = ablation(AblationParameters(params_file=str(REPO / "params.yaml"), overrides=overrides, devices=2,
                                         rows=[1, 4, 6], seeds=[0], eva_checkpoint=str(eva),
                                         output_dir=str(tmp_path / "ablation")))
    by_row = {r["row"]: r for r in result["results"]}
    assert set(by_row) == {1, 4, 6} and all(r["train_seconds"] > 0 for r in by_row.values())
    assert "zeroshot_top1" in by_row[1]["metrics"] and not by_row[6]["metrics"]  # row 6: time only
    table = (tmp_path / "ablation" / "table.md").read_text()
    assert "| 4 | EVA init, LAMB, 50% token masking | 1 |" in table
    uri = f"sqlite:///{first_run[2] / 'mlflow' / 'mlflow.db'}"
    client = mlflow.tracking.MlflowClient(uri)
    experiment = client.get_experiment_by_name("evaclip-ablation")
    assert experiment is not None and len(client.search_runs([experiment.experiment_id])) >= 3
