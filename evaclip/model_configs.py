"""Model configs by name: ours (`evaclip/model/configs/*.json`) and open_clip's, as open_clip finds them.

A plain name is read as JSON, without importing open_clip: that import (timm, torchvision) costs seconds,
and the launcher of `evaclip train` only checks the name before it starts the ranks, which build the model.
Outside `evaclip.model` for that reason: importing any of its modules imports the package, which
registers the EVA towers with timm.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from .errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent / "model" / "configs"
_REQUIRED = ("embed_dim", "vision_cfg", "text_cfg")  # what open_clip's registry keeps of a JSON file


def _open_clip_config_dir() -> Path:
    spec = importlib.util.find_spec("open_clip")  # the package's folder, without running it
    return Path(next(iter(spec.submodule_search_locations))) / "model_configs"


def _find(name: str) -> dict[str, Any] | None:
    if ":" in name:  # open_clip's schemes (`local-dir:`, `hf-hub:`): its own lookup
        import open_clip

        return open_clip.get_model_config(name)
    if Path(name).name != name:
        return None
    for folder in (CONFIG_DIR, _open_clip_config_dir()):  # ours first: open_clip's registry lets them win
        path = folder / f"{name}.json"
        if path.is_file():
            cfg = json.loads(path.read_text())
            if all(key in cfg for key in _REQUIRED):
                return cfg
    return None


def model_config(name: str) -> dict[str, Any]:
    """The open_clip JSON config of model `name` (ours or open_clip's)."""
    cfg = _find(name)
    if cfg is None:
        ours = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
        raise ConfigError(
            f"model.name: unknown model {name!r}. Ours: {', '.join(ours)}; EVA-CLIP sizes in open_clip: "
            "EVA02-B-16, EVA02-L-14, EVA02-E-14 (see open_clip.list_models())"
        )
    if "timm_model_name" not in cfg.get("vision_cfg", {}):
        raise ConfigError(f"model.name: {name!r} has no timm vision tower, so it is not an EVA-CLIP model")
    return cfg
