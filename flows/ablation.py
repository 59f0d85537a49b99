"""The paper's claims tested with this pipeline, as a Prefect flow (`make ablation`, `evaclip ablation`).

    python -m flows.ablation                         # the whole study at its default scale (about 3 h, 2 CPU cores)
    evaclip ablation --max-new-cells 4               # at most 4 new training runs now; run again to go on

The study, in order (`evaclip/ablation.py` says what each cell changes):
1. a teacher CLIP, the base recipe trained `teacher_steps` (several students' worth), unless `teacher` is given;
2. a fresh EVA pre-trained from it (masked image modelling) at each of `pretrain_steps`, each probed by one
   EVA-init LAMB run; the best length's EVA initializes every EVA row (`eva_checkpoint` skips 1-2);
3. a learning-rate sweep per optimizer (EVA init, seed 0), the best rate then used by that optimizer's rows;
4. the rows, once per seed; 5. the report: table, learning curves (PNG), JSON, in MLflow, the Prefect
   artifact, `output_dir/` and, with `results_file`, `benchmarks/results/ablation.json`.

Every cell is one MLflow run in `<tracking.experiment>-ablation`, tagged with a digest of its configuration: an
invocation runs only cells not finished yet, so the study can be completed over several invocations, and the
report of a partial study names the missing cells. Rows are experiments beside the pipeline, each in its own
folder: library calls, not dvc.yaml's stages (which hold one run of the project).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import platform
import subprocess
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Optional

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from pydantic import Field

from evaclip import project
from evaclip.ablation import (
    ARMS,
    ARMS_BY_NAME,
    TUNING_SEED,
    Cell,
    arm_params,
    best_lr,
    cell_key,
    plot_curves,
    pretrain_params,
    run_cell,
    summarize,
    table,
    teacher_params,
)
from evaclip.cli import invoke
from evaclip.config import Params, load_params
from evaclip.errors import ConfigError
from flows.pipeline import PipelineParameters, base_file, overrides_of


class AblationParameters(PipelineParameters):
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], description="each row runs once per seed")
    arms: list[str] = Field(default_factory=lambda: [a.name for a in ARMS], description="which rows")
    steps: int = Field(120, gt=0, description="training steps of every row (the base's batch and warmup share)")
    teacher: Optional[str] = Field(None, description="CLIP weights to pre-train the EVA from; default: train one")
    teacher_steps: int = Field(600, gt=0, description="the teacher's training steps")
    pretrain_steps: list[int] = Field(default_factory=lambda: [100, 400],
                                      description="pre-training lengths to compare; the best one initializes the rows")
    eva_checkpoint: Optional[str] = Field(None, description="EVA weights for the EVA rows (skips teacher and pre-training)")
    lamb_lrs: list[float] = Field(default_factory=lambda: [7e-4, 2e-3, 6e-3], description="LAMB's sweep")
    # AdamW's best was its lowest rate in a first study (3e-4 of 3e-4 / 1e-3 / 3e-3): the grid goes one lower.
    adamw_lrs: list[float] = Field(default_factory=lambda: [1e-4, 3e-4, 1e-3, 3e-3], description="AdamW's sweep")
    curve_every: int = Field(30, gt=0, description="steps between the learning curve's evaluations")
    curve_samples: Optional[int] = Field(2000, gt=0, description="the curve's evaluations: first N test images")
    timing_steps: int = Field(20, gt=0, description="steps of the attention rows (time only)")
    target_top1: Optional[float] = Field(None, gt=0, le=1, description="the accuracy whose samples EVA and random init "
                                         "are compared at (default: random init's at the budget)")
    max_new_cells: Optional[int] = Field(None, ge=0, description="train at most this many new cells now")
    output_dir: str = Field("outputs/ablation", description="every cell's outputs and the report")
    results_file: Optional[str] = Field(None, description="also write the report's JSON here")


@task
def prepare_data(root: Path) -> None:
    """The project's data, as the pipeline makes it: dvc.yaml's stages up to `prepare` (skipped when current)."""
    for name, target in project.stages(root).items():
        project.reproduce(root, target, on_output=get_run_logger().info, run_verb=invoke)
        if name == "prepare":
            return


@task
def run_study_cell(params: Params, cell: Cell, stage: str) -> Cell:
    from evaclip.tracking.ablation import cell_run, record_cell

    with cell_run(params, cell) as run_id:
        cell.run_id = run_id
        run_cell(params, cell, stage, on_output=get_run_logger().info)
        record_cell(params, cell, params.pretrain.output_dir if stage == "pretrain" else params.train.output_dir)
    return cell


class Cells:
    """The study's cells: those MLflow holds as finished, and new ones, at most `budget` of them this time.

    A cell's key covers its params, the keys of the cells whose weights it starts from, and the data's identity
    (`common`). A cell that fails is reported and the study goes on with what does not depend on it."""

    def __init__(self, base: Params, out: Path, budget: Optional[int], common: dict[str, str]):
        from evaclip.tracking.ablation import finished_cells

        self.out, self.budget, self.common, self.new, self.failed = out, budget, common, 0, []
        self.done = finished_cells(base)
        get_run_logger().info(f"{len(self.done)} finished cells in MLflow")

    def get(self, build: Callable[[Path], Params], kind: str, arm: str, seed: int, inputs: dict[str, str],
            stage: str = "train", needs: Callable[[], bool] = lambda: True) -> Optional[Cell]:
        """The cell that `build(folder)` describes: found finished, or run now (after `needs()`, which makes sure
        the weights it starts from are on disk), or None (out of budget, or it failed)."""
        key = cell_key(build(self.out / "cells" / "pending"), kind, {**inputs, **self.common})
        if key in self.done:
            return self.done[key]
        if self.budget is not None and self.new >= self.budget:
            return None
        self.new += 1
        return self._run(build, Cell(kind, arm, seed, 0.0, key), stage) if needs() else None

    def weights(self, cell: Optional[Cell], build: Callable[[Path], Params], stage: str = "train",
                needs: Callable[[], bool] = lambda: True) -> bool:
        """Whether a finished teacher's or EVA's weights are on disk; run it again if they are not (the key
        stays the same, and so do the cells that start from it)."""
        if cell is None:
            return False
        if cell.weights and Path(cell.weights).is_file():
            return True
        get_run_logger().warning(f"{cell.kind} {cell.key}: weights {cell.weights} are gone, training it again")
        return needs() and self._run(build, cell, stage) is not None

    def _run(self, build: Callable[[Path], Params], cell: Cell, stage: str) -> Optional[Cell]:
        params = build(self.out / "cells" / cell.key)
        cell.lr = params.train.lr
        try:
            cell = run_study_cell.with_options(name=f"{cell.kind}-{cell.arm}-seed{cell.seed}")(params, cell, stage)
        except Exception as error:  # noqa: BLE001 - reported with the study; the cells that do not need it go on
            get_run_logger().error(f"{cell.kind} {cell.arm} seed {cell.seed} failed: {error}")
            self.failed.append(f"{cell.kind} {cell.arm} seed {cell.seed}: {str(error).splitlines()[0][:200]}")
            return None
        self.done[cell.key] = cell
        return cell


@flow(name="evaclip-ablation", log_prints=True)
def ablation(parameters: AblationParameters = AblationParameters()) -> dict:
    root = project.require_root()
    with contextlib.chdir(root):  # the project's paths (params, MLflow store) are relative to it
        return run_study(parameters, root)


def run_study(p: AblationParameters, root: Path) -> dict:
    unknown = sorted(set(p.arms) - set(ARMS_BY_NAME))
    if unknown:
        raise ConfigError(f"ablation: unknown rows {unknown}; known: {', '.join(ARMS_BY_NAME)}")
    base = load_params(base_file(p, root) or root / "params.yaml", overrides_of(p))
    base = base.model_copy(update={
        "train": base.train.model_copy(update={  # the base's warmup, as a share of the steps
            "steps": p.steps, "warmup_steps": max(1, round(base.train.warmup_steps * p.steps / base.train.steps))}),
        "tracking": base.tracking.model_copy(update={"experiment": f"{base.tracking.experiment}-ablation"})})
    prepare_data(root)
    out = Path(p.output_dir)
    cells = Cells(base, out, p.max_new_cells, data_identity(base))
    arms = [ARMS_BY_NAME[name] for name in p.arms]
    extra: dict = {}
    eva, eva_key = None, None
    needs_eva = any(a.eva_init for a in arms)
    if needs_eva:
        eva, eva_key, extra = eva_weights(p, base, cells)
        extra["eva_key"] = eva_key
    lrs, extra["sweep"] = {}, {}
    for optimizer in sorted({a.optimizer for a in arms if not a.timing}):
        arm = ARMS_BY_NAME[f"eva-{optimizer}"] if needs_eva else replace(ARMS_BY_NAME[f"eva-{optimizer}"], eva_init=False)
        sweep = [cells.get(lambda o, lr=lr, arm=arm: arm_params(base, arm, TUNING_SEED, lr, eva() if arm.eva_init
                                                                else None, o, p.curve_every, p.curve_samples),
                           "run", arm.name, TUNING_SEED, {"eva": eva_key} if arm.eva_init else {},
                           needs=eva.ensure if arm.eva_init else lambda: True) if eva or not arm.eva_init else None
                 for lr in (p.lamb_lrs if optimizer == "lamb" else p.adamw_lrs)]
        extra["sweep"][optimizer] = [{"lr": c.lr, "zeroshot_top1": c.top1} for c in sweep if c]
        if all(sweep):
            lrs[optimizer] = best_lr(sweep)
    rows: dict[str, list[Cell]] = {}
    for arm in arms:
        lr = base.train.lr if arm.timing else lrs.get(arm.optimizer)
        if lr is None or (arm.eva_init and eva is None):
            continue  # its inputs are not finished yet: reported as missing
        for seed in p.seeds:
            cell = cells.get(lambda o, arm=arm, seed=seed, lr=lr: arm_params(
                base, arm, seed, lr, eva() if arm.eva_init else None, o, p.curve_every, p.curve_samples,
                p.timing_steps if arm.timing else None),
                "timing" if arm.timing else "run", arm.name, seed, {"eva": eva_key} if arm.eva_init else {},
                needs=eva.ensure if arm.eva_init else lambda: True)
            if cell:
                rows.setdefault(arm.name, []).append(cell)
    extra["failed"] = cells.failed
    return report(p, base, arms, rows, lrs, extra, out)


def data_identity(base: Params) -> dict[str, str]:
    """What the cells' keys add about the data: the training shards' and the evaluation set's identities."""
    from evaclip.data.evalsets import load_eval_set
    from evaclip.data.loader import data_manifest_version

    evalset = load_eval_set(base.eval.sets[0], base.eval.templates)
    return {"data": data_manifest_version(base.data), "eval": evalset.identity or str(base.eval.sets[0])}


class Weights:
    """A teacher's or EVA's weights: `()` is their path, `ensure()` brings them back if they were deleted."""

    def __init__(self, path: Callable[[], Path], ensure: Callable[[], bool]):
        self._path, self.ensure = path, ensure

    def __call__(self) -> Path:
        return self._path()


def eva_weights(p: AblationParameters, base: Params, cells: Cells) -> tuple[Optional[Weights], Optional[str], dict]:
    """The EVA for the EVA rows: given, or pre-trained from the teacher at the probed length that did best."""
    if p.eva_checkpoint:
        given = Path(p.eva_checkpoint)
        return Weights(lambda: given, given.is_file), _file_digest(given), {"eva": p.eva_checkpoint}
    if p.teacher:
        given = Path(p.teacher)
        teacher = Weights(lambda: given, given.is_file)
        teacher_key, info = _file_digest(given), {"path": p.teacher}
    else:
        def build_teacher(o: Path) -> Params:
            return teacher_params(base, p.teacher_steps, o)

        cell = cells.get(build_teacher, "teacher", "teacher", 0, {})
        if cell is None:
            return None, None, {"teacher": None}
        teacher = Weights(lambda: Path(cell.weights), lambda: cells.weights(cell, build_teacher))
        teacher_key = cell.key
        info = {"steps": p.teacher_steps, "zeroshot_top1": cell.top1, "zeroshot_top5": cell.top5,
                "wall_seconds": round(cell.train_seconds, 1)}
    probes = []
    for steps in p.pretrain_steps:
        def build_eva(o: Path, steps=steps) -> Params:
            return pretrain_params(base, teacher(), steps, o / "pretrain")

        pretrained = cells.get(build_eva, "pretrain", "eva", 0, {"teacher": teacher_key}, stage="pretrain",
                               needs=teacher.ensure)
        eva = pretrained and Weights(lambda c=pretrained: Path(c.weights),
                                     lambda c=pretrained, b=build_eva: cells.weights(c, b, "pretrain", teacher.ensure))
        probe = eva and cells.get(
            lambda o, eva=eva: arm_params(base, ARMS_BY_NAME["eva-lamb"], TUNING_SEED, base.train.lr, eva(), o,
                                          p.curve_every, p.curve_samples),
            "run", "eva-lamb", TUNING_SEED, {"eva": pretrained.key}, needs=eva.ensure)
        probes.append({"pretrain_steps": steps, "wall_seconds": round(pretrained.train_seconds, 1) if pretrained else None,
                       "eva_lamb_top1": probe.top1 if probe else None, "eva": eva, "key": pretrained and pretrained.key})
    extra = {"teacher": info, "pretrain_lengths": [{k: v for k, v in x.items() if k not in ("eva", "key")}
                                                   for x in probes]}
    if not probes or any(x["eva_lamb_top1"] is None for x in probes):
        return None, None, extra
    chosen = max(probes, key=lambda x: (x["eva_lamb_top1"], -x["pretrain_steps"]))
    extra["chosen_pretrain_steps"] = chosen["pretrain_steps"]
    return chosen["eva"], chosen["key"], extra


def _file_digest(path: Path) -> str:
    if not path.is_file():
        raise ConfigError(f"ablation: weight file {path} not found")
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def report(p: AblationParameters, base: Params, arms, rows: dict[str, list[Cell]], lrs: dict[str, float],
           extra: dict, out: Path) -> dict:
    from evaclip.tracking.ablation import log_report

    scale = {"model": base.model.name, "steps": p.steps, "global_batch": base.train.global_batch_size,
             "samples_per_run": p.steps * base.train.global_batch_size, "precision": base.train.precision,
             "devices": base.train.devices, "teacher_steps": p.teacher_steps, "pretrain_steps": p.pretrain_steps,
             "curve_every": p.curve_every, "curve_samples": p.curve_samples, "timing_steps": p.timing_steps,
             "eval_set": str(base.eval.sets[0])}
    summary = summarize(scale, arms, p.seeds, rows, lrs, extra, p.target_top1)
    summary["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    summary["machine"] = {"platform": platform.platform(), "cpus": __import__("os").cpu_count()}
    plot = plot_curves(rows, out / "curves.png")
    markdown = report_markdown(summary, plot)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(markdown)
    (out / "ablation.json").write_text(json.dumps(summary, indent=2) + "\n")
    if p.results_file:
        Path(p.results_file).write_text(json.dumps(summary, indent=2) + "\n")
    log_report(base, markdown, summary, plot)
    create_markdown_artifact(markdown=markdown, key="evaclip-ablation", description="EVA-CLIP ablation")
    return {"table": markdown, "summary": summary}


def report_markdown(summary: dict, plot: Optional[Path]) -> str:
    scale = summary["scale"]
    text = (f"# EVA-CLIP ablation: {scale['model']}, {scale['steps']} steps x {scale['global_batch']} samples per "
            f"row ({scale['precision']}), seeds {summary['seeds']}\n\n{table(summary)}")
    teacher = summary.get("teacher")
    if teacher and teacher.get("zeroshot_top1") is not None:
        best = max((r["zeroshot_top1"]["mean"] for r in summary["rows"] if r["zeroshot_top1"]), default=None)
        text += (f"\nTeacher: the base recipe trained {teacher['steps']} steps, zero-shot top-1 "
                 f"{100 * teacher['zeroshot_top1']:.1f}%"
                 f"{'' if best is None or teacher['zeroshot_top1'] > best else ': NOT stronger than the best row'}.\n")
    for probe in summary.get("pretrain_lengths", []):
        top1 = probe["eva_lamb_top1"]
        text += (f"\nEVA pre-trained {probe['pretrain_steps']} steps: EVA-init LAMB (seed {TUNING_SEED}) "
                 f"{'-' if top1 is None else f'{100 * top1:.1f}%'}.")
    if "chosen_pretrain_steps" in summary:
        text += f" Chosen: {summary['chosen_pretrain_steps']} steps.\n"
    for optimizer, points in summary.get("sweep", {}).items():
        cells = ", ".join(f"{x['lr']:g}: {100 * x['zeroshot_top1']:.1f}%" for x in points)
        text += f"\nSweep {optimizer} (EVA init, seed {TUNING_SEED}): {cells or '-'}; chosen {summary['learning_rates'].get(optimizer, '-')}.\n"
    if plot:
        text += f"\nLearning curves: `{plot}` (and the report run's artifacts in MLflow).\n"
    return text


if __name__ == "__main__":
    print(ablation()["table"])
