"""The paper's ablation at the scale of the given params, as a Prefect flow (`make ablation`).

    python -m flows.ablation                        # params.yaml, seeds 0 and 1, EVA from the champion
    evaclip ablation -s train.steps=60              # the same from the CLI

EVA initialization needs EVA weights: `eva_checkpoint`, or else a fresh EVA pre-trained (masked image
modelling) from the registry's champion, as the pipeline's bootstrap does. Every (row, seed) is one MLflow
run in the experiment `<tracking.experiment>-ablation`; the table goes to a Prefect Markdown artifact, to
MLflow (a summary run's `ablation.md`) and to `<output_dir>/table.md`.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Optional

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from pydantic import Field

from evaclip import project
from evaclip.ablation import ROWS, RowResult, row_params, table
from evaclip.config import Params, load_params
from evaclip.errors import ConfigError
from evaclip.eval import evaluate
from evaclip.init import initialize
from evaclip.tracking import log_ablation_table, log_run
from evaclip.train import launch
from flows.pipeline import PipelineParameters, base_file, find_teacher, overrides_of

# Rows are experiments beside the pipeline, each in its own output folders: library calls, not dvc.yaml's
# stages (which hold one run of the project).


@task
def initialize_weights(params: Params) -> None:
    initialize(params)


@task
def train_model(params: Params, stage: str = "train") -> Path:
    return launch(params, on_output=get_run_logger().info, stage=stage)


@task
def evaluate_and_log(params: Params) -> dict:
    record = log_run(params, evaluate(params, progress=False))
    return {"metrics": record.metrics, "parent_run_id": record.parent_run_id}


class AblationParameters(PipelineParameters):
    seeds: list[int] = Field(default_factory=lambda: [0, 1], description="each row runs once per seed")
    rows: list[int] = Field(default_factory=lambda: [r.number for r in ROWS], description="which rows (1-6)")
    eva_checkpoint: Optional[str] = Field(None, description="EVA weights for rows 2-6; default: pre-train from the champion")
    output_dir: str = Field("outputs/ablation", description="where every row's outputs and the table go")


@flow(name="evaclip-ablation", log_prints=True)
def ablation(parameters: AblationParameters = AblationParameters()) -> dict:
    root_dir = project.require_root()
    with contextlib.chdir(root_dir):  # the project's paths (params, MLflow store) are relative to it
        return run_rows(parameters, root_dir)


def run_rows(parameters: AblationParameters, root_dir: Path) -> dict:
    logger = get_run_logger()
    base = load_params(base_file(parameters, root_dir) or root_dir / "params.yaml", overrides_of(parameters))
    root = Path(parameters.output_dir)
    rows = [r for r in ROWS if r.number in parameters.rows]
    eva = eva_weights(base, parameters, root) if any(r.eva_init for r in rows) else None
    results: list[RowResult] = []
    for row in rows:
        for seed in parameters.seeds:
            params = row_params(base, row, seed, eva, root)
            logger.info(f"row {row.number} ({row.name}), seed {seed}")
            initialize_weights(params)
            started = time.perf_counter()
            train_model(params)
            result = RowResult(row, seed, time.perf_counter() - started)
            if row.evaluate:
                record = evaluate_and_log(params)
                result.metrics, result.run_id = record["metrics"], record["parent_run_id"]
            results.append(result)
    markdown = (f"# EVA-CLIP ablation: {base.model.name}, {base.train.steps} steps x {base.train.global_batch_size} "
                f"samples per row, seeds {parameters.seeds}\n\n{table(results)}")
    root.mkdir(parents=True, exist_ok=True)
    (root / "table.md").write_text(markdown)
    create_markdown_artifact(markdown=markdown, key="evaclip-ablation", description="EVA-CLIP ablation")
    log_ablation_table(row_params(base, rows[0], parameters.seeds[0], eva, root), markdown)
    return {"table": markdown, "results": [{"row": r.row.number, "seed": r.seed, "train_seconds": r.train_seconds,
                                            "metrics": r.metrics} for r in results]}


def eva_weights(base: Params, parameters: AblationParameters, root: Path) -> Path:
    if parameters.eva_checkpoint:
        return Path(parameters.eva_checkpoint)
    teacher = find_teacher(base)
    if teacher is None:
        raise ConfigError("ablation: rows 2-6 need EVA weights: pass eva_checkpoint, or run the pipeline once "
                          "so that the registry has a champion to pre-train a fresh EVA from")
    params = base.model_copy(update={"pretrain": base.pretrain.model_copy(
        update={"teacher": teacher, "output_dir": root / "pretrain"})})
    return train_model(params, stage="pretrain")


if __name__ == "__main__":
    print(ablation()["table"])
