"""EVA weight initialization: an EVA-CLIP model whose towers start from weight files users bring.

`initialize(params)` builds the configured model, loads the vision tower from EVA / EVA-02
weights and the text tower from CLIP weights, checks that every key and shape fits (never a
silent partial load), and writes `model.safetensors` with `init_report.json` beside it.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import read_state_dict, state_dict_mismatches, write_state_dict
from ..config import Params
from ..errors import CheckpointError, ConfigError
from ..model import create_model
from . import text, vision
from .report import InitReport, KeyRecord

__all__ = ["InitReport", "InitResult", "KeyRecord", "initialize", "initialize_model"]

# Keys that start fresh by design when a tower comes from a non-CLIP source (EVA-CLIP's --skip-list).
_FRESH_BY_DESIGN = {
    "visual.trunk.head.": "CLIP projection: not in a pre-training checkpoint",
    "text.text_projection": "joint-space projection: starts fresh",
    "logit_scale": "temperature: starts at 1/0.07",
}


@dataclass
class InitResult:
    checkpoint: Path
    report_path: Path
    report: InitReport


def initialize(params: Params) -> InitResult:
    """Build, initialize and save the model described by `params`; returns where it went."""
    model, report = initialize_model(params)
    out_dir = Path(params.init.output_dir)
    checkpoint = write_state_dict(model.state_dict(), out_dir / "model.safetensors", metadata={"model": params.model.name})
    report_path = report.save(out_dir / "init_report.json")
    return InitResult(checkpoint, report_path, report)


def initialize_model(params: Params) -> tuple[torch.nn.Module, InitReport]:
    for key in ("vision", "text"):
        path = getattr(params.init, key)
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"init.{key}: weight file {path} not found")
    torch.manual_seed(params.init.seed)
    model = create_model(params.model)
    expected = model.state_dict()
    report = InitReport()
    loaded: dict[str, torch.Tensor] = {}
    towers: list[str] = []

    cfg = params.init
    if cfg.vision is not None:
        state_dict = read_state_dict(cfg.vision, cfg.trust_torchscript)
        fmt = vision.detect_format(state_dict) if cfg.vision_format == "auto" else cfg.vision_format
        mapped = vision.map_vision(state_dict, model.visual.trunk, fmt, report)
        loaded.update({f"visual.trunk.{k}": v for k, v in mapped.items()})
        report.sources["vision"] = {"path": str(cfg.vision), "format": fmt}
        towers.append("visual.")
    else:
        report.sources["vision"] = {"random": True}

    if cfg.text is not None:
        state_dict = read_state_dict(cfg.text, cfg.trust_torchscript)
        fmt = text.detect_format(state_dict) if cfg.text_format == "auto" else cfg.text_format
        loaded.update(text.map_text(state_dict, expected, fmt, report))
        report.sources["text"] = {"path": str(cfg.text), "format": fmt}
        towers.append("text.")
    else:
        report.sources["text"] = {"random": True}

    if towers:
        _check_fit(expected, loaded, towers, cfg.allow_missing, report)
        model.load_state_dict(loaded, strict=False)
    reshaped = set(report.keys("reshaped"))
    for key in loaded:
        if key not in reshaped:
            report.add(key, "loaded", shape=loaded[key].shape)
    return model, report


def _check_fit(expected, loaded, towers, allow_missing, report: InitReport) -> None:
    """Every key of each loaded tower must come from the file, unless it starts fresh by design or by choice."""
    in_towers = {k: v for k, v in expected.items() if k.startswith(tuple(towers))}
    problems = [p for p in state_dict_mismatches(in_towers, loaded) if not p.startswith("missing:")]
    for key, value in in_towers.items():
        if key in loaded:
            continue
        note = _fresh_note(key, report)
        if note is None and any(fnmatch.fnmatchcase(key, pattern) for pattern in allow_missing):
            note = "allowed by init.allow_missing"
        if note is None:
            problems.append(f"missing: {key} {tuple(value.shape)}")
        else:
            report.add(key, "new", shape=value.shape, note=note)
    if problems:
        sources = ", ".join(f"{tower}: {src['path']} ({src['format']})" for tower, src in report.sources.items() if "path" in src)
        raise CheckpointError(
            f"the weights do not fit model {len(problems)} way(s) [{sources}]:\n"
            + "\n".join(f"  {p}" for p in problems[:50])
            + ("\n  ..." if len(problems) > 50 else "")
            + "\nCheck model.name and the formats; init.allow_missing accepts keys you want randomly initialized."
        )


def _fresh_note(key: str, report: InitReport):
    vision_src = report.sources.get("vision", {})
    for prefix, note in _FRESH_BY_DESIGN.items():
        if key.startswith(prefix):
            if prefix.startswith("visual.") and vision_src.get("format") == "clip":
                return None  # a CLIP checkpoint must bring its projection
            return note
    return None
