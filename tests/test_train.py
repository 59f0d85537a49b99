"""Training: LAMB, parameter groups and schedule; ZeRO-1 LAMB equivalence; crash-safe resume; bad states.

The multi-process tests run real DeepSpeed with 2 CPU processes over gloo, launched by torchrun.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import psutil
import pytest
import torch
from safetensors.torch import load_file, save_file
from timm.optim import Lamb as TimmLamb
from typer.testing import CliRunner

from evaclip.cli import app
from evaclip.config import ModelConfig, TrainConfig, load_params
from evaclip.data import prepare
from evaclip.errors import ConfigError
from evaclip.model import create_model
from evaclip.optim import Lamb, lr_multiplier, param_groups
from evaclip.precision import resolve_precision
from evaclip.train import check_runnable
from evaclip.train.ds_config import deepspeed_config

from .conftest import REPO
from .test_data import image_folder, png

BIN = Path(sys.executable).parent
HERE = Path(__file__).resolve().parent


# --- the optimizer, its groups and schedule ----------------------------------------------------------

def test_lamb_is_timms_lamb_on_whole_tensors():
    torch.manual_seed(0)
    # A matrix, a vector, a zero tensor (trust ratio 1), a channels-last kernel: the fused kernel walks memory.
    ours_params = [torch.randn(5, 3), torch.randn(7), torch.zeros(4),
                   torch.randn(4, 3, 2, 2).to(memory_format=torch.channels_last)]
    ours_params = [p.requires_grad_(True) for p in ours_params]
    timm_params = [p.detach().clone().requires_grad_(True) for p in ours_params]
    groups = lambda ps: [{"params": ps[:2] + ps[3:], "weight_decay": 0.05}, {"params": ps[2:3], "weight_decay": 0.0}]  # noqa: E731
    ours = Lamb(groups(ours_params), lr=1e-2, betas=(0.9, 0.98), eps=1e-6)
    theirs = TimmLamb(groups(timm_params), lr=1e-2, betas=(0.9, 0.98), eps=1e-6, max_grad_norm=None)
    for _ in range(5):
        for p, q in zip(ours_params, timm_params, strict=True):
            p.grad = torch.randn(p.shape[::-1]).permute(*reversed(range(p.ndim)))  # gradients of another layout
            q.grad = p.grad.clone()
        ours.step()
        theirs.step()
    # Float32 rounding (the fused kernel rounds in another order); one step of this learning rate moves
    # parameters by about 1e-2.
    for p, q in zip(ours_params, timm_params, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)


def test_param_groups_split_towers_layers_and_decay():
    model = create_model(ModelConfig())
    cfg = TrainConfig(steps=10, batch_size=2, lr=5e-4, visual_lr=2e-4, text_lr=2e-5, weight_decay=0.05,
                      visual_layer_decay=0.75, text_layer_decay=0.5)
    groups = param_groups(model, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    placed = [names[id(p)] for g in groups for p in g["params"]]
    assert sorted(placed) == sorted(names.values())  # every parameter exactly once
    by_param = {names[id(p)]: g for g in groups for p in g["params"]}
    for no_decay in ("logit_scale", "visual.trunk.cls_token", "visual.trunk.pos_embed", "text.positional_embedding",
                     "text.token_embedding.weight", "visual.trunk.blocks.0.norm1.weight",
                     "visual.trunk.blocks.0.attn.q_proj.bias", "text.ln_final.weight"):
        assert by_param[no_decay]["weight_decay"] == 0.0, no_decay
    assert by_param["visual.trunk.blocks.0.attn.q_proj.weight"]["weight_decay"] == 0.05
    # Layer decay: the demo tower has 6 blocks, the text tower 4 layers.
    assert by_param["visual.trunk.head.weight"]["lr"] == pytest.approx(2e-4)
    assert by_param["visual.trunk.blocks.5.mlp.fc2.weight"]["lr"] == pytest.approx(2e-4 * 0.75)
    assert by_param["visual.trunk.patch_embed.proj.weight"]["lr"] == pytest.approx(2e-4 * 0.75**7)
    assert by_param["text.transformer.resblocks.0.mlp.c_fc.weight"]["lr"] == pytest.approx(2e-5 * 0.5**4)
    assert by_param["logit_scale"]["lr"] == pytest.approx(5e-4)


def test_schedule_warms_up_then_decays_to_zero_by_cosine():
    factor = lr_multiplier(TrainConfig(steps=100, batch_size=1, warmup_steps=10))
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(55) == pytest.approx(0.5, abs=1e-9)
    assert factor(100) == pytest.approx(0.0, abs=1e-12)


def test_auto_precision_is_bf16_only_where_the_hardware_computes_in_it(monkeypatch):
    import evaclip.precision as precision

    assert [resolve_precision(p) for p in ("fp32", "bf16", "fp16")] == ["fp32", "bf16", "fp16"]
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    for native, on_cpu, on_gpu in ((True, "bf16", "bf16"), (False, "fp32", "fp16")):
        monkeypatch.setattr(precision, "native_bf16", lambda device, native=native: native)
        assert (resolve_precision("auto", cpu), resolve_precision("auto", gpu)) == (on_cpu, on_gpu)
        ds = deepspeed_config(TrainConfig(steps=1, batch_size=1, precision="auto"))
        assert ("bf16" in ds, "fp16" in ds) == (native, False)  # no GPU here: auto is bf16 or fp32
    monkeypatch.undo()
    # This machine's answer agrees with oneDNN's own check (False on the AVX2 EPYC the demo ran 9x slower on).
    assert resolve_precision("auto", cpu) == ("bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32")


def test_fp16_uses_eva_clips_dynamic_loss_scaling():
    cfg = TrainConfig(steps=10, batch_size=4, devices=8, precision="fp16", zero_stage=1, grad_accum_steps=2)
    ds = deepspeed_config(cfg)
    assert ds["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                          "hysteresis": 2, "min_loss_scale": 1}
    assert ds["train_batch_size"] == 64 and ds["zero_optimization"]["stage"] == 1
    assert ds["gradient_clipping"] == 5.0


# --- ZeRO-1 keeps LAMB's per-tensor trust ratios -----------------------------------------------------

def _zero_lamb_run(tmp_path, stage, optimizer, steps):
    out = tmp_path / f"zero{stage}_{optimizer}_{steps}.pt"
    _torchrun([str(HERE / "distributed" / "zero_lamb.py"), str(stage), optimizer, str(out), "1.0", str(steps)])
    return torch.load(out)


def _max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_zero1_lamb_equals_zero0_lamb_and_a_stock_lamb_does_not(tmp_path):
    # Four steps: rounding differences grow through Adam's normalization (after one step they are float32
    # rounding, under 1e-6), but stay three orders of magnitude under the stock LAMB's deviation (one trust
    # ratio per rank's flat slice).
    zero0 = _zero_lamb_run(tmp_path, 0, "lamb", 4)
    ours = _max_diff(zero0, _zero_lamb_run(tmp_path, 1, "lamb", 4))
    stock = _max_diff(zero0, _zero_lamb_run(tmp_path, 1, "timm_lamb", 4))
    assert ours < 5e-5, ours
    assert stock > 1e-2, stock
    assert stock > 1000 * ours


def _torchrun(args, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


# --- `evaclip train`: checkpoints, crash-safe resume, bad states ----------------------------------

@pytest.fixture(scope="module")
def micro_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-data")
    src = root / "src"
    src.mkdir()
    for i in range(256):
        (src / f"{i:04d}.png").write_bytes(png((i, 255 - i, (7 * i) % 255), size=(32, 32)))
        (src / f"{i:04d}.txt").write_text(f"a square of color number {i % 10}")
    overrides = [f"data.output_dir={root / 'data'}", "data.source=pairs", f"data.path={src}", "data.version=false",
                 "data.samples_per_shard=32"]
    prepare(load_params(REPO / "params.yaml", overrides))
    image_folder(root / "data" / "eval-folder", per_class=2)
    return root / "data"


def _train_overrides(data_dir, out, **extra):
    values = {
        "model.name": "evaclip-micro", "model.token_masking": 0.5, "data.output_dir": data_dir, "data.workers": 0,
        "data.shuffle_buffer": 64, "init.output_dir": out / "no-init", "train.output_dir": out,
        "train.batch_size": 16, "train.steps": 24, "train.warmup_steps": 4, "train.checkpoint_every": 4,
        "train.keep_checkpoints": 2, "train.log_every": 1, "train.lr": 2e-3, "train.unmasked_tuning_steps": 3,
        "tracking.default_store": out.parent / "mlflow", **extra,
    }
    return [item for key, value in values.items() for item in ("-s", f"{key}={value}")]


def _evaclip_train(args, extra_env=None, **popen):
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", OMP_NUM_THREADS="1", **(extra_env or {}))
    return subprocess.Popen([str(BIN / "evaclip"), "train", "-p", str(REPO / "params.yaml"), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def _wait_for(condition, polls: int = 45000) -> None:
    """Poll `condition` every 20 ms (a bound on polls, not a deadline the test measures)."""
    for _ in range(polls):
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError("condition never held")


def test_sigterm_then_sigkill_mid_training_then_resume_ends_with_the_same_weights(micro_data, tmp_path):
    straight = tmp_path / "straight"
    periodic = {"eval.every_n_steps": 12, "eval.sets": f"[{micro_data / 'eval-folder'}]", "eval.every_n_steps_samples": 3}
    # As in a fresh environment: an empty extension cache, where torch would compile any op DeepSpeed builds.
    extensions = tmp_path / "torch_extensions"
    process = _evaclip_train(_train_overrides(micro_data, straight, **periodic),
                             extra_env={"TORCH_EXTENSIONS_DIR": str(extensions)})
    output = process.communicate(timeout=900)[0]
    assert process.returncode == 0, output[-4000:]
    # No op compiled or loaded: DeepSpeed's shared-memory op (inference all-reduce only) took ~60 s here.
    assert not extensions.exists() or not any(extensions.iterdir()), list(extensions.rglob("*"))[:5]
    assert "deepspeed_shm_comm" not in output
    expected = load_file(str(straight / "model.safetensors"))
    assert sorted(p.name for p in straight.glob("step_*")) == ["step_0000020", "step_0000024"]  # the last 2 kept
    metrics = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 25)) and metrics[-1]["lr/visual"] == pytest.approx(0.0)
    assert [m["token_masking"] for m in metrics[-4:]] == [0.5, 0.0, 0.0, 0.0]  # FLIP's unmasked tuning
    assert [m["step"] for m in metrics if "eval_zeroshot_top1" in m] == [12, 24]  # evaluation during training
    assert {m["eval_samples"] for m in metrics if "eval_samples" in m} == {3}  # on the set's first 3 images

    # SIGTERM to the launcher's process group, as Prefect sends on a cancelled flow run: every rank saves the
    # step it reached, and everything exits with 128 + 15; the MLflow run is KILLED.
    crashed = tmp_path / "crashed"
    process = _evaclip_train(_train_overrides(micro_data, crashed), start_new_session=True)
    _wait_for(lambda: (crashed / "metrics.jsonl").is_file() and len((crashed / "metrics.jsonl").read_text().split()) >= 2
              or process.poll() is not None)
    processes = psutil.Process(process.pid).children(recursive=True)  # torchrun and the ranks, in sessions of their own
    commands = [" ".join(p.cmdline()) for p in processes]
    os.killpg(process.pid, signal.SIGTERM)
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 143 and "stopped by SIGTERM" in output, output[-3000:]
    assert sum("evaclip.train.worker" in c and "torch.distributed.run" not in c for c in commands) == 2, commands
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in processes)
    stopped_at = json.loads((crashed / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    assert (crashed / "latest").read_text().strip() == f"step_{stopped_at:07d}" and stopped_at < 24  # this step saved
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}")
    run_id = json.loads((crashed / "mlflow_run.json").read_text())["run_id"]
    assert client.get_run(run_id).info.status == "KILLED"

    # It resumes from there; then SIGKILL torchrun and both ranks at once, mid-training, after its next checkpoint.
    process = _evaclip_train(_train_overrides(micro_data, crashed))
    _wait_for(lambda: (crashed / "latest").read_text().strip() != f"step_{stopped_at:07d}" or process.poll() is not None)
    # `evaclip train` (the launcher) outlives them.
    for victim in psutil.Process(process.pid).children(recursive=True):
        victim.send_signal(signal.SIGKILL)
    output = process.communicate()[0]
    assert process.returncode != 0, output[-3000:]
    killed_at = (crashed / "latest").read_text().strip()
    assert killed_at != "step_0000024" and not (crashed / "model.safetensors").exists(), "the run ended before the kill"

    # MLflow saw the run as it went: FAILED, with every step up to the last checkpoint (flushed there) logged.
    assert json.loads((crashed / "mlflow_run.json").read_text())["run_id"] == run_id
    assert client.get_run(run_id).info.status == "FAILED"
    logged = [m.step for m in client.get_metric_history(run_id, "loss")]
    assert set(range(1, int(killed_at.split("_")[1]) + 1)) <= set(logged)

    process = _evaclip_train(_train_overrides(micro_data, crashed))
    output = process.communicate(timeout=900)[0]
    assert process.returncode == 0, output[-4000:]
    assert json.loads((crashed / "mlflow_run.json").read_text())["run_id"] == run_id  # the resume continues it
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and max(m.step for m in client.get_metric_history(run_id, "loss")) == 24
    checkpoints = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'")
    assert {m.params["step"] for m in checkpoints} >= {"24"}
    resumed = load_file(str(crashed / "model.safetensors"))
    for key, value in expected.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=1e-6, msg=key)
    steps = [json.loads(line)["step"] for line in (crashed / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 25))  # resumed at the checkpoint, each step logged once


def test_non_finite_losses_stop_the_run_and_keep_the_last_good_checkpoint(micro_data, tmp_path):
    out = tmp_path / "nan"
    process = _evaclip_train(_train_overrides(micro_data, out, **{"train.steps": 4}))
    assert process.wait(timeout=900) == 0
    good = sorted(p.name for p in out.glob("step_*"))
    latest = (out / "latest").read_text()

    poisoned = tmp_path / "nan-init.safetensors"
    state = create_model(ModelConfig(name="evaclip-micro")).state_dict()
    state["logit_scale"] = torch.tensor(float("nan"))
    save_file({k: v.contiguous() for k, v in state.items()}, str(poisoned))
    process = _evaclip_train(_train_overrides(micro_data, out, **{
        "train.steps": 8, "train.resume": "false", "train.init_checkpoint": poisoned, "train.max_nonfinite_steps": 2,
    }))
    output = process.communicate(timeout=900)[0]
    assert process.returncode == 5, output[-3000:]  # the worker's error code reaches the user
    assert "3 consecutive non-finite losses at step 0 (train.max_nonfinite_steps=2)" in output
    assert sorted(p.name for p in out.glob("step_*")) == good and (out / "latest").read_text() == latest

    # Resuming those checkpoints with another recipe would mix two runs: refused, naming what changed.
    process = _evaclip_train(_train_overrides(micro_data, out, **{"train.steps": 4, "train.lr": 0.5}))
    output = process.communicate(timeout=900)[0]
    assert process.returncode != 0 and "was written by a different configuration (train.lr changed)" in output
    assert sorted(p.name for p in out.glob("step_*")) == good

    # dvc.yaml's stage (train.resume: if_same) reruns because something changed: it starts over instead.
    first_model = (out / "model.safetensors").read_bytes()
    process = _evaclip_train(_train_overrides(micro_data, out, **{"train.steps": 4, "train.lr": 0.5,
                                                                    "train.resume": "if_same"}))
    output = process.communicate(timeout=900)[0]
    assert process.returncode == 0, output[-3000:]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4] and (out / "model.safetensors").read_bytes() != first_model  # trained anew


def _two_nodes(micro_data, out, launcher: str, steps: int, disks: tuple[Path, Path] | None = None,
               **extra) -> None:
    """Two launchers of one process each, meeting on 127.0.0.1 (as two pods of a PyTorchJob would); `disks`:
    each node's own train.output_dir (no shared filesystem), else both use `out`."""
    from deploy.stack import free_port

    endpoint = f"127.0.0.1:{free_port()}"
    nodes = []
    for rank in (1, 0):  # node 1 may come first
        overrides = _train_overrides(micro_data, disks[rank] if disks else out, **{
            "train.steps": steps, "train.devices": 1, "train.nodes": 2, "train.launcher": launcher,
            "train.rdzv_endpoint": endpoint, **extra})
        nodes.append(_evaclip_train([*overrides, "--node-rank", str(rank)]))
    outputs = [node.communicate(timeout=900)[0] for node in nodes]
    for node, output in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, output[-4000:]


@pytest.fixture(scope="module")
def reference(micro_data, tmp_path_factory):
    """One node of two processes, 8 steps, checkpoints at steps 4 and 8: what the several-node, object-storage
    and resize tests compare with (their own MLflow store beside it: `tracking.default_store`)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    process = _evaclip_train(_train_overrides(micro_data, out, **{"train.steps": 8}))
    output = process.communicate(timeout=900)[0]
    assert process.returncode == 0, output[-4000:]
    return out


def test_two_nodes_train_like_one_node_with_two_processes(micro_data, reference, tmp_path):
    steps = 8
    expected = load_file(str(reference / "model.safetensors"))

    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}")
    for launcher in ("torchrun", "deepspeed"):  # c10d rendezvous; DeepSpeed's launcher without ssh
        out = tmp_path / launcher
        _two_nodes(micro_data, out, launcher, steps)
        weights = load_file(str(out / "model.safetensors"))
        assert weights.keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(weights[key], value, rtol=0, atol=1e-6, msg=f"{launcher}: {key}")
        # One MLflow run, opened by node 0's launcher, logged by rank 0 wherever the rendezvous put it.
        run_id = json.loads((out / "mlflow_run.json").read_text())["run_id"]
        assert client.get_run(run_id).info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run_id, "loss")] == list(range(1, steps + 1))
    experiment = client.get_run(run_id).info.experiment_id
    assert len(client.search_runs([experiment])) == 2  # one per training, none from node 1


def test_checkpoints_on_object_storage_need_no_shared_filesystem(micro_data, reference, tmp_path, monkeypatch):
    """Nodes with empty, separate disks resume from S3, and every rank's ZeRO partition reaches it."""
    from evaclip.data.storage import filesystem
    from evaclip.train import checkpoints

    from .test_streaming import S3Server

    (tmp_path / "s3" / "bucket").mkdir(parents=True)
    server = S3Server(tmp_path / "s3", watch_folder=False)
    server.start()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.port}")
    try:
        # Preempted at step 4: the store holds that checkpoint (as its ranks uploaded it) and names it latest.
        uri = "s3://bucket/runs/one"
        store, base = filesystem(uri)
        for file in (reference / "step_0000004").iterdir():
            store.put_file(str(file), f"{base}/step_0000004/{file.name}")
        store.pipe_file(f"{base}/latest", b"step_0000004\n")
        # Two new nodes, disks empty and separate: each downloads every rank's files, finalizes its own folder
        # and uploads what its own ranks wrote.
        disks = (tmp_path / "node0", tmp_path / "node1")
        _two_nodes(micro_data, None, "torchrun", 8, disks, **{
            "train.checkpoint_uri": uri, "tracking.default_store": reference.parent / "mlflow"})
        (fresh,) = [disk for disk in disks if (disk / "model.safetensors").is_file()]  # where rank 0 ran
        steps = [json.loads(line)["step"] for line in (fresh / "metrics.jsonl").read_text().splitlines()]
        assert steps == [5, 6, 7, 8]  # resumed at step 4
        expected, resumed = load_file(str(reference / "model.safetensors")), load_file(str(fresh / "model.safetensors"))
        for key, value in expected.items():
            torch.testing.assert_close(resumed[key], value, rtol=0, atol=1e-6, msg=key)
        remote = tmp_path / "s3" / "bucket" / "runs" / "one"
        assert (remote / "latest").read_text().strip() == "step_0000008"
        assert sorted(p.name for p in remote.glob("step_*")) == ["step_0000004", "step_0000008"]  # keep 2
        local_files = sorted(p.name for p in (reference / "step_0000008").iterdir())
        assert sum("zero_pp_rank_" in name for name in local_files) == 2  # both ranks' optimizer partitions
        assert sorted(p.name for p in (remote / "step_0000008").iterdir()) == local_files  # from both disks
        for disk in disks:
            assert (disk / "latest").read_text().strip() == "step_0000008" and not list(disk.glob(".tmp-*"))
        handed = tmp_path / "handed"  # what a TrainJob's submitter fetches for evaluation
        checkpoints.fetch_outputs(uri, handed)
        assert (handed / "model.safetensors").read_bytes() == (fresh / "model.safetensors").read_bytes()
        assert (handed / "metrics.jsonl").read_text() == (fresh / "metrics.jsonl").read_text()

        server.stop()  # an unreachable store: a clear error before any process starts
        process = _evaclip_train(_train_overrides(micro_data, tmp_path / "down", **{"train.steps": 8,
                                                                                      "train.checkpoint_uri": uri}))
        output = process.communicate(timeout=900)[0]
        assert process.returncode != 0 and f"train.checkpoint_uri: cannot read {uri}/latest" in output, output[-3000:]
    finally:
        if server.process.poll() is None:
            server.stop()


def test_checkpoint_files_belong_to_the_rank_that_wrote_them():
    from evaclip.train.checkpoints import _owner

    assert [_owner(name) for name in ("zero_pp_rank_3_mp_rank_00_optim_states.pt",
                                      "bf16_zero_pp_rank_5_mp_rank_00_optim_states.pt", "rng_rank2.pt",
                                      "rank7_state.json", "mp_rank_00_model_states.pt", "trainer_state.json")] == [
        3, 5, 2, 7, 0, 0]


def test_a_recipe_recorded_before_elastic_resume_still_matches():
    """Checkpoints recorded devices and batch size in their recipe: what matters now is the global batch."""
    from evaclip.train.recipe import recipe_changes

    current = {"model.name": "m", "train.lr": "0.001", "train.global_batch_size": "32"}
    older = {"model.name": "m", "train.lr": "0.001", "train.devices": "2", "train.nodes": "1",
             "train.batch_size": "16", "train.grad_accum_steps": "1", "train.log_every": "5"}
    assert recipe_changes(older, current) == []
    assert recipe_changes({**older, "train.batch_size": "8"}, current) == ["train.global_batch_size"]
    assert recipe_changes({**older, "train.lr": "0.5"}, current) == ["train.lr"]


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_a_run_resumes_on_another_number_of_processes(micro_data, reference, tmp_path, before, after):
    """The optimizer partitions of `before` ranks, re-partitioned for `after` (DeepSpeed's universal format)."""
    import shutil

    global_batch, steps = 32, 8
    store = reference.parent / "mlflow"  # the resumed run continues its reference's MLflow run
    if before != 2:  # the shared reference is two processes of 16
        reference, store = tmp_path / "reference", tmp_path / "mlflow"
    shape = lambda n: {"train.steps": steps, "train.devices": n, "train.batch_size": global_batch // n,  # noqa: E731
                       "tracking.default_store": store}
    if before != 2:
        process = _evaclip_train(_train_overrides(micro_data, reference, **shape(before)))
        output = process.communicate(timeout=900)[0]
        assert process.returncode == 0, output[-4000:]
    expected = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]

    resized = tmp_path / "resized"  # the run as it stood at step 4, as if preempted there
    shutil.copytree(reference, resized, ignore=shutil.ignore_patterns("step_0000008", "model.safetensors"))
    (resized / "latest").write_text("step_0000004\n")
    if after == 1:  # another global batch would be another run: refused, naming it
        process = _evaclip_train(_train_overrides(micro_data, resized, **{**shape(after), "train.batch_size": 16}))
        output = process.communicate(timeout=900)[0]
        assert process.returncode != 0 and "(train.global_batch_size changed)" in output, output[-3000:]
    process = _evaclip_train(_train_overrides(micro_data, resized, **shape(after)))
    output = process.communicate(timeout=900)[0]
    assert process.returncode == 0, output[-4000:]
    resumed = [json.loads(line) for line in (resized / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in resumed] == list(range(1, steps + 1))
    assert resumed[:4] == expected[:4]  # kept from before the resize
    assert [m["lr/visual"] for m in resumed[4:]] == pytest.approx([m["lr/visual"] for m in expected[4:]])
    # The loss goes on from where it was (a fresh start would sit near ln(32) = 3.47 again).
    first, at_resize = expected[0]["loss"], expected[4]["loss"]
    assert first - at_resize > 0.2, [m["loss"] for m in expected]
    assert abs(resumed[4]["loss"] - at_resize) < (first - at_resize) / 2, (resumed[4]["loss"], at_resize, first)
    weights = load_file(str(resized / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())


@pytest.mark.parametrize("override, message", [
    ("train.precision=fp16", "train.precision: fp16 needs GPUs"),
    ("train.warmup_steps=500", r"train.warmup_steps: 500 exceeds train.steps \(300\)"),
    ("train.init_checkpoint=/nowhere/model.safetensors", "train.init_checkpoint: /nowhere/model.safetensors not found"),
    ("data.output_dir=/nowhere", r"data: no prepared shards in /nowhere/train \(run `evaclip prepare`"),
    ("data.samples_per_epoch=100", "data.samples_per_epoch: 100 is smaller than one global batch"),
    ("train.nodes=2", "train.rdzv_endpoint: 2 nodes need node 0's HOST:PORT"),
    ("train.rdzv_endpoint=nohost", "train.rdzv_endpoint: 'nohost' is not HOST:PORT"),
    ("train.launcher=trainjob", None),  # on the cluster's GPUs: this machine's hardware is not checked
])
def test_a_config_that_cannot_run_fails_before_launch(micro_data, override, message):
    overrides = [f"data.output_dir={micro_data}", override]
    if message is None:
        check_runnable(load_params(REPO / "params.yaml", [*overrides, "train.precision=fp16", "train.nodes=8"]))
        return
    with pytest.raises(ConfigError, match=message):
        check_runnable(load_params(REPO / "params.yaml", overrides))


def test_cli_train_exits_2_naming_the_key(tmp_path):
    result = CliRunner().invoke(app, ["train", "-p", str(REPO / "params.yaml"), "-s", "model.token_masking=1.5"])
    assert result.exit_code == 2 and "model.token_masking" in result.output


def test_deepspeed_launcher_and_bf16_on_cpu(micro_data, tmp_path):
    out = tmp_path / "bf16"
    hot = tmp_path / "hot-init.safetensors"  # a temperature past open_clip's bound (ln 100)
    state = create_model(ModelConfig(name="evaclip-micro")).state_dict()
    state["logit_scale"] = torch.tensor(math.log(400.0))
    save_file({k: v.contiguous() for k, v in state.items()}, str(hot))
    process = _evaclip_train(_train_overrides(micro_data, out, **{
        "train.steps": 4, "train.launcher": "deepspeed", "train.precision": "bf16", "train.unmasked_tuning_steps": 0,
        "train.init_checkpoint": hot,
    }))
    output = process.communicate(timeout=900)[0]
    assert process.returncode == 0, output[-4000:]
    weights = load_file(str(out / "model.safetensors"))
    # Clamped after each step, as open_clip does (the saved value; bf16 rounds ln 100 down a little).
    assert weights["logit_scale"].float().item() <= math.log(100.0) + 1e-6
    assert weights["visual.trunk.blocks.0.attn.q_proj.weight"].dtype == torch.bfloat16
    assert all(torch.isfinite(v.float()).all() for v in weights.values())

    # SIGTERM to the launcher's group under DeepSpeed's launcher too (its runner does not pass a signal on; the
    # launcher signals the whole group): the step reached is saved, exit 143, no process left.
    stopped = tmp_path / "stopped"
    process = _evaclip_train(_train_overrides(micro_data, stopped, **{"train.launcher": "deepspeed"}),
                             start_new_session=True)
    _wait_for(lambda: len(_lines(stopped / "metrics.jsonl")) >= 2 or process.poll() is not None)
    processes = psutil.Process(process.pid).children(recursive=True)
    os.killpg(process.pid, signal.SIGTERM)
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 143 and "stopped by SIGTERM" in output, output[-3000:]
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in processes)
    step = json.loads(_lines(stopped / "metrics.jsonl")[-1])["step"]
    assert (stopped / "latest").read_text().strip() == f"step_{step:07d}" and step < 24


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.is_file() else []


def test_progress_in_a_log_is_one_plain_line_per_logged_step(capsys):
    from evaclip.train import ProgressBar

    bar = ProgressBar(every=2, interactive=False)
    bar.on_train_start({"steps": 4, "start_step": 0})
    for step in (2, 4):
        bar.on_step(step, {"loss": 1.5, "lr/visual": 1e-3, "samples_per_s": 100.0})
    bar.on_train_end({})
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" loss")[0] for line in lines] == ["train step 2/4", "train step 4/4"]
    assert "samples/s 100.0" in lines[0] and lines[1].endswith("eta 0s")
