"""`evaclip train`: check that the run can work, then start one process per device.

One GPU, many GPUs or CPU processes: `torchrun --nproc_per_node train.devices` (or DeepSpeed's
launcher). Several nodes (`train.nodes`): every node runs `evaclip train --node-rank R` and meets the
others at `train.rdzv_endpoint` (torchrun's c10d rendezvous, or DeepSpeed's launcher in its --no_ssh
mode); or node 0 alone starts them all through DeepSpeed's launcher and a hostfile (pdsh/ssh).
Only node 0's launcher opens and closes the MLflow run.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import torch
import yaml

from ..checkpoint import atomic_write_text
from ..config import Params
from ..errors import ConfigError, EvaclipError
from ..model_configs import model_config
from . import checkpoints
from .distributed import RUN_ID_ENV
from .preemption import SHUTDOWN_TIMEOUT_S, SIGNALS, die_with_parent
from .recipe import check_same_recipe, init_checkpoint, recipe_changes, run_recipe


def stage_output_dir(params: Params, stage: str) -> Path:
    return Path(params.pretrain.output_dir if stage == "pretrain" else params.train.output_dir)


def check_runnable(params: Params) -> None:
    """Everything that would fail after launch fails here, naming the key."""
    cfg = params.train
    model_config(params.model.name)
    world = cfg.devices * cfg.nodes
    here = cfg.launcher != "trainjob"  # a TrainJob runs on the cluster's nodes, not on this machine
    if here and cfg.precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("train.precision: fp16 needs GPUs (DeepSpeed's loss scaler); use fp32 or bf16 on CPUs")
    if here and cfg.devices > 1 and torch.cuda.is_available() and torch.cuda.device_count() < cfg.devices:
        raise ConfigError(f"train.devices: {cfg.devices} GPUs asked, {torch.cuda.device_count()} visible")
    samples = params.data.samples_per_epoch
    if samples is not None and samples < cfg.batch_size * world * cfg.grad_accum_steps:
        raise ConfigError(
            f"data.samples_per_epoch: {samples} is smaller than one global batch "
            f"(train.batch_size {cfg.batch_size} x {world} processes x {cfg.grad_accum_steps} accumulation)"
        )
    # The operator gives a TrainJob's pods their endpoint; DeepSpeed finds node 0 of a hostfile over ssh.
    if (cfg.nodes > 1 or cfg.rdzv_endpoint) and here and not (cfg.launcher == "deepspeed" and cfg.hostfile):
        rendezvous_endpoint(cfg)
    if cfg.warmup_steps > cfg.steps:
        raise ConfigError(f"train.warmup_steps: {cfg.warmup_steps} exceeds train.steps ({cfg.steps})")
    start = init_checkpoint(params)
    if start is not None and not Path(start).is_file():
        raise ConfigError(f"train.init_checkpoint: {start} not found (run `evaclip init`)")
    from ..data.loader import training_manifests

    missing = [str(path.parent) for path in training_manifests(params.data) if not path.is_file()]
    if missing:
        raise ConfigError(f"data: no prepared shards in {', '.join(missing)} (run `evaclip prepare` or `dvc pull`)")
    if params.eval.every_n_steps and not Path(params.eval.sets[0]).is_dir():
        raise ConfigError(f"eval.sets: {params.eval.sets[0]} not found (needed by eval.every_n_steps)")


def check_pretrain_runnable(params: Params) -> None:
    teacher = params.pretrain.teacher
    if not teacher:
        raise ConfigError("pretrain.teacher: no teacher: give a CLIP weight file or models:/NAME@champion")
    if not teacher.startswith("models:/") and not Path(teacher).is_file():
        raise ConfigError(f"pretrain.teacher: weight file {teacher} not found")
    if params.train.precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("train.precision: fp16 needs GPUs (DeepSpeed's loss scaler); use fp32 or bf16 on CPUs")
    if params.train.launcher == "trainjob":
        raise ConfigError("train.launcher: pre-training does not run as a TrainJob yet; use torchrun or deepspeed "
                          "(several nodes: evaclip pretrain --node-rank R on each)")
    if not (Path(params.data.output_dir) / "train" / "manifest.json").is_file() and not params.data.mix:
        raise ConfigError(f"data: no prepared shards in {params.data.output_dir} (run `evaclip prepare` or `dvc pull`)")


_STAGES = {  # stage -> (worker module, pre-launch check, output file)
    "train": ("evaclip.train.worker", check_runnable, "model.safetensors"),
    "pretrain": ("evaclip.pretrain.worker", check_pretrain_runnable, "eva.safetensors"),
}


def _prepare_resume(params: Params) -> Optional[str]:
    """On every node, before its ranks start: make the checkpoint to resume present (from
    `train.checkpoint_uri` if set) and return the MLflow run it belongs to.

    `train.resume: if_same` (dvc.yaml's stage) resumes a crashed run of the same recipe and starts over after
    a change: DVC reruns the stage because something changed, and the old checkpoints belong to another run.
    """
    cfg = params.train
    if not cfg.resume:
        return None
    current = run_recipe(params, init_checkpoint(params))

    def acceptable(state: dict) -> bool:
        return cfg.resume != "if_same" or not recipe_changes(state.get("recipe", {}), current)

    if cfg.checkpoint_uri:
        checkpoints.fetch_latest(cfg.checkpoint_uri, cfg.output_dir, accept=acceptable)
    latest = checkpoints.latest_checkpoint(cfg.output_dir)
    if latest is None:
        return None
    state = checkpoints.trainer_state(latest)
    if not acceptable(state):
        checkpoints.remove_all(cfg.output_dir)
        return None
    check_same_recipe(state.get("recipe", {}), current, latest)  # as the ranks would, before any of them starts
    return state.get("mlflow_run_id")


def rendezvous_endpoint(cfg) -> tuple[str, int]:
    """Where the nodes meet: `train.rdzv_endpoint`, else MASTER_ADDR/MASTER_PORT (PyTorchJob, TrainJob)."""
    endpoint = cfg.rdzv_endpoint
    if endpoint is None and (os.environ.get("MASTER_ADDR") or os.environ.get("PET_MASTER_ADDR")):
        host = os.environ.get("MASTER_ADDR") or os.environ["PET_MASTER_ADDR"]
        endpoint = f"{host}:{os.environ.get('MASTER_PORT') or os.environ.get('PET_MASTER_PORT') or 29500}"
    if endpoint is None:
        raise ConfigError(f"train.rdzv_endpoint: {cfg.nodes} nodes need node 0's HOST:PORT (or MASTER_ADDR set)")
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"train.rdzv_endpoint: {endpoint!r} is not HOST:PORT")
    return host, int(port)


# glibc's malloc hands large blocks (activations, gradients) back to the kernel when freed and faults them in
# again at the next step. Keeping them (up to its 32 MiB ceiling for the mmap threshold), as jemalloc or
# tcmalloc would without a library to install, made a one-process CPU step 11% faster here (by hand; within
# the noise of a 2-process run). Values already in the environment win.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(4 << 30),
              "MALLOC_TOP_PAD_": str(256 << 20)}


def node_rank_from_env() -> int:
    """This node's rank: NODE_RANK, or PET_NODE_RANK (what Kubeflow's operators set), else 0."""
    return int(os.environ.get("NODE_RANK") or os.environ.get("PET_NODE_RANK") or 0)


def launch_command(params_file: Path, params: Params, master_port: Optional[int] = None,
                   module: str = "evaclip.train.worker", node_rank: int = 0) -> list[str]:
    cfg = params.train
    if cfg.launcher == "deepspeed":
        beside_python = Path(sys.executable).parent / "deepspeed"  # the venv's, even when not activated
        launcher = str(beside_python) if beside_python.is_file() else shutil.which("deepspeed")
        if launcher is None:
            raise ConfigError("train.launcher: the `deepspeed` launcher is not installed here; use torchrun")
        cmd = [launcher, "--num_gpus", str(cfg.devices)]
        if cfg.nodes > 1 and cfg.hostfile is not None:  # node 0 starts every node over pdsh/ssh
            cmd += ["--num_nodes", str(cfg.nodes), "--hostfile", str(cfg.hostfile)]
            if cfg.rdzv_endpoint:
                host, port = rendezvous_endpoint(cfg)
                cmd += ["--master_addr", host, "--master_port", str(port)]
        elif cfg.nodes > 1:  # each node starts its own ranks; the hostfile only gives the launcher the world's shape
            host, port = rendezvous_endpoint(cfg)
            hostfile = Path(params_file).parent / f"hostfile.node{node_rank}"
            hostfile.write_text("".join(f"node{i} slots={cfg.devices}\n" for i in range(cfg.nodes)))
            cmd += ["--num_nodes", str(cfg.nodes), "--master_addr", host, "--master_port", str(port),
                    "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node_rank)]
        elif master_port:
            cmd += ["--master_port", str(master_port)]
        return cmd + ["--module", module, "--params", str(params_file)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(cfg.devices),
           "--shutdown-timeout", str(SHUTDOWN_TIMEOUT_S)]
    if cfg.nodes > 1:  # c10d: no static master; the ranks are given out as nodes join
        host, port = rendezvous_endpoint(cfg)
        cmd += ["--nnodes", str(cfg.nodes), "--node-rank", str(node_rank), "--rdzv-backend", "c10d",
                "--rdzv-endpoint", f"{host}:{port}", "--rdzv-id", f"evaclip-{module.split('.')[1]}"]
    else:
        cmd += ["--standalone"] if not master_port else ["--master_port", str(master_port)]
    return cmd + ["-m", module, "--params", str(params_file)]


def launch(params: Params, master_port: Optional[int] = None, env: Optional[dict] = None,
           on_output: Optional[Callable[[str], None]] = None, stage: str = "train",
           node_rank: Optional[int] = None) -> Path:
    """Validate, write the resolved params beside the outputs, run the launcher; returns the weights' path.

    `stage` is `train` (EVA-CLIP) or `pretrain` (masked image modelling, `evaclip.pretrain`).
    `on_output` receives the processes' output line by line (a flow's logger); default: this terminal.
    `node_rank`: this node's, with `train.nodes > 1` (default: `node_rank_from_env()`).
    """
    module, check, weights = _STAGES[stage]
    check(params)
    node_rank = node_rank_from_env() if node_rank is None else node_rank
    resumed_run = _prepare_resume(params) if stage == "train" else None
    out = stage_output_dir(params, stage)
    out.mkdir(parents=True, exist_ok=True)
    params_file = out / f"params.resolved.node{node_rank}.yaml" if params.train.nodes > 1 else out / "params.resolved.yaml"
    atomic_write_text(params_file, yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
    process_env = dict(os.environ, **(env or {}))
    process_env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // params.train.devices)))
    for key, value in MALLOC_ENV.items():
        process_env.setdefault(key, value)
    if not torch.cuda.is_available():  # what DeepSpeed would pick, without its warning in every rank's output
        process_env.setdefault("DS_ACCELERATOR", "cpu")
    run_env = {}
    # Node 0 owns the MLflow run: the other nodes' rank 0 learns it (train/distributed.py). Inside a TrainJob's
    # pod the submitting process already owns it (its id is in the environment).
    if params.tracking.enabled and node_rank == 0 and not os.environ.get(RUN_ID_ENV):
        from ..tracking import live

        run_env = live.open_run(params, stage, out, resumed_run)
        process_env.update(run_env)
    (out / "error.json").unlink(missing_ok=True)
    if stage == "train" and params.train.launcher == "trainjob":
        return _run_on_kubernetes(params, run_env, on_output or print)
    error_file = out / "error.json"  # written by rank 0 on a known error (see worker.py)
    command = launch_command(params_file, params, master_port, module, node_rank)
    returncode, signum = _run_forwarding_signals(command, process_env, on_output)
    if run_env:
        from ..tracking import live

        live.close_run(params, run_env[RUN_ID_ENV], succeeded=returncode == 0, stopped=signum is not None)
    if signum is not None and callable(signal.getsignal(signum)):
        # A handler of this process's own (a Prefect flow running the stage in-process): it gets the signal too,
        # now that the ranks have saved, as it would have without the forwarding.
        signal.raise_signal(signum)
    if returncode != 0:
        error = EvaclipError(f"{stage} failed (exit code {returncode}); what it saved is kept in {out}")
        if signum is not None:
            error = EvaclipError(f"{stage} stopped by {signal.Signals(signum).name}; what it saved is kept in {out}")
            error.exit_code = 128 + signum
        if error_file.is_file():
            known = json.loads(error_file.read_text())
            error = EvaclipError(f"{stage} stopped: {known['message']}")
            error.exit_code = known["exit_code"]
        raise error
    return out / weights


def _run_forwarding_signals(command: list[str], env: dict[str, str],
                            on_output: Optional[Callable[[str], None]]) -> tuple[int, Optional[int]]:
    """Run the launcher (torchrun, deepspeed) in a session of its own; the first SIGTERM, SIGINT or SIGHUP that
    reaches this process is forwarded once to its process group, and this process waits until that group is
    gone (the ranks checkpoint first: train/preemption.py). Returns (exit code, the signal received or None).

    Its own session: a signal to this process group (Prefect's cancellation, Ctrl-C) reaches it exactly once,
    through here (torchrun restarts its shutdown on a second one). The group, not the child alone: DeepSpeed's
    runner dies on a signal without passing it on, while its ranks share its group. It gets SIGTERM if this
    process dies.
    """
    received: list[int] = []
    stdout = subprocess.PIPE if on_output else None
    process = subprocess.Popen(command, env=env, stdout=stdout, stderr=subprocess.STDOUT if on_output else None,
                               text=True, bufsize=1, start_new_session=True, preexec_fn=die_with_parent)

    def forward(signum, frame) -> None:
        if not received:
            received.append(signum)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signum)

    main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    previous = {signum: signal.signal(signum, forward) for signum in SIGNALS} if main_thread else {}
    try:
        if on_output:
            for line in process.stdout:
                on_output(line.rstrip())
        process.wait()
        if received:  # the group's other members (DeepSpeed's ranks) may outlive its leader
            while _group_alive(process.pid):
                time.sleep(0.2)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return process.returncode, (received[0] if received else None)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _run_on_kubernetes(params: Params, run_env: dict[str, str], on_output: Callable[[str], None]) -> Path:
    from . import kubernetes

    def close(succeeded: bool) -> None:
        if run_env:
            from ..tracking import live

            live.close_run(params, run_env[RUN_ID_ENV], succeeded=succeeded)

    try:
        kubernetes.run_trainjob(params, run_env, on_output)
        model = kubernetes.model_from_pods(params)
    except BaseException:
        close(succeeded=False)
        raise
    close(succeeded=True)
    return model
