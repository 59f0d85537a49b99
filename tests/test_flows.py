"""The Prefect pipeline flow against a real (ephemeral) Prefect API, real DVC, real DeepSpeed, real MLflow.

The flow runs dvc.yaml's stages in a project (a temporary git + DVC repository holding this one's pipeline),
so DVC, Prefect and MLflow must agree about every run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys

import mlflow
import pytest
import yaml

from evaclip.config import load_params
from evaclip.data.loader import data_manifest_version
from evaclip.precision import resolve_precision

from .conftest import REPO, make_project, sh
from .test_data import png, red_blue_pairs

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def prefect_api():
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="module")
def first_run(prefect_api, tmp_path_factory):
    """One pipeline run on a micro model, with overrides from the form; later tests build on it."""
    from flows.pipeline import PipelineParameters, pipeline

    tmp_path = tmp_path_factory.mktemp("flow")
    source = red_blue_pairs(tmp_path / "pairs", 128)
    evalset = tmp_path / "eval"
    for name, color in (("red", (250, 0, 5)), ("blue", (5, 0, 250))):
        (evalset / name).mkdir(parents=True)
        for i in range(3):
            (evalset / name / f"{i}.png").write_bytes(png(color, size=(32, 32)))
    root = make_project(tmp_path / "project", [
        "model.name=evaclip-micro", "data.source=pairs", f"data.path={source}", "data.samples_per_shard=16",
        "data.workers=0", "train.steps=6", "train.warmup_steps=1", "train.batch_size=16", "train.checkpoint_every=3",
        "train.log_every=2",
        f"eval.sets=[{evalset}]", "eval.templates=simple",
    ], remote=tmp_path / "remote")
    # From the Prefect form. The towers' lr too: train.lr alone moves only logit_scale's, by less than a bf16
    # step in 6 steps (the demo profile trains in bf16 on CPUs that have it), so the two runs would write the same bytes.
    overrides = ["train.lr=0.003", "train.visual_lr=0.003"]
    os.environ["EVACLIP_HOME"] = str(root)  # what the deployments set; the flow runs in that project
    try:
        summary = pipeline(PipelineParameters(overrides=overrides, devices=2))
    finally:
        del os.environ["EVACLIP_HOME"]
    return summary, overrides, root


@pytest.fixture(autouse=True)
def in_the_project(first_run, monkeypatch):
    monkeypatch.setenv("EVACLIP_HOME", str(first_run[2]))


def _client(root):
    uri = f"sqlite:///{root / 'outputs' / 'mlflow' / 'mlflow.db'}"
    return mlflow.tracking.MlflowClient(uri, registry_uri=uri)


def test_the_flow_runs_dvc_stages_so_dvc_has_nothing_left_to_do(first_run):
    from prefect.client.orchestration import get_client

    summary, _, root = first_run
    assert not any(stage["skipped"] for stage in summary["stages"].values())
    assert summary["decision"]["promoted"] and summary["decision"]["reason"] == "no champion yet"
    assert "Data and pipelines are up to date" in sh(["dvc", "status"], root)
    assert "Running stage" not in sh(["dvc", "repro"], root)
    assert "zeroshot_top1" in sh(["dvc", "metrics", "show"], root)  # dvc.yaml's metrics and plots are there
    assert (root / "outputs/train/metrics.csv").read_text().startswith("step,")
    # The form's override is in params.yaml and dvc.lock, as the run's input.
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert lock["stages"]["train"]["params"]["params.yaml"]["train"]["lr"] == 0.003

    client = _client(root)
    version = client.get_model_version_by_alias("evaclip-micro", "champion")
    assert str(version.version) == summary["decision"]["version"]
    experiment = summary["dvc"]["dvc.experiment"]
    assert version.tags["dvc.experiment"] == experiment and len(version.tags["dvc.lock.code"]) == 16
    assert experiment in sh(["dvc", "exp", "list", "--all-commits", "--name-only"], root)
    train_run = client.get_run(summary["train_run_id"])
    assert train_run.data.tags["mlflow.parentRunId"] == summary["parent_run_id"]
    assert train_run.data.tags["dvc.experiment_rev"] == summary["dvc"]["dvc.experiment_rev"]
    assert train_run.data.tags["evaclip.precision"] == resolve_precision("auto")  # params.yaml's `auto`, as it ran
    assert [m.step for m in client.get_metric_history(train_run.info.run_id, "loss")] == [2, 4, 6]
    with contextlib.chdir(root):  # the training shards' identities, as the run and the model version record them
        manifest = data_manifest_version(load_params("params.yaml").data)[:16]
    assert train_run.data.tags["data_manifest"] == version.tags["data_manifest"] == manifest
    duplicates = client.get_run(summary["eval_run_id"]).data.metrics
    assert {k for k in duplicates if k.startswith("train_duplicates_")} >= {"train_duplicates_dropped"}
    assert any(k.startswith("train_duplicates_near_") for k in duplicates)

    async def artifact():
        async with get_client() as prefect:
            return await prefect.read_artifacts(limit=5)

    markdown = [a for a in asyncio.run(artifact()) if a.key == "evaclip-pipeline"]
    assert markdown and "zeroshot_top1" in markdown[0].data and f"dvc exp apply {experiment}" in markdown[0].data


def test_changes_rerun_what_they_touch_and_dvc_alone_reproduces_a_run(first_run):
    from flows.pipeline import PipelineParameters, pipeline

    summary, overrides, root = first_run
    again = pipeline(PipelineParameters(overrides=overrides, devices=2))
    assert all(stage["skipped"] for name, stage in again["stages"].items() if name != "promote")
    assert again["decision"]["version"] == summary["decision"]["version"]  # same run: same model version

    # Without the override, params.yaml is the user's file again: training reruns, data and init do not.
    plain = pipeline(PipelineParameters(devices=2))
    assert {name for name, s in plain["stages"].items() if not s["skipped"]} == {"train", "evaluate", "promote"}
    assert plain["decision"]["version"] != summary["decision"]["version"]
    assert "Data and pipelines are up to date" in sh(["dvc", "status"], root)
    plain_model = (root / "outputs/train/model.safetensors").read_bytes()

    # The first run, back from its DVC experiment and rebuilt by DVC alone: the same metrics.
    sh(["dvc", "exp", "apply", summary["dvc"]["dvc.experiment"]], root)
    assert "Running stage" not in sh(["dvc", "repro"], root)  # its outputs came back from DVC's cache
    trained = (root / "outputs/train/model.safetensors").read_bytes()
    assert "Running stage 'train'" in sh(["dvc", "repro", "--force", "--downstream", "train"], root)  # recomputed
    assert (root / "outputs/train/model.safetensors").read_bytes() == trained != plain_model
    assert json.loads((root / "outputs/eval/metrics.json").read_text())["metrics"] == summary["metrics"]

    # An edit of the training code: DVC (and so the flow) reruns training, not the data.
    from evaclip import project

    engine = root / "evaclip" / "train" / "engine.py"
    engine.write_text(engine.read_text() + "\n# a fix\n")
    assert project.changed(root, "train") and not project.changed(root, "prepare")


def test_two_flow_runs_at_once_in_one_project_both_finish(first_run, prefect_api):
    """The second waits for the first (one pipeline per checkout); dvc.lock stays whole."""
    from prefect.settings import PREFECT_API_URL

    _, overrides, root = first_run
    script = ("import sys; from flows.pipeline import PipelineParameters, pipeline; "
              "print(pipeline(PipelineParameters(overrides=sys.argv[1:], devices=2))['decision']['version'])")
    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value(), PYTHONPATH=str(REPO), EVACLIP_HOME=str(root))
    runs = [subprocess.Popen([sys.executable, "-c", script, *overrides, f"train.seed={seed}", "train.steps=3"],
                             cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for seed in (1, 2)]
    outputs = [process.communicate(timeout=900)[0] for process in runs]
    for process, output in zip(runs, outputs, strict=True):
        assert process.returncode == 0, output[-3000:]
    versions = {output.strip().splitlines()[-1] for output in outputs}
    assert len(versions) == 2  # two runs, two models
    assert yaml.safe_load((root / "dvc.lock").read_text())["stages"]["train"]["params"]["params.yaml"]["train"]["seed"] in (1, 2)


def test_bootstrap_pretrains_a_fresh_eva_from_the_champion_and_starts_from_it(first_run):
    """EVA-02's loop: the registry's champion teaches a new EVA (MIM); the next EVA-CLIP starts from it."""
    from flows.pipeline import PipelineParameters, pipeline

    summary, overrides, root = first_run
    champion = _client(root).get_model_version_by_alias("evaclip-micro", "champion").version
    bootstrap = [*overrides, "pretrain.steps=3", "pretrain.batch_size=8", "pretrain.warmup_steps=1"]
    result = pipeline(PipelineParameters(overrides=bootstrap, devices=2, bootstrap=True))
    assert result["teacher"] == f"models:/evaclip-micro/{champion}"
    assert not result["stages"]["pretrain"]["skipped"] and (root / "outputs/pretrain/eva.safetensors").is_file()
    report = json.loads((root / "outputs/init/init_report.json").read_text())
    assert report["counts"]["loaded"] > 0 and report["counts"]["dropped"] >= 3  # vision tower from the EVA
    assert yaml.safe_load((root / "params.yaml").read_text())["pretrain"]["teacher"] == result["teacher"]
    client = _client(root)
    runs = client.search_runs([client.get_experiment_by_name("evaclip").experiment_id],
                              "tags.`evaclip.stage` = 'pretrain'")
    assert runs and runs[0].data.tags["evaclip.teacher"] == result["teacher"]
    assert runs[0].data.tags["mlflow.parentRunId"] == result["parent_run_id"] and "loss" in runs[0].data.metrics


def test_the_ablation_study_runs_its_cells_once_and_reports_what_is_missing(prefect_api, first_run, tmp_path):
    from flows.ablation import AblationParameters, ablation

    _, overrides, root = first_run
    study = dict(overrides=overrides + ["pretrain.batch_size=16"], devices=2, arms=["eva-lamb", "attn-sdpa"],
                 steps=4, teacher=str(root / "outputs" / "train" / "model.safetensors"), pretrain_steps=[2],
                 lamb_lrs=[0.003], curve_every=2, curve_samples=4, timing_steps=2,
                 output_dir=str(tmp_path / "ablation"), results_file=str(tmp_path / "ablation.json"))
    result = ablation(AblationParameters(seeds=[0], **study))["summary"]
    rows = {row["arm"]: row for row in result["rows"]}
    (eva_seed,) = rows["eva-lamb"]["seeds"]
    assert eva_seed["zeroshot_top1"] is not None and eva_seed["samples_seen"] == 4 * 32
    assert [samples for samples, _ in eva_seed["curve"]] == [2 * 32, 4 * 32]  # every 2 steps, 32 samples a step
    (timed,) = rows["attn-sdpa"]["seeds"]
    assert timed["zeroshot_top1"] is None and timed["samples_per_s"] > 0  # time only
    assert result["pretrain_lengths"][0]["pretrain_steps"] == 2 and result["chosen_pretrain_steps"] == 2
    (swept,) = result["sweep"]["lamb"]  # on a seed of its own: no row's seed is the best of several tries
    assert swept["lr"] == 0.003 and swept["zeroshot_top1"] is not None and result["learning_rates"] == {"lamb": 0.003}
    assert result["missing"] == [] and json.loads((tmp_path / "ablation.json").read_text())["rows"]
    assert (tmp_path / "ablation" / "curves.png").stat().st_size > 0

    client = _client(root)
    experiment = client.get_experiment_by_name("evaclip-ablation").experiment_id
    cells = client.search_runs([experiment], "tags.`evaclip.stage` = 'ablation'")
    assert sorted(r.data.tags["evaclip.ablation.kind"] for r in cells) == ["pretrain", "run", "run", "timing"]
    run_cell = next(r for r in cells if r.data.tags["mlflow.runName"] == "run-eva-lamb-seed0")
    nested = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{run_cell.info.run_id}'")
    assert [r.data.tags["evaclip.stage"] for r in nested] == ["train"]  # its training run, nested
    assert len(client.get_metric_history(run_cell.info.run_id, "curve_zeroshot_top1")) == 2

    # Again with a third seed's worth of work allowed to run: none (max_new_cells=0). What was finished is found
    # in MLflow, not run again, and the report names what is missing.
    again = ablation(AblationParameters(seeds=[0, 1], max_new_cells=0, **study))
    assert len(client.search_runs([experiment], "tags.`evaclip.stage` = 'ablation'")) == 4
    assert again["summary"]["missing"] == ["eva-lamb seed 1", "attn-sdpa seed 1"]
    assert again["summary"]["rows"][0]["seeds"][0]["zeroshot_top1"] == eva_seed["zeroshot_top1"]
    assert "**Missing cells** (2): eva-lamb seed 1, attn-sdpa seed 1." in again["table"]
    reports = client.search_runs([experiment], "tags.`evaclip.stage` = 'ablation-report'")
    assert len(reports) == 2 and {a.path for a in client.list_artifacts(reports[0].info.run_id)} >= {
        "ablation.md", "ablation.json", "curves.png"}



def test_evaclip_pipeline_without_a_prefect_server_runs_on_a_temporary_one_it_stops(tmp_path):
    """`make demo`'s command: no PREFECT_API_URL, so a local Prefect server for this run, its history in
    PREFECT_HOME, gone afterwards; one that cannot start gets an error that says what to do."""
    import sqlite3

    source = red_blue_pairs(tmp_path / "pairs", 32)
    evalset = tmp_path / "eval"
    for name, color in (("red", (250, 0, 5)), ("blue", (5, 0, 250))):
        (evalset / name).mkdir(parents=True)
        (evalset / name / "0.png").write_bytes(png(color, size=(32, 32)))
    root = make_project(tmp_path / "project", [
        "model.name=evaclip-micro", "data.source=pairs", f"data.path={source}", "data.samples_per_shard=16",
        "data.workers=0", "train.steps=2", "train.warmup_steps=1", "train.batch_size=16", "train.devices=1",
        f"eval.sets=[{evalset}]", "eval.templates=simple"])
    home = tmp_path / "prefect"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(home), PYTHONPATH=str(REPO), EVACLIP_HOME=str(root))
    command = [sys.executable, "-m", "flows.cli", "pipeline"]
    process = subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = process.communicate(timeout=600)[0]
    assert process.returncode == 0, output[-3000:]
    assert "zero-shot top-1" in output and "promoted" in output
    with contextlib.closing(sqlite3.connect(home / "prefect.db")) as db:  # the run, in PREFECT_HOME's history
        runs = db.execute("select f.name, r.state_type from flow_run r join flow f on f.id = r.flow_id").fetchall()
    assert runs == [("evaclip-pipeline", "COMPLETED")]
    assert not _prefect_servers(home)  # stopped with the command

    # A server that cannot open its database: the command says so (and what else to do), and runs nothing.
    lock = (root / "dvc.lock").read_text()
    broken = dict(env, PREFECT_SERVER_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{tmp_path}/no/such/dir/prefect.db")
    failed = subprocess.run([*command, "--force"], cwd=root, env=broken, capture_output=True, text=True, timeout=300)
    assert failed.returncode == 1 and "the temporary Prefect server exited" in failed.stderr, failed.stderr[-3000:]
    assert "PREFECT_API_URL" in failed.stderr and not _prefect_servers(home)
    assert (root / "dvc.lock").read_text() == lock


def _prefect_servers(home) -> list:
    import psutil

    found = []
    for process in psutil.process_iter(["cmdline"]):
        if "prefect.server.api.server:create_app" in " ".join(process.info["cmdline"] or []):
            with contextlib.suppress(psutil.Error):
                if process.environ().get("PREFECT_HOME") == str(home):
                    found.append(process)
    return found
