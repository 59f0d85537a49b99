"""The EVA-CLIP paper's claims, tested at the scale of the given params: a study of training runs ("cells").

- **EVA initialization**: a teacher CLIP trained several times longer than the students, a fresh EVA pre-trained
  from it (masked image modelling) at a few lengths, then EVA-CLIP from that EVA against random
  initialization, both with LAMB, with a learning curve (zero-shot top-1 against samples seen).
- **LAMB against AdamW**, each at the best learning rate of its own sweep.
- **Token masking** 0, 0.5 and 0.75 with the same samples seen, with and without FLIP's unmasked tuning.
- **Attention**: time per step with `sdpa` against `math` (short runs, no evaluation).

A cell is identified by a digest of everything that decides its result (`cell_key`), so that a study can be
completed over several invocations: a cell already finished (recorded in MLflow) is not run again. This module
runs one cell and turns cells into the report; `flows/ablation.py` decides which cells to run, in what order.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from .config import Params


@dataclass(frozen=True)
class Arm:
    """One row of the study: what it changes in the base recipe (EVA init, LAMB, 50% masking)."""

    name: str
    label: str
    eva_init: bool = True
    optimizer: str = "lamb"
    masking: float = 0.5
    unmasked_tuning: bool = False
    attention: str = "sdpa"
    precision: Optional[str] = None  # None: the base params'
    curve: bool = False  # zero-shot evaluations during training
    timing: bool = False  # a short run for its time per step only: no evaluation


ARMS = (
    Arm("random-lamb", "random init, LAMB", eva_init=False, curve=True),
    Arm("eva-lamb", "EVA init, LAMB (masking 0.5)", curve=True),
    Arm("eva-adamw", "EVA init, AdamW", optimizer="adamw"),
    Arm("mask-0", "EVA init, LAMB, no masking", masking=0.0),
    Arm("mask-0.75", "EVA init, LAMB, masking 0.75", masking=0.75),
    Arm("mask-0.5-tuned", "masking 0.5 + unmasked tuning", unmasked_tuning=True),
    Arm("mask-0.75-tuned", "masking 0.75 + unmasked tuning", masking=0.75, unmasked_tuning=True),
    # Time only, from random init: the weights do not change the time per step.
    Arm("attn-sdpa", "sdpa attention (time)", eva_init=False, timing=True),
    Arm("attn-math", "math attention (time)", eva_init=False, attention="math", timing=True),
    Arm("attn-sdpa-fp32", "sdpa attention, fp32 (time)", eva_init=False, precision="fp32", timing=True),
    Arm("attn-math-fp32", "math attention, fp32 (time)", eva_init=False, attention="math", precision="fp32",
        timing=True),
)
ARMS_BY_NAME = {arm.name: arm for arm in ARMS}

# The paper's deltas (EVA-CLIP, arXiv 2303.15389, B/16 ablations), set beside ours in the report.
PAPER = {
    "eva-lamb": "EVA init: +1.8 top-1, about half the samples to the same accuracy",
    "eva-adamw": "LAMB over AdamW: +0.7 top-1",
    "mask-0": "50% masking: -0.7 top-1 at about half the training time",
    "attn-math": "flash attention: about 15% less time per step",
}

UNMASKED_TUNING_FRACTION = 0.1  # FLIP tunes without masking for a short final phase (same samples seen)
TUNING_SEED = 100  # the sweeps and probes: a seed no row uses, so that no row's seed is the best of several tries
TIMING_LOG_EVERY = 5  # the attention rows log (and time) every 5 steps: several intervals after the first


@dataclass
class Cell:
    """One training run of the study and what it measured (`top1`/`top5`: the full first evaluation set)."""

    kind: str  # teacher | pretrain | run
    arm: str
    seed: int
    lr: float
    key: str
    top1: Optional[float] = None
    top5: Optional[float] = None
    samples_seen: int = 0
    train_seconds: float = 0.0
    samples_per_s: Optional[float] = None
    curve: list[tuple[int, float]] = field(default_factory=list)  # (samples seen, top-1 on the curve's subset)
    weights: Optional[str] = None
    run_id: Optional[str] = None
    pretrain_steps: Optional[int] = None  # the EVA's (EVA-initialized cells) or its own (pretrain cells)


def arm_params(base: Params, arm: Arm, seed: int, lr: float, eva: Optional[Path], out: Path,
               curve_every: int = 0, curve_samples: Optional[int] = None, steps: Optional[int] = None) -> Params:
    """The base params changed as `arm` says, at learning rate `lr` (both towers: one rate per optimizer is what
    the sweep tunes), outputs under `out` (checkpoints too: never the base's object storage)."""
    steps = steps or base.train.steps
    train = base.train.model_copy(update={
        "optimizer": arm.optimizer, "lr": lr, "visual_lr": lr, "text_lr": lr, "seed": seed, "resume": False,
        "steps": steps, "warmup_steps": min(base.train.warmup_steps, steps // 2),
        "precision": arm.precision or base.train.precision, "output_dir": out / "train", "checkpoint_uri": None,
        "log_every": TIMING_LOG_EVERY if arm.timing else base.train.log_every,
        "init_checkpoint": out / "init" / "model.safetensors",
        "unmasked_tuning_steps": round(steps * UNMASKED_TUNING_FRACTION) if arm.unmasked_tuning else 0,
    })
    every = curve_every if arm.curve and not arm.timing else 0
    return base.model_copy(update={
        "model": base.model.model_copy(update={"token_masking": arm.masking, "attention": arm.attention}),
        "init": base.init.model_copy(update={"vision": eva if arm.eva_init else None, "vision_format": "auto",
                                             "seed": seed, "output_dir": out / "init"}),
        "train": train,
        "eval": base.eval.model_copy(update={"output_dir": out / "eval", "checkpoint": None, "every_n_steps": every,
                                             "every_n_steps_samples": curve_samples if every else None}),
    })


def teacher_params(base: Params, steps: int, out: Path) -> Params:
    """The teacher: the base recipe from random initialization, trained `steps` steps (several students' worth)."""
    return arm_params(base, Arm("teacher", "teacher", eva_init=False), seed=0, lr=base.train.lr, eva=None, out=out,
                      steps=steps)


def pretrain_params(base: Params, teacher: Path, steps: int, out: Path) -> Params:
    pretrain = base.pretrain.model_copy(update={"teacher": str(teacher), "steps": steps, "output_dir": out,
                                                "warmup_steps": min(base.pretrain.warmup_steps, steps // 2)})
    return base.model_copy(update={"pretrain": pretrain, "train": base.train.model_copy(update={"resume": False})})


_PRETRAIN_USES = {"devices", "nodes", "precision", "zero_stage", "grad_accum_steps", "grad_clip", "fp16_initial_scale_power",
                  "fp16_loss_scale_window", "fp16_hysteresis", "launcher"}
# Where a cell writes, and how it is tracked: not what it computes.
_LOCATION_KEYS = {("init", "output_dir"), ("train", "output_dir"), ("train", "init_checkpoint"), ("train", "resume"),
                  ("eval", "output_dir"), ("pretrain", "output_dir"), ("pretrain", "teacher"), ("init", "vision")}


def cell_key(params: Params, kind: str, inputs: dict[str, str]) -> str:
    """A digest of everything that decides the cell's result: its params (not where it writes), and the keys
    of the cells whose weights it starts from (`inputs`: the teacher's, the EVA's)."""
    dump = params.model_dump(mode="json")
    for section in ("tracking", "profile") + (() if kind == "pretrain" else ("pretrain",)):
        dump.pop(section, None)  # a run's result does not depend on the pre-training section: its EVA's key says it
    if kind == "pretrain":  # pre-training takes only the hardware from train.*
        dump["train"] = {k: v for k, v in dump["train"].items() if k in _PRETRAIN_USES}
    for section, name in _LOCATION_KEYS:
        dump.get(section, {}).pop(name, None)
    text = json.dumps({"kind": kind, "params": dump, "inputs": inputs}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_cell(params: Params, cell: Cell, stage: str = "train", on_output=None) -> Cell:
    """Initialize, train (or pre-train) and evaluate one cell with the library's own functions; fills `cell`."""
    from .eval import evaluate
    from .init import initialize
    from .train import launch
    from .train.checkpoints import remove_all

    if stage == "train":
        initialize(params)
    started = time.perf_counter()
    cell.weights = str(launch(params, on_output=on_output, stage=stage))
    cell.train_seconds = time.perf_counter() - started
    remove_all(Path(cell.weights).parent)  # its weights are what the study keeps: an unfinished cell reruns whole
    if stage == "pretrain":
        cell.pretrain_steps = params.pretrain.steps
        return cell
    rows = [json.loads(line) for line in (Path(params.train.output_dir) / "metrics.jsonl").read_text().splitlines()]
    batch = params.train.global_batch_size
    cell.samples_seen = params.train.steps * batch
    speeds = [r["samples_per_s"] for r in rows[1:] or rows if "samples_per_s" in r]  # the first holds start-up
    cell.samples_per_s = statistics.median(speeds) if speeds else None
    cell.curve = [(r["step"] * batch, r["eval_zeroshot_top1"]) for r in rows if "eval_zeroshot_top1" in r]
    cell.train_seconds -= sum(r.get("eval_seconds", 0.0) for r in rows)  # training alone, as the rows without curves
    if cell.kind != "timing":
        metrics = evaluate(params, progress=False).metrics
        cell.top1, cell.top5 = metrics["zeroshot_top1"], metrics["zeroshot_top5"]
    return cell


def best_lr(cells: list[Cell]) -> Optional[float]:
    """The sweep's winner: the learning rate with the highest top-1 (ties: the smaller rate)."""
    done = [c for c in cells if c.top1 is not None]
    return max(done, key=lambda c: (c.top1, -c.lr)).lr if done else None


def mean_curve(cells: list[Cell]) -> list[tuple[int, float, float]]:
    """(samples seen, mean top-1, standard deviation) over the seeds, at the samples every seed measured."""
    points: dict[int, list[float]] = {}
    for cell in cells:
        for samples, top1 in cell.curve:
            points.setdefault(samples, []).append(top1)
    return [(s, statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0)
            for s, v in sorted(points.items()) if len(v) == len(cells)]


def samples_to_reach(curve: list[tuple[int, float, float]], accuracy: float) -> Optional[float]:
    """The samples seen at which a mean curve first reaches `accuracy`, interpolated linearly between its points
    (from (0, chance) is not assumed: before its first point, None means "not within the curve")."""
    for (s0, a0, _), (s1, a1, _) in zip(curve, curve[1:], strict=False):
        if a0 >= accuracy:
            return float(s0)
        if a1 >= accuracy:
            return s0 + (s1 - s0) * (accuracy - a0) / (a1 - a0)
    if curve and curve[-1][1] >= accuracy:
        return float(curve[-1][0])
    return None


def _stats(values: list[float]) -> Optional[dict]:
    if not values:
        return None
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def summarize(scale: dict, arms: list[Arm], seeds: list[int], rows: dict[str, list[Cell]], lrs: dict[str, float],
              extra: dict, target_top1: Optional[float] = None) -> dict:
    """The study's record (benchmarks/results/ablation.json): per row its configuration, the seeds run and each
    seed's numbers; the cells still missing; the samples-to-accuracy comparison of EVA and random init."""
    entries, missing = [], []
    for arm in arms:
        cells = sorted(rows.get(arm.name, []), key=lambda c: c.seed)
        done = {c.seed for c in cells}
        missing += [f"{arm.name} seed {s}" for s in seeds if s not in done]
        config = {k: v for k, v in asdict(arm).items() if k not in ("name", "label")}
        config.update(precision=arm.precision or scale.get("precision"),
                      lr=cells[0].lr if cells else lrs.get(arm.optimizer),
                      eva=extra.get("eva_key") if arm.eva_init else None)
        entries.append({
            "arm": arm.name, "label": arm.label, "paper": PAPER.get(arm.name), "config": config,
            "seeds": [{"seed": c.seed, "zeroshot_top1": c.top1, "zeroshot_top5": c.top5, "samples_seen": c.samples_seen,
                       "wall_seconds": round(c.train_seconds, 1), "samples_per_s": c.samples_per_s,
                       "curve": c.curve, "mlflow_run_id": c.run_id} for c in cells],
            "zeroshot_top1": _stats([c.top1 for c in cells if c.top1 is not None]),
            "zeroshot_top5": _stats([c.top5 for c in cells if c.top5 is not None]),
            "wall_seconds": _stats([c.train_seconds for c in cells]),
            "samples_per_s": _stats([c.samples_per_s for c in cells if c.samples_per_s]),
        })
    summary = {"benchmark": "ablation", "scale": scale, "seeds": seeds, "learning_rates": lrs, "rows": entries,
               "missing": missing, **extra}
    summary["eva_samples"] = eva_samples(rows, target_top1)
    return summary


def eva_samples(rows: dict[str, list[Cell]], target_top1: Optional[float] = None) -> Optional[dict]:
    """EVA against random init on their mean learning curves: the samples each needs to reach `target_top1`
    (default: random init's accuracy at the budget, the paper's "same accuracy"), and each one's accuracy at the
    budget (the curves' last common point)."""
    curves = {name: mean_curve(rows.get(name, [])) for name in ("random-lamb", "eva-lamb")}
    if not all(curves.values()):
        return None
    budget = min(curve[-1][0] for curve in curves.values())
    at_budget = {name: next(m for s, m, _ in curve if s == budget) for name, curve in curves.items()
                 if any(s == budget for s, _, _ in curve)}
    target = target_top1 if target_top1 is not None else at_budget.get("random-lamb")
    if target is None:
        return None
    needed = {name: samples_to_reach(curve, target) for name, curve in curves.items()}
    ratio = needed["eva-lamb"] / needed["random-lamb"] if needed["eva-lamb"] and needed["random-lamb"] else None
    return {"target_top1": target, "target": "given" if target_top1 is not None else "random init at the budget",
            "budget_samples": budget, "samples_to_target": needed, "top1_at_budget": at_budget, "ratio": ratio}


def table(summary: dict) -> str:
    """Markdown: one line per row (mean ± standard deviation over seeds), then what is missing."""
    lines = ["| row | lr | seeds | zero-shot top-1 (%) | top-5 (%) | training (s) | samples/s | paper |",
             "|---|---|---|---|---|---|---|---|"]
    for row in summary["rows"]:
        lr = row["config"]["lr"]
        lines.append(f"| {row['label']} | {f'{lr:g}' if lr else '-'} | {len(row['seeds'])}/{len(summary['seeds'])} | "
                     f"{_pm(row['zeroshot_top1'], 100)} | {_pm(row['zeroshot_top5'], 100)} | "
                     f"{_pm(row['wall_seconds'], 1, 0)} | {_pm(row['samples_per_s'], 1, 1)} | {row['paper'] or ''} |")
    text = "\n".join(lines) + "\n"
    eva = summary.get("eva_samples")
    if eva:
        needed = eva["samples_to_target"]
        reach = ", ".join(f"{name} {'not within the budget' if n is None else f'{n:.0f}'}" for name, n in needed.items())
        budget = ", ".join(f"{name} {100 * top1:.1f}%" for name, top1 in eva["top1_at_budget"].items())
        ratio = f" (EVA/random {eva['ratio']:.2f}x)" if eva["ratio"] else ""
        text += (f"\nLearning curves (first {summary['scale'].get('curve_samples')} test images): samples to reach "
                 f"{100 * eva['target_top1']:.1f}% ({eva['target']}): {reach}{ratio}; "
                 f"top-1 at the budget of {eva['budget_samples']} samples: {budget}.\n")
    if summary.get("failed"):
        text += f"\n**Failed cells** ({len(summary['failed'])}): {'; '.join(summary['failed'])}.\n"
    if summary["missing"]:
        text += f"\n**Missing cells** ({len(summary['missing'])}): {', '.join(summary['missing'])}.\n"
    return text


def _pm(stats: Optional[dict], scale: float, digits: int = 1) -> str:
    if not stats:
        return "-"
    return f"{scale * stats['mean']:.{digits}f} ± {scale * stats['std']:.{digits}f}"


def plot_curves(rows: dict[str, list[Cell]], path: Path) -> Optional[Path]:
    """Zero-shot top-1 against samples seen, mean ± one standard deviation over seeds, for the rows with curves."""
    curves = {name: mean_curve(cells) for name, cells in rows.items() if any(c.curve for c in cells)}
    curves = {name: curve for name, curve in curves.items() if curve}
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        samples, mean, std = zip(*curve, strict=True)
        ax.plot(samples, [100 * m for m in mean], marker="o", label=f"{ARMS_BY_NAME[name].label} ({len(rows[name])} seeds)")
        ax.fill_between(samples, [100 * (m - s) for m, s in zip(mean, std, strict=True)], [100 * (m + s) for m, s in zip(mean, std, strict=True)],
                        alpha=0.2)
    ax.set_xlabel("samples seen")
    ax.set_ylabel("zero-shot top-1 (%), curve subset")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
