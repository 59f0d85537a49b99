"""Export a trained model as an open_clip model: a JSON config plus safetensors weights.

The folder works both ways open_clip loads local models:
- `open_clip.create_model_and_transforms("local-dir:OUT")` (reads `open_clip_config.json` and
  `open_clip_model.safetensors`), and
- `open_clip.add_model_config("OUT/<name>.json")` then
  `open_clip.create_model_and_transforms("<name>", pretrained="OUT/open_clip_model.safetensors")`.
Models of our own sizes use timm towers that `import evaclip.model` registers; the paper sizes
(EVA02-B-16, -L-14, -E-14) need nothing but open_clip.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import atomic_write_text, load_model_weights, write_state_dict
from .config import Params
from .model import create_model, model_config

WEIGHTS_NAME = "open_clip_model.safetensors"
CONFIG_NAME = "open_clip_config.json"


@dataclass
class ExportResult:
    directory: Path
    model_name: str
    config: Path
    weights: Path


def export_open_clip(params: Params, checkpoint: str | Path, out_dir: str | Path, name: str | None = None) -> ExportResult:
    """Write `checkpoint` (our full-model safetensors) as an open_clip model folder."""
    out_dir = Path(out_dir)
    name = name or f"{params.model.name}-{params.profile}"
    model = create_model(params.model)
    load_model_weights(model, checkpoint)  # refuses a checkpoint that does not fit, naming the keys

    cfg = model_config(params.model.name)
    cfg["vision_cfg"] = dict(cfg["vision_cfg"], patch_dropout=0.0)  # masking is a training device only
    preprocess = {
        "size": cfg["vision_cfg"]["image_size"],
        "mean": list(model.visual.image_mean or (0.48145466, 0.4578275, 0.40821073)),
        "std": list(model.visual.image_std or (0.26862954, 0.26130258, 0.27577711)),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }
    weights = write_state_dict(model.state_dict(), out_dir / WEIGHTS_NAME, metadata={"model": name})
    atomic_write_text(out_dir / f"{name}.json", json.dumps(cfg, indent=2) + "\n")
    config = atomic_write_text(
        out_dir / CONFIG_NAME,
        json.dumps({"model_cfg": cfg, "preprocess_cfg": preprocess, "model_name": name}, indent=2) + "\n",
    )
    return ExportResult(out_dir, name, config, weights)
