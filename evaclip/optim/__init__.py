"""Optimizer, parameter groups and learning-rate schedule of EVA-CLIP training.

Parameter groups follow EVA-CLIP: the vision and the text tower each get their own learning rate,
weight decay and layer-wise lr decay (a layer `i` of `L` scales its tower's lr by
`decay ** (L + 1 - i)`: embeddings are layer 0, the final norm and projection layer L + 1). Biases,
norms, embeddings and `logit_scale` get no weight decay. The schedule is a linear warmup then a
cosine to zero, in optimizer steps.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict

import torch

from ..config import TrainConfig
from .lamb import Lamb

__all__ = ["Lamb", "create_optimizer", "lr_multiplier", "param_groups"]

_NO_DECAY_NAMES = ("cls_token", "pos_embed", "positional_embedding", "token_embedding", "logit_scale")


def layer_id(name: str, num_layers: int) -> int:
    """EVA-CLIP's layer index of a parameter of either tower (0 = embeddings, L + 1 = head)."""
    if name.startswith("visual."):
        if any(k in name for k in ("cls_token", "pos_embed", "patch_embed")):
            return 0
        match = re.search(r"\.blocks\.(\d+)\.", name)
    else:
        if "token_embedding" in name or "positional_embedding" in name:
            return 0
        match = re.search(r"\.resblocks\.(\d+)\.", name)
    return int(match.group(1)) + 1 if match else num_layers + 1


def _tower(name: str) -> str:
    if name.startswith("visual."):
        return "visual"
    if name.startswith("text."):
        return "text"
    return "other"


def _decays(name: str, param: torch.Tensor) -> bool:
    return param.ndim > 1 and not name.endswith(".bias") and not any(k in name for k in _NO_DECAY_NAMES)


def param_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict]:
    """Groups keyed by (tower, layer, decays): each with its lr, weight decay and a readable name."""
    depth = {"visual": len(model.visual.trunk.blocks), "text": len(model.text.transformer.resblocks), "other": 0}
    settings = {
        "visual": (cfg.visual_lr or cfg.lr, _or(cfg.visual_weight_decay, cfg.weight_decay), cfg.visual_layer_decay),
        "text": (cfg.text_lr or cfg.lr, _or(cfg.text_weight_decay, cfg.weight_decay), cfg.text_layer_decay),
        "other": (cfg.lr, cfg.weight_decay, 1.0),
    }
    groups: OrderedDict[tuple, dict] = OrderedDict()
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        tower = _tower(name)
        lr, weight_decay, decay = settings[tower]
        layer = layer_id(name, depth[tower]) if tower != "other" else 0
        decays = _decays(name, param)
        key = (tower, layer, decays)
        if key not in groups:
            scale = decay ** (depth[tower] + 1 - layer) if tower != "other" else 1.0
            groups[key] = {
                "name": f"{tower}.layer{layer}.{'decay' if decays else 'no_decay'}",
                "params": [],
                "lr": lr * scale,
                "weight_decay": weight_decay if decays else 0.0,
            }
        groups[key]["params"].append(param)
    return list(groups.values())


def _or(value, default):
    return default if value is None else value


def create_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg)
    betas = (cfg.beta1, cfg.beta2)
    if cfg.optimizer == "lamb":
        return Lamb(groups, lr=cfg.lr, betas=betas, eps=cfg.eps)
    # foreach=False keeps AdamW a plain per-tensor loop that DeepSpeed's ZeRO wrapper drives as is.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, foreach=False)


def lr_multiplier(cfg: TrainConfig):
    """Step -> factor on each group's lr: linear warmup, then cosine to zero at `cfg.steps`."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor
