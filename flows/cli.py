"""The `evaclip` command: the library's verbs (evaclip/cli.py) plus those that start Prefect flows.

The library never imports Prefect or flows/: the verbs that run a flow live here, with the flows.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from evaclip.cli import ParamsOpt, ProfileOpt, SetOpt, _load, _reports_errors, app, out
from evaclip.config import Params


@app.command()
@_reports_errors
def pipeline(params: ParamsOpt = Path("params.yaml"), profile: ProfileOpt = None, set_: SetOpt = None,
             force: Annotated[bool, typer.Option(help="Run every stage, even those whose inputs did not change.")] = False,
             bootstrap: Annotated[bool, typer.Option(
                 help="EVA-02's loop: pre-train a fresh EVA from the registry's champion and start from it.")] = False):
    """Run dvc.yaml's stages as the Prefect flow `evaclip-pipeline`, then promote the model if it is better.

    Overrides (-s) are written to params.yaml for this run, so dvc.lock records them; the next run starts
    from the file as you left it. Stages whose code, parameters and inputs did not change are skipped.
    Without a Prefect server (PREFECT_API_URL) it runs on a temporary local one.
    """
    from flows.pipeline import PipelineParameters
    from flows.pipeline import pipeline as pipeline_flow

    cfg = _load(params, profile, set_)  # fail on a bad configuration before Prefect starts
    summary = pipeline_flow(PipelineParameters(params_file=str(params), profile=profile, overrides=set_ or [],
                                               force=force, bootstrap=bootstrap))
    _print_summary(cfg, summary)


def _print_summary(cfg: Params, summary: dict) -> None:
    import os

    from rich.table import Table

    from evaclip.tracking.store import tracking_uri

    table = Table(title="evaclip pipeline", title_justify="left")
    for column in ("stage", "status", "seconds"):
        table.add_column(column)
    for stage, report in summary["stages"].items():
        table.add_row(stage, "skipped (unchanged)" if report["skipped"] else "ran", f"{report['seconds']:.1f}")
    out.print(table)
    metrics, decision, refs = summary["metrics"], summary["decision"], summary["dvc"]
    if summary.get("teacher"):
        out.print(f"EVA pre-trained from {summary['teacher']}", highlight=False)
    if "zeroshot_top1" in metrics:
        out.print(f"zero-shot top-1: {metrics['zeroshot_top1']:.3f}", highlight=False)
    out.print(escape(f"{decision['name']} v{decision['version']}: "
                     f"{'promoted' if decision['promoted'] else 'not promoted'} ({decision['reason']})"),
              highlight=False)
    if refs.get("dvc.experiment"):
        out.print(f"DVC experiment {refs['dvc.experiment']}: dvc exp apply {refs['dvc.experiment']} && dvc repro",
                  highlight=False)
    uri = tracking_uri(cfg)
    prefect_api = os.environ.get("PREFECT_API_URL")
    out.print("Open the UIs:", highlight=False)
    if prefect_api:
        out.print(f"  Prefect: {prefect_api.removesuffix('/api')}", highlight=False)
    else:
        home = os.environ.get("PREFECT_HOME", "~/.prefect")
        out.print(f"  Prefect: PREFECT_HOME={home} prefect server start --host 127.0.0.1  "
                  "# then http://127.0.0.1:4200", highlight=False, soft_wrap=True)
    if uri.startswith(("http://", "https://")):
        out.print(f"  MLflow:  {uri}", highlight=False)
    else:
        out.print(f"  MLflow:  mlflow ui --backend-store-uri {uri} --host 127.0.0.1  # then http://127.0.0.1:5000",
                  highlight=False, soft_wrap=True)


@app.command()
@_reports_errors
def ablation(params: ParamsOpt = Path("params.yaml"), profile: ProfileOpt = None, set_: SetOpt = None,
             seeds: Annotated[str, typer.Option(help="Comma-separated seeds; each row runs once per seed.")] = "0,1,2",
             arms: Annotated[Optional[str], typer.Option(help="Comma-separated rows (default: all).")] = None,
             steps: Annotated[int, typer.Option(help="Training steps per row (samples seen: x the batch).")] = 120,
             teacher: Annotated[Optional[Path], typer.Option(help="CLIP weights to pre-train the EVA from "
                                                                   "(default: train a teacher).")] = None,
             eva: Annotated[Optional[Path], typer.Option(help="EVA weights for the EVA rows (skips the teacher and "
                                                              "pre-training).")] = None,
             max_new_cells: Annotated[Optional[int], typer.Option(help="Train at most this many new cells now; "
                                                                       "run again to go on.")] = None,
             results: Annotated[Optional[Path], typer.Option(help="Also write the report's JSON here.")] = None):
    """The EVA-CLIP paper's claims at this configuration's scale, as the Prefect flow `evaclip-ablation`.

    EVA init against random init (learning curves), LAMB against AdamW (each at its own swept learning rate),
    token masking 0 / 0.5 / 0.75 with and without unmasked tuning, sdpa against math attention (time). Cells
    already finished in MLflow are not run again. Writes outputs/ablation/ (table.md, ablation.json, curves.png).
    """
    from flows.ablation import AblationParameters
    from flows.ablation import ablation as ablation_flow

    _load(params, profile, set_)
    fields = {"arms": arms.split(",")} if arms else {}
    result = ablation_flow(AblationParameters(
        params_file=str(params), profile=profile, overrides=set_ or [], seeds=[int(s) for s in seeds.split(",")],
        steps=steps, teacher=str(teacher) if teacher else None, eva_checkpoint=str(eva) if eva else None,
        max_new_cells=max_new_cells, results_file=str(results) if results else None, **fields))
    out.print(result["table"], highlight=False)


def main() -> None:
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    main()
