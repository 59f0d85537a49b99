"""The training loop of one rank: DeepSpeed engine, CLIP loss over all ranks, checkpoints, resume.

Started once per process by a launcher (`torchrun` or `deepspeed`, see `launch.py`); all ranks run
`train(params)`. Rank 0 reports to the callbacks.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ..checkpoint import load_model_weights, write_state_dict
from ..config import Params
from ..data import make_train_loader
from ..data.loader import DataReport
from ..errors import EvaclipError
from ..model import (
    create_model,
    create_transforms,
    get_tokenizer,
    pool_early,
    sdpa_kernels_for,
    set_token_masking,
    trim_text_padding,
)
from ..optim import Lamb, create_optimizer, lr_multiplier
from ..precision import DTYPES, resolve_precision
from . import checkpoints
from .callbacks import Callback
from .distributed import init_distributed
from .ds_config import clip_gradients, deepspeed_config
from .preemption import StopRequest, TrainingStopped
from .recipe import check_same_recipe, init_checkpoint, run_recipe

DATA_REPORT = "data_report.json"  # shards skipped on every rank, and rank 0's share of each shard set
MAX_LOGIT_SCALE = 100.0  # open_clip clamps the learned temperature at ln(100)


class NonFiniteLossError(EvaclipError):
    exit_code = 5


@dataclass
class TrainResult:
    model_path: Path
    steps: int
    samples_seen: int
    final_loss: float


def train(params: Params, callbacks: list[Callback] = ()) -> TrainResult:
    import deepspeed
    from open_clip.loss import ClipLoss

    cfg = params.train
    rank, world = init_distributed()
    callbacks = list(callbacks) if rank == 0 else []
    stop = StopRequest(Path(cfg.output_dir) / f"output-after-stop.rank{rank}.log")

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (DeepSpeed also broadcasts rank 0's)
    model = create_model(params.model)
    pool_early(model)  # both towers' last blocks on their pooled tokens alone: same loss, less work
    start = init_checkpoint(params)
    if start is not None:
        load_model_weights(model, start)
    recipe = run_recipe(params, start)
    state = {"step": 0, "samples_seen": 0, "epoch": 0, "samples_in_epoch": 0, "recipe": recipe,
             "mlflow_run_id": os.environ.get("EVACLIP_MLFLOW_RUN_ID")}  # a resume continues that run
    latest = checkpoints.latest_checkpoint(cfg.output_dir) if cfg.resume else None
    resized = False
    if latest is not None:
        saved_state = checkpoints.trainer_state(latest)
        check_same_recipe(saved_state.get("recipe", {}), recipe, latest)
        resized = saved_state.get("world_size", world) != world
        if resized:
            checkpoints.to_universal(latest)
    optimizer = create_optimizer(model, cfg)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(cfg, load_universal=resized),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_multiplier(cfg)),
    )
    if isinstance(optimizer, Lamb) and cfg.zero_stage > 0:
        optimizer.attach_zero_partitions(engine.optimizer)  # per-tensor trust ratios under ZeRO
    deepspeed_checks_overflow = _check_overflow_in_deepspeed(engine)
    device = engine.device

    data_report = DataReport()
    if latest is not None:
        state = checkpoints.load(engine, latest, universal=resized)  # this rank's RNG states too, if it had one
        saved = checkpoints.load_rank_state(latest).get("data", {})
        # Skipped shards count against max_skipped_fraction across resumes (after a resize: every old rank's).
        data_report.skipped = checkpoints.skipped_shards(latest) if resized else dict(saved.get("skipped", {}))
        if saved.get("workers") == params.data.workers and not resized:
            # where each stream stands: read past, not decoded again. After a resize the epoch's remaining
            # batches come from the new world's shard split (replayed up to samples_in_epoch).
            data_report.positions = {int(k): v for k, v in saved.get("positions", {}).items()}
        if not checkpoints.has_rank_rng(latest):
            torch.manual_seed(cfg.seed * 1000 + rank + 7919 * state["step"])  # a rank the checkpoint did not have
    else:
        torch.manual_seed(cfg.seed * 1000 + rank)  # token masking differs per rank
    loss_fn = ClipLoss(local_loss=cfg.local_loss, gather_with_grad=cfg.gather_with_grad, cache_labels=True,
                       rank=rank, world_size=world)
    train_transform, _ = create_transforms(params.model.name)
    tokenizer = get_tokenizer(params.model.name)
    precision = resolve_precision(cfg.precision)  # `auto`: this process's hardware
    for callback in callbacks:
        callback.on_train_start({"steps": cfg.steps, "start_step": state["step"], "world_size": world,
                                 "model": engine.module, "precision": precision,
                                 "resumed_from": str(latest) if latest else None,
                                 "init_checkpoint": str(start) if start else None})

    dtype = DTYPES[precision]
    last_logged = state["step"]
    nonfinite, loss_value = 0, float("nan")
    micro = 0
    while state["step"] < cfg.steps:
        loader, _ = make_train_loader(
            params.data, train_transform, tokenizer, cfg.batch_size, rank=rank, world_size=world,
            seed=cfg.seed, epoch=state["epoch"], samples_seen=state["samples_in_epoch"], report=data_report,
        )
        tick = time.perf_counter()
        for images, texts in loader:
            masking = 0.0 if state["step"] >= cfg.steps - cfg.unmasked_tuning_steps else params.model.token_masking
            set_token_masking(engine.module, masking)
            texts = trim_text_padding(engine.module, texts)  # on the CPU batch: no device sync
            with sdpa_kernels_for(device, dtype, training=True):  # fixed per forward, kept by backward
                image_features, text_features, logit_scale = engine(images.to(device, dtype), texts.to(device))
            # The contrastive loss in fp32 whatever the compute precision: its logits span a wide range.
            loss = loss_fn(image_features.float(), text_features.float(), logit_scale.float())
            if not deepspeed_checks_overflow and not _finite_everywhere(loss, device):
                nonfinite = _count_nonfinite(nonfinite, cfg, state)
                _skip_batch(state, cfg, world)
                continue
            engine.backward(loss)
            clip_gradients(engine, cfg)
            engine.step()
            clamp_logit_scale(engine.module)
            _skip_batch(state, cfg, world)
            micro += 1
            if micro % cfg.grad_accum_steps:
                continue
            # DeepSpeed skipped the step on every rank alike if any gradient was non-finite (its overflow
            # check, already a host sync); the step does not count and the last good checkpoint stays.
            if deepspeed_checks_overflow and not engine.was_step_applied():
                nonfinite = _count_nonfinite(nonfinite, cfg, state)
                continue
            nonfinite = 0
            state["step"] += 1
            logged = state["step"] % cfg.log_every == 0 or state["step"] == cfg.steps
            if logged:
                loss_value = loss.item()  # the only host sync besides DeepSpeed's: every log_every steps
            if callbacks and logged:
                elapsed, tick = time.perf_counter() - tick, time.perf_counter()
                steps_done, last_logged = state["step"] - last_logged, state["step"]
                metrics = _metrics(loss_value, engine, logit_scale, cfg, elapsed, masking, steps_done)
                metrics.update(_data_metrics(data_report))
                for callback in callbacks:
                    callback.on_step(state["step"], metrics)
            saved = None
            if state["step"] % cfg.checkpoint_every == 0 or state["step"] == cfg.steps:
                saved = _save(engine, cfg, state, world, params.data.workers, data_report, callbacks)
            if stop.agreed():  # a signal reached some rank: all of them save this step, then stop
                path = saved or _save(engine, cfg, state, world, params.data.workers, data_report, callbacks)
                for callback in callbacks:
                    callback.on_train_end({"steps": state["step"], "final_loss": loss_value, "stopped": True})
                raise TrainingStopped(stop.signum, state["step"], path)
            if state["step"] >= cfg.steps:
                break
        else:
            state["epoch"] += 1
            state["samples_in_epoch"] = 0

    model_path = Path(cfg.output_dir) / "model.safetensors"
    if rank == 0:  # under ZeRO-1/2 every rank holds the full (all-gathered) weights
        write_state_dict(engine.module.state_dict(), model_path, metadata={"model": params.model.name})
    skipped = [None] * world
    dist.all_gather_object(skipped, data_report.skipped)  # once per run: every rank's skipped shards
    data_quality = {"skipped_shards": {url: err for part in skipped for url, err in part.items()},
                    "shares_rank0": data_report.shares()}
    if rank == 0:
        (Path(cfg.output_dir) / DATA_REPORT).write_text(json.dumps(data_quality, indent=2) + "\n")
    dist.barrier()
    result = TrainResult(model_path, state["step"], state["samples_seen"], loss_value)
    for callback in callbacks:
        callback.on_train_end({"model_path": str(model_path), "steps": state["step"], "final_loss": loss_value,
                               "data_quality": data_quality})
    if rank == 0 and cfg.checkpoint_uri:  # after the callbacks: metrics.csv is written at the end
        checkpoints.upload_outputs(Path(cfg.output_dir), cfg.checkpoint_uri)
    stop.close()
    return result


def _save(engine, cfg, state: dict, world: int, workers: int, data_report: DataReport, callbacks) -> Path:
    """A checkpoint of this step on every rank (and on object storage), announced to the callbacks."""
    rank_state = {"data": {"workers": workers, "positions": data_report.positions, "skipped": data_report.skipped}}
    path = checkpoints.save(engine, cfg.output_dir, {**state, "world_size": world}, cfg.keep_checkpoints, rank_state)
    if cfg.checkpoint_uri:
        checkpoints.upload(path, cfg.checkpoint_uri, cfg.keep_checkpoints)
    for callback in callbacks:
        callback.on_checkpoint(state["step"], path)
    return path


def clamp_logit_scale(module: torch.nn.Module) -> None:
    """open_clip's bound on the learned temperature, applied as it does: to the parameter after the step, not
    inside the loss (where the gradient would vanish past the bound). Under ZeRO the optimizer updates an fp32
    master copy that the next step copies back: it gets the clamped value too (a local write, no collective)."""
    from deepspeed.utils import safe_set_full_fp32_param

    param = getattr(module, "logit_scale", None)
    if param is None:
        return
    with torch.no_grad():
        param.clamp_(0, math.log(MAX_LOGIT_SCALE))
    safe_set_full_fp32_param(param, param.detach().float())


def _skip_batch(state: dict, cfg, world: int) -> None:
    consumed = cfg.batch_size * world
    state["samples_seen"] += consumed
    state["samples_in_epoch"] += consumed


def _check_overflow_in_deepspeed(engine) -> bool:
    """Let DeepSpeed's ZeRO optimizer find non-finite gradients in every precision, not only fp16/bf16.

    Its check (one all-reduce and `.item()` per step) is the only host sync a step needs: a non-finite loss
    gives non-finite gradients, and the step is skipped on every rank. ZeRO-0 has no such check; there we
    all-reduce a finiteness flag per step instead (`_finite_everywhere`)."""
    if not hasattr(engine.optimizer, "check_grad_overflow"):
        return False
    engine.optimizer.check_grad_overflow = True
    return True


def _count_nonfinite(nonfinite: int, cfg, state: dict) -> int:
    nonfinite += 1
    if nonfinite > cfg.max_nonfinite_steps:
        raise NonFiniteLossError(
            f"{nonfinite} consecutive non-finite losses at step {state['step']} "
            f"(train.max_nonfinite_steps={cfg.max_nonfinite_steps}); last good checkpoint: "
            f"{checkpoints.latest_checkpoint(cfg.output_dir)}"
        )
    return nonfinite


def _finite_everywhere(loss: torch.Tensor, device) -> bool:
    flag = torch.tensor([0.0 if torch.isfinite(loss).all() else 1.0], device=device)  # NCCL needs it on the GPU
    dist.all_reduce(flag)
    return flag.item() == 0


def _data_metrics(report: DataReport) -> dict[str, float]:
    """This rank's (rank 0's) view of the data: shards skipped so far, and each shard set's share of samples."""
    return {"data/skipped_shards": float(len(report.skipped)),
            **{f"data/share/{name}": share for name, share in report.shares().items()}}


def _metrics(loss, engine, logit_scale, cfg, elapsed, masking, steps_done) -> dict[str, float]:
    lrs = {}
    for group in engine.optimizer.param_groups:
        tower = group.get("name", "other").split(".")[0]
        lrs[f"lr/{tower}"] = max(lrs.get(f"lr/{tower}", 0.0), group["lr"])
    samples = cfg.batch_size * dist.get_world_size() * cfg.grad_accum_steps * steps_done
    metrics = {
        "loss": loss,
        **{k: float(v) for k, v in lrs.items()},
        "logit_scale": float(logit_scale.detach()),
        "samples_per_s": samples / elapsed if elapsed > 0 else math.nan,
        "token_masking": masking,
    }
    if torch.cuda.is_available():  # the allocator's own counter: no device sync
        metrics["gpu_peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return metrics
