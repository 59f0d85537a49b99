"""Build EVA-CLIP models as open_clip models, from small JSON configs.

Every model is an `open_clip.CustomTextCLIP` (an EVA-02 tower from timm + the CLIP text
transformer), so every checkpoint we write is one the open_clip ecosystem can load. Our own
sizes live in `configs/*.json` beside this file; any open_clip config name works too
(`EVA02-B-16`, `EVA02-L-14`, `EVA02-E-14`).
"""

from __future__ import annotations

import logging

import open_clip
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2

from ..config import ModelConfig
from ..errors import ConfigError
from ..model_configs import CONFIG_DIR, model_config
from . import eva  # noqa: F401  (registers our EVA-02 tower sizes with timm)
from .attention import set_attention_backend
from .eva import pool_vision_early
from .text import allow_short_text, pool_text_early


def _no_random_init_notice(record: logging.LogRecord) -> bool:
    """open_clip warns on the root logger whenever it builds a model without pretrained weights."""
    return "No pretrained weights loaded" not in record.getMessage()


_registered = False


def _register_configs() -> None:
    global _registered
    if not _registered:
        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


def create_model(cfg: ModelConfig, device: str | torch.device = "cpu") -> open_clip.CustomTextCLIP:
    """A randomly initialized EVA-CLIP model configured for training (masking, attention, checkpointing)."""
    model_config(cfg.name)  # validates the name with a clear error
    _register_configs()
    root = logging.getLogger()
    root.addFilter(_no_random_init_notice)  # untrained on purpose: weights come from `evaclip init` or a checkpoint
    try:
        model = open_clip.create_model(cfg.name, pretrained=None, device=device, force_custom_text=True)
    finally:
        root.removeFilter(_no_random_init_notice)
    set_token_masking(model, cfg.token_masking)
    set_attention_backend(model, cfg.attention)
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    allow_short_text(model)
    return model


def pool_early(model: torch.nn.Module) -> list[str]:
    """Each tower's last block computes only the token it pools (the class token, the end-of-text token).

    Exact for training and evaluation: no other token of a last block reaches the features. Returns the
    towers it applies to (MIM pre-training, which reads every token, does not use it).
    """
    return [tower for tower, apply in (("visual", pool_vision_early), ("text", pool_text_early)) if apply(model)]


def create_transforms(name: str):
    """open_clip's (train, eval) image transforms for model `name` (random resized crop, CLIP mean/std)."""
    _register_configs()
    cfg = model_config(name)
    pp = PreprocessCfg(size=cfg["vision_cfg"]["image_size"], **cfg.get("preprocess_cfg", {}))
    return image_transform_v2(pp, is_train=True), image_transform_v2(pp, is_train=False)


def get_tokenizer(name: str):
    """open_clip's CLIP BPE tokenizer (vocabulary shipped in the package) at the model's context length."""
    _register_configs()
    return open_clip.get_tokenizer(name)


def set_token_masking(model: torch.nn.Module, ratio: float) -> None:
    """Drop `ratio` of the image tokens in training mode (FLIP); the CLS token is always kept.

    Changeable between steps, e.g. 0 for a final unmasked-tuning phase.
    """
    from timm.layers import PatchDropoutWithIndices

    if not 0.0 <= ratio < 1.0:
        raise ConfigError(f"model.token_masking: {ratio} is outside [0, 1)")
    trunk = model.visual.trunk
    if trunk.patch_drop is None:
        trunk.patch_drop = PatchDropoutWithIndices(ratio, num_prefix_tokens=trunk.num_prefix_tokens)
    else:
        trunk.patch_drop.prob = ratio
