"""Text tower weights from OpenAI CLIP, open_clip, or Hugging Face CLIP checkpoints.

- `openai`: OpenAI's layout, also open_clip's `CLIP` class: `token_embedding.weight`,
  `positional_embedding`, `transformer.resblocks.N.*`, `ln_final.*`, `text_projection`.
- `open_clip`: open_clip's `CustomTextCLIP` (as EVA-CLIP): the same keys under `text.`.
- `hf`: Hugging Face `CLIPModel` (`text_model.encoder.layers.N.self_attn.q_proj`, ...), the file
  EVA-CLIP's own scripts point at (`openai/clip-vit-large-patch14/pytorch_model.bin`).

`text_projection` and `logit_scale` are not loaded: the vision projection starts fresh, so a
projection into another model's joint space is meaningless (EVA-CLIP's --skip-list does the same).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from ..errors import CheckpointError
from .report import InitReport

_SKIPPED = ("text_projection", "logit_scale")


def detect_format(state_dict: dict[str, torch.Tensor]) -> str:
    if any(k.startswith("text_model.") for k in state_dict):
        return "hf"
    if any(k.startswith("text.transformer.") for k in state_dict):
        return "open_clip"
    if any(k.startswith("transformer.resblocks.") for k in state_dict):
        return "openai"
    raise CheckpointError(
        "no text tower found: expected OpenAI/open_clip keys (transformer.resblocks.*, or text.transformer.*) "
        "or Hugging Face CLIP keys (text_model.*)"
    )


def map_text(state_dict: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], fmt: str, report: InitReport) -> dict[str, torch.Tensor]:
    """The file's text tensors as model keys (`text.*`); positional embeddings fitted to the context length."""
    fmt = detect_format(state_dict) if fmt == "auto" else fmt
    if fmt == "hf":
        canonical = _from_hf(state_dict)
    elif fmt == "open_clip":
        canonical = {k[len("text."):]: v for k, v in state_dict.items() if k.startswith("text.")}
    else:
        canonical = {k: v for k, v in state_dict.items() if not k.startswith("visual.")}

    mapped: dict[str, torch.Tensor] = {}
    for key, value in canonical.items():
        if key in _SKIPPED or key.startswith(_SKIPPED):
            report.add(key, "dropped", source_shape=value.shape, note="joint-space projection: starts fresh")
            continue
        if key == "attn_mask":
            continue  # a causal-mask buffer some open_clip versions saved
        target = f"text.{key}"
        if key == "positional_embedding" and target in expected and value.shape != expected[target].shape:
            fitted = _fit_positions(value, expected[target].shape[0])
            report.add(target, "reshaped", shape=fitted.shape, source_shape=value.shape,
                       note="positions fitted to the context length")
            value = fitted
        mapped[target] = value
    return mapped


def _fit_positions(pos: torch.Tensor, length: int) -> torch.Tensor:
    if length <= pos.shape[0]:
        return pos[:length].clone()  # the first positions keep their meaning
    return F.interpolate(pos.T[None], size=length, mode="linear", align_corners=True)[0].T.contiguous()


_HF_LAYER = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.(.+)$")
_HF_RENAMES = {
    "self_attn.out_proj.": "attn.out_proj.",
    "layer_norm1.": "ln_1.",
    "layer_norm2.": "ln_2.",
    "mlp.fc1.": "mlp.c_fc.",
    "mlp.fc2.": "mlp.c_proj.",
}


def _from_hf(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if key == "text_model.embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value
        elif key == "text_model.embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif key.startswith("text_model.final_layer_norm."):
            out["ln_final." + key.rsplit(".", 1)[1]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.T  # nn.Linear (embed, width) -> open_clip (width, embed)
        elif key == "logit_scale":
            out["logit_scale"] = value
        elif match := _HF_LAYER.match(key):
            layer, rest = int(match.group(1)), match.group(2)
            if proj := re.match(r"self_attn\.([qkv])_proj\.(weight|bias)$", rest):
                qkv.setdefault((layer, proj.group(2)), {})[proj.group(1)] = value
                continue
            for old, new in _HF_RENAMES.items():
                if rest.startswith(old):
                    out[f"transformer.resblocks.{layer}.{new}{rest[len(old):]}"] = value
                    break
            else:
                out[f"transformer.resblocks.{layer}.{rest}"] = value  # left for the mismatch check to name
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"text layer {layer}: q/k/v {kind} incomplete in the Hugging Face checkpoint")
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out
