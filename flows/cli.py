"""The `evaclip` command: the library's verbs (evaclip/cli.py) plus those that start Prefect flows.

The library never imports Prefect or flows/: the verbs that run a flow live here, with the flows.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from evaclip.cli import ParamsOpt, ProfileOpt, SetOpt, _load, _reports_errors, app, out
from evaclip.config import Params
from evaclip.errors import EvaclipError
from evaclip.process import skip_final_collection


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
    cfg = _load(params, profile, set_)  # fail on a bad configuration before Prefect starts
    with _prefect_api() as api:
        from flows.pipeline import PipelineParameters
        from flows.pipeline import pipeline as pipeline_flow

        with api.ready(meanwhile=lambda: _warm_up(cfg)):
            summary = pipeline_flow(PipelineParameters(params_file=str(params), profile=profile,
                                                       overrides=set_ or [], force=force, bootstrap=bootstrap))
    _print_summary(cfg, summary)


@contextlib.contextmanager
def _prefect_api():
    """The flows' Prefect API: the configured server (PREFECT_API_URL), else a temporary local one for this command.

    Prefect would start that one itself as the flow starts (its ephemeral mode): it imports its whole server
    into this process first (3 s here), then waits for the server process (7 s; 13 s on a new PREFECT_HOME,
    which it migrates). Started here the way Prefect starts it (uvicorn on its app factory, UI off, ephemeral
    settings), it comes up while this process imports the flow's libraries; `with api.ready():` then waits for
    it and points Prefect at it. Stopped when this process exits, as Prefect stops it: after Prefect's own exit
    handlers have sent the last logs and events.

        with _prefect_api() as api:
            from flows.pipeline import pipeline     # meanwhile, the server starts
            with api.ready():
                pipeline()
    """
    from prefect.settings import PREFECT_API_URL

    yield _ConfiguredPrefectServer() if PREFECT_API_URL.value() else _TemporaryPrefectServer()


def _warm_up(cfg: Params) -> None:
    """While a temporary Prefect server starts (its own process, on the other core), what the flow would do after
    it: import the libraries of the stages it runs in this process (torch, open_clip, DVC) and create a local
    MLflow store (its migrations)."""
    with contextlib.suppress(Exception):  # only a head start: the flow meets, and reports, any problem itself
        import dvc.repo  # noqa: F401

        import evaclip.data.prepare  # noqa: F401
        import evaclip.init  # noqa: F401
        import evaclip.train.launch  # noqa: F401
        from evaclip import project
        from evaclip.tracking.store import tracking_uri

        with contextlib.chdir(project.require_root()):  # where the flow resolves the store's path
            uri = tracking_uri(cfg)
            if uri.startswith("sqlite:"):
                from mlflow.tracking import MlflowClient

                MlflowClient(uri).search_experiments(max_results=1)


class _ConfiguredPrefectServer:
    def ready(self, meanwhile=None):
        return contextlib.nullcontext()


class _TemporaryPrefectServer:
    """prefect.server.api.server.SubprocessASGIServer's process, without importing the server here."""

    def __init__(self):
        self.process = self._start()
        atexit.register(self.stop)  # first registered, last run

    def _start(self):
        import socket
        import subprocess

        with contextlib.closing(socket.socket()) as probe:  # a free port (Prefect draws one, and retries too)
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        env = dict(os.environ, PREFECT_UI_ENABLED="0", PREFECT__SERVER_EPHEMERAL="1", PREFECT__SERVER_FINAL="1")
        return subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app",
                                 "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "error",
                                 "--lifespan", "on"], env=env)

    @contextlib.contextmanager
    def ready(self, meanwhile: Optional[Callable[[], None]] = None):
        """Wait until the server answers (doing `meanwhile` first), then point Prefect at it."""
        import httpx
        from prefect.settings import (
            PREFECT_API_URL,
            PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
            temporary_settings,
        )

        timeout = PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
        deadline = time.monotonic() + timeout
        if meanwhile:
            meanwhile()
        restarted = False
        while True:
            url, code = f"http://127.0.0.1:{self.port}/api", self.process.poll()
            if code == 3 and not restarted:  # uvicorn could not start: the port, taken meanwhile? Once more
                self.process, restarted = self._start(), True
                continue
            if code is not None:
                raise EvaclipError(f"the temporary Prefect server exited (code {code}) before it answered; its "
                                   "output is above. Or point PREFECT_API_URL at a running server (make serve)")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise EvaclipError(f"the temporary Prefect server on {url} did not answer within {timeout:.0f} s "
                                   "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS). Or point PREFECT_API_URL "
                                   "at a running server (make serve)")
            time.sleep(0.1)
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield

    def stop(self) -> None:
        import subprocess

        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


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
    _load(params, profile, set_)
    fields = {"arms": arms.split(",")} if arms else {}
    with _prefect_api() as api:
        from flows.ablation import AblationParameters
        from flows.ablation import ablation as ablation_flow

        with api.ready():
            result = ablation_flow(AblationParameters(
                params_file=str(params), profile=profile, overrides=set_ or [], seeds=[int(s) for s in seeds.split(",")],
                steps=steps, teacher=str(teacher) if teacher else None, eva_checkpoint=str(eva) if eva else None,
                max_new_cells=max_new_cells, results_file=str(results) if results else None, **fields))
    out.print(result["table"], highlight=False)


def main() -> None:
    skip_final_collection()
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    main()
