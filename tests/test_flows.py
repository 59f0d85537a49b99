"""The Prefect pipeline flow against a real (ephemeral) Prefect API, real DeepSpeed, real MLflow."""

from __future__ import annotations

import asyncio
import os

import mlflow
import pytest

from .conftest import REPO
from .test_data import png, red_blue_pairs

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def prefect_api():
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def test_pipeline_flow_prepares_trains_evaluates_and_promotes(prefect_api, tmp_path):
    from prefect.client.orchestration import get_client

    from flows.pipeline import PipelineParameters, pipeline

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
