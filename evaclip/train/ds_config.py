"""The DeepSpeed configuration of a run, from `train.*`."""

from __future__ import annotations

from ..config import TrainConfig
from ..precision import resolve_precision


def deepspeed_clips(cfg: TrainConfig) -> bool:
    """Whether DeepSpeed clips gradients itself.

    DeepSpeed 0.19.7's fp32 ZeRO-0 path clips each gradient in place by a shape-[1] coefficient,
    which fails on 0-dim parameters such as open_clip's `logit_scale`; those runs clip with
    `clip_gradients` (the same global norm: every rank holds the full averaged gradients).
    """
    return not (cfg.zero_stage == 0 and resolve_precision(cfg.precision) == "fp32")


def clip_gradients(engine, cfg: TrainConfig) -> None:
    """Call between `engine.backward` and `engine.step`."""
    import torch

    if cfg.grad_clip and not deepspeed_clips(cfg) and engine.is_gradient_accumulation_boundary():
        torch.nn.utils.clip_grad_norm_(engine.module.parameters(), cfg.grad_clip)


def zero_optimization(cfg: TrainConfig) -> dict:
    import torch

    zero = {"stage": cfg.zero_stage}
    if cfg.zero_stage == 1 and not torch.cuda.is_available():
        # ZeRO-1's default "reduce-scatter" all-reduces the gradient bucket anyway (multi-rank buckets), after
        # copying it into per-rank slices and before copying them back. On gloo, reducing the bucket in place
        # is the same all-reduce without those copies: 100-160 ms per demo step against 150-340 (2 CPU ranks,
        # measured side by side). GPUs keep DeepSpeed's default.
        zero["reduce_scatter"] = False
    return zero


def deepspeed_config(cfg: TrainConfig, load_universal: bool = False) -> dict:
    """`load_universal`: the resume reads a universal checkpoint (written on another number of processes)."""
    config = {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum_steps,
        "train_batch_size": cfg.global_batch_size,
        "gradient_clipping": (cfg.grad_clip or 0.0) if deepspeed_clips(cfg) else 0.0,
        "zero_optimization": zero_optimization(cfg),
        # Our LAMB is a client optimizer; it is ZeRO-aware (see evaclip.optim.lamb).
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": load_universal},
    }
    precision = resolve_precision(cfg.precision)
    if precision == "fp16":
        config["fp16"] = {
            "enabled": True,
            "loss_scale": 0,  # dynamic
            "initial_scale_power": cfg.fp16_initial_scale_power,
            "loss_scale_window": cfg.fp16_loss_scale_window,
            "hysteresis": cfg.fp16_hysteresis,
            "min_loss_scale": 1,
        }
    elif precision == "bf16":
        config["bf16"] = {"enabled": True}
    return config
