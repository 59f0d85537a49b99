"""The EVA-CLIP paper's ablation (its Table: EVA init, LAMB, token masking, flash attention) as rows of
configuration, at whatever scale the base params give. Every row sees the same data and the same number
of samples; each (row, seed) is one MLflow run. `flows/ablation.py` runs them; this module only knows
what each row changes and how the results read as a table.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .config import Params


@dataclass(frozen=True)
class Row:
    number: int
    name: str
    eva_init: bool
    optimizer: str
    masking: float = 0.0
    unmasked_tuning: bool = False
    attention: str = "sdpa"
    evaluate: bool = True  # row 6 only times the attention backend: its weights equal row 4's


ROWS = (
    Row(1, "random init, AdamW", eva_init=False, optimizer="adamw"),
    Row(2, "EVA init, AdamW", eva_init=True, optimizer="adamw"),
    Row(3, "EVA init, LAMB", eva_init=True, optimizer="lamb"),
    Row(4, "EVA init, LAMB, 50% token masking", eva_init=True, optimizer="lamb", masking=0.5),
    Row(5, "row 4 + unmasked tuning at the end", eva_init=True, optimizer="lamb", masking=0.5, unmasked_tuning=True),
    Row(6, "row 4 with math attention (time only)", eva_init=True, optimizer="lamb", masking=0.5, attention="math",
        evaluate=False),
)

# The paper's deltas (EVA-CLIP, arXiv 2303.15389, ablation of B/16 on LAION-400M / Merged-2B).
PAPER = {
    2: "EVA init: +1.8 top-1 with about half the data",
    3: "LAMB: +0.7 top-1",
    4: "50% masking: -0.7 top-1 at about half the time",
    6: "flash attention: about 15% less time (here the opposite direction: math instead of sdpa)",
}

UNMASKED_TUNING_FRACTION = 0.1  # FLIP tunes without masking for a short final phase


@dataclass
class RowResult:
    row: Row
    seed: int
    train_seconds: float
    metrics: dict = field(default_factory=dict)
    run_id: Optional[str] = None


def row_params(base: Params, row: Row, seed: int, eva_checkpoint: Optional[Path], root: Path) -> Params:
    """The base params changed as `row` says, with every output under root/row<N>-seed<S>."""
    out = Path(root) / f"row{row.number}-seed{seed}"
    train = base.train.model_copy(update={
        "optimizer": row.optimizer, "seed": seed, "resume": False, "output_dir": out / "train",
        "init_checkpoint": out / "init" / "model.safetensors",
        "unmasked_tuning_steps": round(base.train.steps * UNMASKED_TUNING_FRACTION) if row.unmasked_tuning else 0,
    })
    return base.model_copy(update={
        "profile": f"{base.profile}-ablation-row{row.number}",
        "model": base.model.model_copy(update={"token_masking": row.masking, "attention": row.attention}),
        "init": base.init.model_copy(update={"vision": eva_checkpoint if row.eva_init else None, "vision_format": "auto",
                                             "seed": seed, "output_dir": out / "init"}),
        "train": train,
        "eval": base.eval.model_copy(update={"output_dir": out / "eval", "checkpoint": None, "every_n_steps": 0}),
        "tracking": base.tracking.model_copy(update={"experiment": f"{base.tracking.experiment}-ablation"}),
    })


def table(results: list[RowResult]) -> str:
    """Markdown: per row, mean and spread (half the range) over seeds; speed-up against row 3's time."""
    by_row: dict[int, list[RowResult]] = {}
    for result in results:
        by_row.setdefault(result.row.number, []).append(result)
    row3 = by_row.get(3)
    base_time = statistics.mean(r.train_seconds for r in row3) if row3 else None
    lines = ["| row | configuration | seeds | zero-shot top-1 | top-5 | training time (s) | speed-up vs row 3 | paper |",
             "|---|---|---|---|---|---|---|---|"]
    for number, runs in sorted(by_row.items()):
        row = runs[0].row
        seconds = [r.train_seconds for r in runs]
        speedup = f"{base_time / statistics.mean(seconds):.2f}x" if base_time else "-"
        lines.append(f"| {number} | {row.name} | {len(runs)} | {_spread(runs, 'zeroshot_top1')} | "
                     f"{_spread(runs, 'zeroshot_top5')} | {statistics.mean(seconds):.0f} ± {_half_range(seconds):.0f} | "
                     f"{speedup} | {PAPER.get(number, '')} |")
    return "\n".join(lines) + "\n"


def _spread(runs: list[RowResult], metric: str) -> str:
    values = [100 * r.metrics[metric] for r in runs if metric in r.metrics]
    if not values:
        return "-"
    return f"{statistics.mean(values):.1f} ± {_half_range(values):.1f}"


def _half_range(values: list[float]) -> float:
    return (max(values) - min(values)) / 2 if len(values) > 1 else 0.0
