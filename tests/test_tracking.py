"""Evaluation, MLflow tracking, the pyfunc model, serving and the registry's promotion rule.

Real stores only: SQLite here; tests/test_stack.py runs the pipeline against a real `mlflow server` with
PostgreSQL and S3 artifacts (the docker-compose topology, natively).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import requests
import torch
from PIL import Image
from typer.testing import CliRunner

from deploy.stack import free_port, wait_http
from evaclip.checkpoint import write_state_dict
from evaclip.cli import app
from evaclip.config import ModelConfig, load_params
from evaclip.eval import evaluate
from evaclip.model import create_model
from evaclip.tracking import (
    TrackingRecord,
    TrackingUnavailableError,
    decide,
    log_run,
    register_and_promote,
    registered_name,
)
from evaclip.tracking.pyfunc import encode_image

from .conftest import REPO
from .test_data import image_folder

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A micro model checkpoint, an ImageFolder evaluation set and a caption set."""
    root = tmp_path_factory.mktemp("tracking")
    torch.manual_seed(0)
    write_state_dict(create_model(ModelConfig(name="evaclip-micro")).state_dict(), root / "model.safetensors")
    image_folder(root / "eval", per_class=4)
    captions = root / "captions"
    captions.mkdir()
    for i in range(12):
        Image.new("RGB", (16, 16), (20 * i, 0, 0)).save(captions / f"{i}.png")
        (captions / f"{i}.txt").write_text(f"a red square {i}\na square number {i}\n")
    return root


def params_in(workspace: Path, out: Path, *extra: str):
    return load_params(REPO / "params.yaml", [
        "model.name=evaclip-micro", f"eval.checkpoint={workspace / 'model.safetensors'}",
        f"eval.sets=[{workspace / 'eval'}]", f"eval.output_dir={out / 'eval'}", f"tracking.default_store={out / 'mlflow'}",
        f"train.output_dir={out / 'train'}", f"init.output_dir={out / 'init'}", f"data.output_dir={out / 'data'}",
        "eval.batch_size=5", *extra,
    ])


# --- evaluation --------------------------------------------------------------------------------

def test_zero_shot_metrics_are_consistent_and_deterministic(workspace, tmp_path):
    params = params_in(workspace, tmp_path, "eval.templates=simple")
    first = evaluate(params, progress=False)
    result = first.sets[0]
    matrix = torch.tensor(result.confusion)
    assert matrix.sum() == 12 and matrix.shape == (3, 3)
    assert result.metrics["zeroshot_top1"] == pytest.approx(matrix.diagonal().sum().item() / 12)
    assert result.metrics["mean_per_class_recall"] == pytest.approx(sum(result.per_class) / 3)
    assert evaluate(params, progress=False).metrics == first.metrics
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert written["metrics"]["zeroshot_top1"] == result.metrics["zeroshot_top1"]
    assert (tmp_path / "eval" / "eval_confusion.png").is_file()
    assert (tmp_path / "eval" / "eval_per_class.csv").read_text().splitlines()[0] == "class,accuracy,samples"


def test_evaluation_runs_in_the_training_precision(workspace, tmp_path):
    """bf16 training is evaluated in bf16 (on the GPU when there is one): classification and retrieval."""
    fp32 = evaluate(params_in(workspace, tmp_path / "fp32", "eval.templates=simple", "train.precision=fp32"),
                    progress=False)
    params = params_in(workspace, tmp_path, "eval.templates=simple", "train.precision=bf16",
                       f"eval.sets=[{workspace / 'eval'},{workspace / 'captions'}]")
    result = evaluate(params, progress=False)
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert fp32.dtype == "float32" and result.dtype == written["dtype"] == "bfloat16"
    assert written["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert result.sets[0].confusion != [] and result.sets[1].metrics["samples"] == 12


def test_the_classifier_averages_normalized_template_embeddings(workspace, tmp_path):
    """The standard recipe, checked by hand for one class."""
    from open_clip import build_zero_shot_classifier

    from evaclip.model import get_tokenizer

    model = create_model(ModelConfig(name="evaclip-micro")).eval()
    tokenizer = get_tokenizer("evaclip-micro")
    templates = ["a photo of a {}.", "itap of a {}."]
    with torch.no_grad():
        weights = build_zero_shot_classifier(model, tokenizer, ["cat", "dog"], templates)
        each = torch.nn.functional.normalize(model.encode_text(tokenizer([t.format("dog") for t in templates])), dim=-1)
        expected = torch.nn.functional.normalize(each.mean(0), dim=-1)
    torch.testing.assert_close(weights[:, 1], expected)


def test_retrieval_recalls(workspace, tmp_path):
    params = params_in(workspace, tmp_path, f"eval.sets=[{workspace / 'captions'}]")
    metrics = evaluate(params, progress=False).sets[0].metrics
    assert metrics["image_to_text_R@10"] >= metrics["image_to_text_R@5"] >= metrics["image_to_text_R@1"] >= 0
    assert metrics["text_to_image_R@10"] >= metrics["text_to_image_R@1"] and metrics["samples"] == 12


# --- tracking ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def logged(workspace, tmp_path_factory):
    from evaclip.tracking.live import MlflowLogger, open_run

    out = tmp_path_factory.mktemp("logged")
    params = params_in(workspace, out)
    # A training run as the launcher opens it and rank 0 logs into it (here in-process, without DeepSpeed).
    env = open_run(params, "train", out / "train")
    os.environ["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"]
    try:
        rank0 = MlflowLogger(run_id=env["EVACLIP_MLFLOW_RUN_ID"])
        rank0.on_train_start({"steps": 5, "start_step": 0})
        for step in range(1, 6):
            rank0.on_step(step, {"loss": 3.0 - step / 10, "lr/visual": 1e-3, "lr/text": 1e-4})
        rank0.on_train_end({})
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]
    record = log_run(params, evaluate(params, progress=False))
    return params, record


def test_a_pipeline_run_logs_config_tags_stages_artifacts_and_the_model(logged):
    params, record = logged
    client = mlflow.tracking.MlflowClient(record.tracking_uri, registry_uri=record.tracking_uri)
    parent = client.get_run(record.parent_run_id)
    assert parent.data.params["train.optimizer"] == "lamb" and parent.data.params["model.name"] == "evaclip-micro"
    assert {"git_commit", "git_dirty", "version.torch", "version.open_clip_torch", "host", "device"} <= set(parent.data.tags)
    children = client.search_runs([record.experiment_id], f"tags.mlflow.parentRunId = '{record.parent_run_id}'")
    assert sorted(run.info.run_name for run in children) == ["data", "evaluate", "init", "train"]
    train_run = next(r for r in children if r.info.run_name == "train")
    assert [m.step for m in client.get_metric_history(train_run.info.run_id, "loss")] == [1, 2, 3, 4, 5]
    artifacts = [a.path for a in client.list_artifacts(record.eval_run_id, "eval")]
    assert "eval/eval_confusion.png" in artifacts and "eval/eval_per_class.csv" in artifacts
    assert client.get_run(record.eval_run_id).data.metrics["zeroshot_top1"] == record.metrics["zeroshot_top1"]


def test_the_pyfunc_model_embeds_images_and_texts_and_labels_images(logged):
    params, record = logged
    files = {Path(p).name for p in Path(mlflow.artifacts.download_artifacts(record.model_uri)).rglob("*")}
    assert "python_model.pkl" not in files and "pyfunc_model.py" in files  # logged as code: nothing to unpickle
    model = mlflow.pyfunc.load_model(record.model_uri)
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 200, 30)).save(buffer, format="PNG")
    frame = pd.DataFrame({"image": [encode_image(buffer.getvalue()), ""], "text": ["", "a dog"]})
    output = model.predict(frame, params={"classnames": ["cat", "dog"]})
    assert len(output.embedding[0]) == len(output.embedding[1]) == 32
    assert output.label[0] in ("cat", "dog") and 0.5 <= output.score[0] <= 1
    assert model.metadata.signature.params is not None


def test_mlflow_models_serve_answers_invocations(logged):
    params, record = logged
    decision = register_and_promote(params, record)
    port = free_port()
    env = dict(os.environ, MLFLOW_TRACKING_URI=record.tracking_uri, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    server = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{decision.name}@champion",
                               "--env-manager", "local", "-p", str(port), "-h", "127.0.0.1"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", "mlflow models serve", 120)
        buffer = io.BytesIO()
        Image.new("RGB", (32, 32), (200, 10, 30)).save(buffer, format="PNG")
        body = {"dataframe_split": {"columns": ["image", "text"], "data": [[encode_image(buffer.getvalue()), ""]]},
                "params": {"classnames": ["cat", "dog", "sea lion"]}}
        answer = requests.post(f"http://127.0.0.1:{port}/invocations", json=body, timeout=60)
        assert answer.status_code == 200, answer.text
        prediction = answer.json()["predictions"][0]
        assert prediction["label"] in ("cat", "dog", "sea lion") and len(prediction["embedding"]) == 32
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


# --- the promotion rule and the registry -------------------------------------------------------

@pytest.mark.parametrize("candidate, champion, expected", [
    ({"zeroshot_top1": "0.5", "eval_set": "a"}, None, (True, "no champion yet")),
    ({"eval_set": "a"}, {"zeroshot_top1": "0.1", "eval_set": "a"}, (False, "no zeroshot_top1 recorded")),
    ({"zeroshot_top1": "0.9", "eval_set": "b"}, {"zeroshot_top1": "0.1", "eval_set": "a"}, (False, "evaluated on b")),
    ({"zeroshot_top1": "0.505", "eval_set": "a"}, {"zeroshot_top1": "0.5", "eval_set": "a"}, (False, "does not beat")),
    ({"zeroshot_top1": "0.52", "eval_set": "a"}, {"zeroshot_top1": "0.5", "eval_set": "a"}, (True, "beats")),
    ({"image_to_text_R_at_1": "0.9", "eval_set": "a"}, None, (True, "no champion yet")),  # sanitized names
    # Another evaluation set: compared only where both were evaluated on the same content.
    ({"zeroshot_top1": "0.6", "eval_set": "a", "eval_set.b": "b:1", "b_zeroshot_top1": "0.1"},
     {"zeroshot_top1": "0.5", "eval_set": "a", "eval_set.b": "b:1", "b_zeroshot_top1": "0.5"}, (False, "loses 0.4000")),
    ({"zeroshot_top1": "0.6", "eval_set": "a", "eval_set.b": "b:2", "b_zeroshot_top1": "0.1"},
     {"zeroshot_top1": "0.5", "eval_set": "a", "eval_set.b": "b:1", "b_zeroshot_top1": "0.5"}, (True, "beats")),
])
def test_promotion_rule(candidate, champion, expected):
    metric = "image_to_text_R@1" if "image_to_text_R_at_1" in candidate else "zeroshot_top1"
    promote, reason = decide(candidate, champion, metric, margin=0.01, guard_metrics=("zeroshot_top1",),
                             guard_margin=0.02)
    assert promote == expected[0] and expected[1] in reason


def fake_record(params, top1: float, eval_set: str = "eval-a", others: dict | None = None) -> TrackingRecord:
    """A real logged model (a minimal pyfunc) with the metrics a pipeline run would record;
    `others`: {set name: its zeroshot_top1} of further evaluation sets."""
    from evaclip.tracking.store import connect, experiment_id

    client = connect(params)
    mlflow.set_experiment(experiment_id=experiment_id(client, params))
    metrics = {"zeroshot_top1": top1, **{f"{name}/zeroshot_top1": v for name, v in (others or {}).items()}}
    with mlflow.start_run() as run:
        mlflow.log_metrics({k.replace("/", "_"): v for k, v in metrics.items()})
        info = mlflow.pyfunc.log_model(name="model", python_model=_Constant(), pip_requirements=[])
    return TrackingRecord(mlflow.get_tracking_uri(), run.info.experiment_id, run.info.run_id, run.info.run_id,
                          info.model_uri, metrics, eval_set, None, None, {name: f"{name}:fp" for name in others or {}})


class _Constant(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return model_input


def test_champion_moves_only_to_a_better_model_and_promotion_is_idempotent(workspace, tmp_path):
    params = params_in(workspace, tmp_path, "tracking.promotion_margin=0.01")
    client = _client(tmp_path)
    first = register_and_promote(params, fake_record(params, 0.50))
    assert first.promoted and first.champion == first.version
    worse = register_and_promote(params, fake_record(params, 0.505))
    assert not worse.promoted and worse.champion == first.version and "does not beat" in worse.reason
    name = registered_name(params)
    tags = client.get_model_version(name, worse.version).tags
    assert tags["promotion_decision"] == "rejected" and str(client.get_model_version_by_alias(name, "challenger").version) == worse.version
    other_set = register_and_promote(params, fake_record(params, 0.99, eval_set="eval-b"))
    assert not other_set.promoted and "evaluated on eval-b" in other_set.reason
    better_record = fake_record(params, 0.60)
    better = register_and_promote(params, better_record)
    assert better.promoted and better.champion == better.version
    again = register_and_promote(params, better_record)
    assert again.version == better.version and again.promoted and again.reason == "already the champion"
    assert client.get_run(better_record.eval_run_id).data.tags["promotion_decision"] == "promoted"


def _client(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    return mlflow.tracking.MlflowClient(uri, registry_uri=uri)


def _promote_in_process(args):
    workspace, out, top1 = args
    params = params_in(Path(workspace), Path(out))
    return register_and_promote(params, fake_record(params, top1)).version


def test_two_pipelines_finishing_at_once_never_leave_the_worse_model_champion(workspace, tmp_path):
    params = params_in(workspace, tmp_path)
    register_and_promote(params, fake_record(params, 0.30))
    with ProcessPoolExecutor(2) as pool:
        versions = list(pool.map(_promote_in_process, [(workspace, tmp_path, 0.40), (workspace, tmp_path, 0.70)]))
    client = _client(tmp_path)
    champion = client.get_model_version_by_alias(registered_name(params), "champion")
    assert str(champion.version) == versions[1] and champion.tags["zeroshot_top1"] == "0.7"
    assert [m.name for m in client.search_registered_models()] == [registered_name(params)]  # lock released


def test_a_gain_that_costs_another_evaluation_set_is_not_promoted(workspace, tmp_path):
    params = params_in(workspace, tmp_path, "tracking.guard_margin=0.05")
    first = register_and_promote(params, fake_record(params, 0.50, others={"cifar": 0.40, "pets": 0.30}))
    assert first.promoted
    # Gains 0.1 on the promotion set but loses 0.08 on pets: refused, and the reason names pets.
    costly = register_and_promote(params, fake_record(params, 0.60, others={"cifar": 0.45, "pets": 0.22}))
    assert not costly.promoted and costly.champion == first.version
    assert "loses 0.0800 on pets_zeroshot_top1" in costly.reason and "guard_margin 0.05" in costly.reason
    tags = _client(tmp_path).get_model_version(registered_name(params), costly.version).tags
    assert tags["promotion_decision"] == "rejected" and "pets_zeroshot_top1" in tags["promotion_reason"]
    assert tags["promotion_compared_with"] == first.version
    # Within the margin everywhere: promoted, and the reason lists what was compared.
    fine = register_and_promote(params, fake_record(params, 0.60, others={"cifar": 0.37, "pets": 0.29}))
    assert fine.promoted and "cifar_zeroshot_top1, pets_zeroshot_top1" in fine.reason


def test_an_unreachable_server_gets_retries_then_a_clear_error(workspace, tmp_path):
    params = params_in(workspace, tmp_path, f"tracking.uri=http://127.0.0.1:{free_port()}", "tracking.retries=1")
    with pytest.raises(TrackingUnavailableError, match=r"unreachable after 2 attempts \(ConnectionError\); nothing was logged or promoted"):
        register_and_promote(params, TrackingRecord("", "", "", "", "", {"zeroshot_top1": 1.0}, "x", None))
    (tmp_path / "eval").mkdir(exist_ok=True)
    (tmp_path / "eval" / "tracking.json").write_text(json.dumps(
        {"tracking_uri": "", "experiment_id": "", "parent_run_id": "", "eval_run_id": "", "model_uri": "",
         "metrics": {}, "eval_set": "x", "data_version": None}))
    result = CliRunner().invoke(app, ["promote", "-p", str(REPO / "params.yaml"), "-s", "tracking.retries=0",
                                      "-s", f"tracking.uri=http://127.0.0.1:{free_port()}",
                                      "-s", f"eval.output_dir={tmp_path / 'eval'}"])
    assert result.exit_code == 6 and "unreachable" in result.output


def test_a_tie_is_not_an_improvement():
    assert decide({"zeroshot_top1": "0.5", "eval_set": "a"}, {"zeroshot_top1": "0.5", "eval_set": "a"},
                  "zeroshot_top1", margin=0.0)[0] is False


def test_evaluation_batches_come_in_order_and_a_bad_image_stops_them():
    """The evaluation's batches are made in a background thread: every sample, in order, then the end; an
    error while reading (a corrupt image) reaches the caller instead of ending the evaluation early."""
    from evaclip.eval import _batches

    def samples(fail_at=None):
        for index in range(10):
            if index == fail_at:
                raise OSError(f"image {index} is truncated")
            yield torch.full((1,), float(index)), index

    batches = list(_batches(samples(), lambda image: image, batch_size=4))
    assert [targets for _, targets in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert torch.equal(torch.cat([images for images, _ in batches]).flatten(), torch.arange(10.0))
    with pytest.raises(OSError, match="image 6 is truncated"):
        list(_batches(samples(fail_at=6), lambda image: image, batch_size=4))


def test_evaluation_batches_normalize_once_per_batch_with_the_same_values():
    """open_clip's to-tensor + normalize run once per batch instead of per image: bit for bit the batch that
    the per-image transform gives, RGB and grayscale images alike."""
    import numpy as np
    from PIL import Image

    from evaclip.eval import _plain_batches, _split_tensor_tail
    from evaclip.model import create_transforms

    _, preprocess = create_transforms("evaclip-demo")
    per_image, _ = _split_tensor_tail(preprocess)
    assert per_image is not preprocess  # the tail is split off
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)) for _ in range(5)]
    images += [Image.fromarray(rng.integers(0, 256, (40, 36), dtype=np.uint8), mode="L") for _ in range(3)]
    batches = list(_plain_batches(((image, index) for index, image in enumerate(images)), preprocess, batch_size=3))
    assert [targets for _, targets in batches] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert torch.equal(torch.cat([batch for batch, _ in batches]), torch.stack([preprocess(i) for i in images]))
