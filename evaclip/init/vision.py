"""Vision tower weights from the formats EVA weights are published in.

- `timm`: timm's EVA-02 state dicts (`eva02_*`), `.safetensors` or `.pt`.
- `eva`: the original EVA / EVA-02 masked-image-modelling checkpoints (`inner_attn_ln`, `mlp.w12`
  or `w1/w2/w3`, `ffn_ln`, `q_bias/v_bias`, `rope.freqs_*`, `mask_token`, `lm_head.*`).
- `clip`: the vision part of an EVA-CLIP (`visual.*`) or open_clip (`visual.trunk.*`) checkpoint.

The renaming and the resampling of position / patch embeddings is timm's
`checkpoint_filter_fn`; this module only decides what to drop beforehand and checks the result.
"""

from __future__ import annotations

import torch
from timm.models.eva import checkpoint_filter_fn

from .report import InitReport

# Keys only masked-image modelling uses: EVA-CLIP's own --skip-list drops them too.
_MIM_ONLY = ("mask_token", "lm_head.")
_EVA_MARKERS = ("inner_attn_ln", "ffn_ln", "mlp.w1", "mlp.w3", "mlp.w12", "q_bias", "rope.freqs", "mask_token", "lm_head.")
_RESAMPLED = ("pos_embed", "patch_embed.proj.weight")


def detect_format(state_dict: dict[str, torch.Tensor]) -> str:
    if any(k.startswith("visual.") for k in state_dict):
        return "clip"
    if any(marker in k for k in state_dict for marker in _EVA_MARKERS):
        return "eva"
    return "timm"


def map_vision(state_dict: dict[str, torch.Tensor], trunk: torch.nn.Module, fmt: str, report: InitReport) -> dict[str, torch.Tensor]:
    """The file's tensors as `trunk` (timm Eva) keys; records what was dropped or resampled."""
    fmt = detect_format(state_dict) if fmt == "auto" else fmt
    prefix = _tower_prefix(state_dict) if fmt == "clip" else ""
    head = getattr(trunk, "head", None)
    head_shape = tuple(head.weight.shape) if isinstance(head, torch.nn.Linear) else None
    tower: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            continue  # text tower, logit_scale: not ours to load here
        local = key[len(prefix):]
        reason = _drop_reason(local, value, fmt, head_shape)
        if reason:
            report.add(key, "dropped", source_shape=value.shape, note=reason)
        else:
            tower[local] = value

    # timm renames (w12->fc1, inner_attn_ln->attn.norm, q_bias->q_proj.bias, ...) and resamples
    # pos_embed to the target grid and patch_embed to the target patch size.
    mapped = checkpoint_filter_fn(tower, trunk)
    for local in _RESAMPLED:
        if local in tower and local in mapped and tower[local].shape != mapped[local].shape:
            report.add(
                f"visual.trunk.{local}", "reshaped", shape=mapped[local].shape, source_shape=tower[local].shape,
                note="resampled to the target grid" if local == "pos_embed" else "resampled to the target patch size",
            )
    return mapped


def _tower_prefix(state_dict: dict[str, torch.Tensor]) -> str:
    return "visual.trunk." if any(k.startswith("visual.trunk.") for k in state_dict) else "visual."


def _drop_reason(local_key: str, value: torch.Tensor, fmt: str, head_shape) -> str:
    if local_key == "mask_token" or local_key.startswith("lm_head."):
        return "masked-image-modelling only"
    if local_key.startswith("rope."):
        return "rotary buffer: recomputed for the target grid"
    if fmt != "clip" and local_key == "head.weight" and tuple(value.shape) != head_shape:
        # A classification head is not the CLIP projection: it starts fresh (as EVA-CLIP does).
        # timm's eva02_*_clip_* weights do carry the projection as `head`: that one fits and loads.
        return "pre-training head, not the CLIP projection"
    if fmt != "clip" and local_key == "head.bias" and (head_shape is None or tuple(value.shape) != head_shape[:1]):
        return "pre-training head, not the CLIP projection"
    return ""
