"""The masked-image-modelling loop of one rank, on the same DeepSpeed engine as CLIP training.

Started per process by `launch(params, stage="pretrain")` (torchrun or DeepSpeed's launcher). The
hardware settings (devices, precision, ZeRO stage, launcher, log_every) are `train.*`'s; what to learn
is `pretrain.*`. Optimizer: AdamW (EVA and EVA-02 pre-train with AdamW), no decay on biases, norms,
embeddings and the mask token; linear warmup then cosine. Rank 0 writes the EVA checkpoint.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ..checkpoint import write_state_dict
from ..config import Params, TrainConfig
from ..data import make_train_loader
from ..model import create_transforms, sdpa_kernels_for
from ..optim import lr_multiplier
from ..precision import DTYPES, resolve_precision
from ..train.callbacks import Callback
from ..train.distributed import init_distributed
from ..train.ds_config import clip_gradients, deepspeed_config
from .masking import batch_block_masks
from .mim import MIMStudent, load_teacher, mim_loss

CHECKPOINT = "eva.safetensors"


@dataclass
class PretrainResult:
    checkpoint: Path
    steps: int
    final_loss: float


def engine_config(params: Params) -> TrainConfig:
    """train.* for the hardware, pretrain.* for the recipe."""
    p = params.pretrain
    return params.train.model_copy(update={
        "optimizer": "adamw", "lr": p.lr, "weight_decay": p.weight_decay,
        "steps": p.steps, "batch_size": p.batch_size, "warmup_steps": p.warmup_steps, "grad_clip": 3.0,
        "beta2": 0.98, "output_dir": p.output_dir, "seed": p.seed,
    })


def _no_text(texts):  # the shards' captions are not used: MIM learns from the images alone
    return torch.zeros(len(texts), 1, dtype=torch.long)


def pretrain(params: Params, callbacks: list[Callback] = ()) -> PretrainResult:
    import deepspeed
    from timm.optim import param_groups_weight_decay

    cfg = engine_config(params)
    rank, world = init_distributed()
    callbacks = list(callbacks) if rank == 0 else []

    torch.manual_seed(cfg.seed)
    student_grid = MIMStudent(params.model.name, 1).grid
    teacher = load_teacher(params, student_grid)
    torch.manual_seed(cfg.seed)
    student = MIMStudent(params.model.name, teacher.dim)
    groups = param_groups_weight_decay(student, cfg.weight_decay, no_weight_decay_list=(
        "mask_token", "cls_token", "pos_embed"))
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=False)
    engine, _, _, _ = deepspeed.initialize(
        model=student, optimizer=optimizer, config=deepspeed_config(cfg),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_multiplier(cfg)),
    )
    device = engine.device
    dtype = DTYPES[resolve_precision(cfg.precision)]
    teacher.to(device)
    transform, _ = create_transforms(params.model.name)
    masks = torch.Generator().manual_seed(cfg.seed * 1000 + rank)

    for callback in callbacks:
        callback.on_train_start({"steps": cfg.steps, "start_step": 0, "world_size": world})
    step, epoch, loss_value = 0, 0, float("nan")
    tick, last_logged = time.perf_counter(), 0
    while step < cfg.steps:
        loader, _ = make_train_loader(params.data, transform, _no_text, cfg.batch_size, rank=rank,
                                      world_size=world, seed=cfg.seed, epoch=epoch)
        for images, _ in loader:
            mask = batch_block_masks(len(images), student_grid, params.pretrain.mask_ratio, masks,
                                     params.pretrain.min_block_patches).to(device)
            images = images.to(device)
            target = teacher(images)
            with sdpa_kernels_for(engine.device, dtype, training=True):
                student = engine(images.to(dtype), mask)
            loss = mim_loss(student, target, mask)
            engine.backward(loss)
            clip_gradients(engine, cfg)
            engine.step()
            step += 1
            if callbacks and (step % cfg.log_every == 0 or step == cfg.steps):
                loss_value = loss.item()
                elapsed, tick = time.perf_counter() - tick, time.perf_counter()
                metrics = {"loss": loss_value, "lr/visual": engine.optimizer.param_groups[0]["lr"],
                           "samples_per_s": cfg.batch_size * world * (step - last_logged) / elapsed}
                last_logged = step
                for callback in callbacks:
                    callback.on_step(step, metrics)
            if step >= cfg.steps:
                break
        epoch += 1

    checkpoint = Path(cfg.output_dir) / CHECKPOINT
    if rank == 0:
        write_state_dict(engine.module.eva_state_dict(), checkpoint,
                         metadata={"format": "eva-mim", "model": params.model.name,
                                   "teacher": str(params.pretrain.teacher)})
    dist.barrier()
    for callback in callbacks:
        callback.on_train_end({"model_path": str(checkpoint), "steps": step, "final_loss": loss_value})
    return PretrainResult(checkpoint, step, loss_value)
