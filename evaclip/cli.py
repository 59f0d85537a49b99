"""The `evaclip` command line: one verb per pipeline stage.

Every verb reads the same configuration (`--params params.yaml`, or `--profile NAME` for
a packaged profile, plus repeated `-s key.path=value` overrides) and calls the same library
function that the Prefect flows and `dvc.yaml` call.
"""

from __future__ import annotations

import contextvars
import functools
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from .config import Params, load_params, profile_path
from .errors import EvaclipError
from .process import skip_final_collection

app = typer.Typer(
    help="Train EVA-CLIP models and ship them through a model registry.\n\n"
    "Stages: prepare -> [pretrain] -> init -> train -> evaluate -> promote (or all of them: pipeline).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Show or switch the configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")

out = Console()
err = Console(stderr=True)

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="Params file (DVC tracks params.yaml).")]
ProfileOpt = Annotated[
    Optional[str], typer.Option("--profile", help="Use the packaged profile NAME (evaclip/profiles/) instead of --params, e.g. eva02-clip-b16.")
]
NodeRankOpt = Annotated[Optional[int], typer.Option(
    "--node-rank", help="This node's rank when train.nodes > 1 (default: NODE_RANK or PET_NODE_RANK, else 0).")]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", metavar="KEY=VALUE", help="Override one value, KEY.PATH=VALUE (repeatable), e.g. -s train.lr=1e-3."),
]


def _load(params: Path, profile: Optional[str], overrides: Optional[list[str]]) -> Params:
    path = profile_path(profile) if profile else params
    return load_params(path, overrides or [])


# Set while `invoke` runs a verb in this process (a flow's stage): where output lines go; errors are raised.
_in_process: contextvars.ContextVar[Optional[Callable[[str], None]]] = contextvars.ContextVar("in_process", default=None)


class _LineSink:
    """A text stream that hands each complete line to `on_line` (what rich's consoles write to)."""

    def __init__(self, on_line: Callable[[str], None]):
        self.on_line, self.pending = on_line, ""

    def write(self, text: str) -> int:
        *lines, self.pending = (self.pending + text).split("\n")
        for line in lines:
            self.on_line(line)
        return len(text)

    def flush(self) -> None:
        if self.pending:
            self.on_line(self.pending)
            self.pending = ""

    def isatty(self) -> bool:
        return False


def invoke(argv: list[str], on_output: Callable[[str], None]) -> None:
    """`evaclip ARGV` in this process, as dvc.yaml's stage command would run it in a new one.

    Its output (and its training processes') goes line by line to `on_output`; an error is raised, not
    printed. The flows run stages this way: a new process would import torch again (seconds per stage).
    """
    sink = _LineSink(on_output)
    token = _in_process.set(sink.on_line)
    out.file = err.file = sink
    try:
        code = typer.main.get_command(app).main(argv, prog_name="evaclip", standalone_mode=False)
    finally:
        sink.flush()
        out.file = err.file = None  # back to following sys.stdout / sys.stderr, as created (rich: no file)
        _in_process.reset(token)
    if code:  # a typer.Exit with a code, from a verb's own checks
        raise EvaclipError(f"`evaclip {' '.join(argv)}` exited with code {code}")


def _reports_errors(command):
    """Print an EvaclipError as one clear message (no traceback) and exit with its code."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except EvaclipError as error:
            if _in_process.get():  # the caller (a flow) reports it
                raise
            err.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
            raise typer.Exit(error.exit_code) from None

    return wrapper


@app.command()
@_reports_errors
def prepare(params: ParamsOpt = Path("params.yaml"), profile: ProfileOpt = None, set_: SetOpt = None):
    """Turn the data source (data.source at data.path) into webdataset shards in data.output_dir.

    Writes train/ (and eval/<name> for sources with a test split) with a manifest and a data-quality
    report. dvc.yaml's `prepare` stage runs it, so DVC caches and versions the shards.
    """
    from .data import prepare as prepare_data

    cfg = _load(params, profile, set_)
    result = prepare_data(cfg)
    for name, manifest in result.manifests.items():
        out.print(f"{name}: {manifest['total']} samples in {len(manifest['shards'])} shards")
    for eval_dir in result.eval_dirs:
        out.print(f"evaluation set: {eval_dir}")


@app.command()
@_reports_errors
def init(params: ParamsOpt = Path("params.yaml"), profile: ProfileOpt = None, set_: SetOpt = None):
    """Build the model and load EVA weights into the vision tower and CLIP weights into the text tower.

    Writes init.output_dir/model.safetensors and init_report.json (loaded / new / reshaped / dropped keys).
    Weights that do not fit the architecture fail with the list of mismatches, and nothing is written.
    """
    from .init import initialize

    cfg = _load(params, profile, set_)
    result = initialize(cfg)
    out.print(result.report.table())
    counts = result.report.counts()
    out.print(f"initialized {cfg.model.name}: " + ", ".join(f"{n} {status}" for status, n in counts.items()))
    out.print(f"checkpoint: {result.checkpoint}\nreport:     {result.report_path}")


@app.command()
@_reports_errors
def pretrain(params: ParamsOpt = Path("params.yaml"), profile: ProfileOpt = None, set_: SetOpt = None,
             node_rank: NodeRankOpt = None, if_teacher: Annotated[bool, typer.Option(
                 "--if-teacher", help="Without pretrain.teacher, record that there is none instead of failing "
                                      "(dvc.yaml's stage).")] = False):
    """EVA weights by masked image modelling against a CLIP teacher's features (pretrain.teacher).

    Writes pretrain.output_dir/eva.safetensors (an EVA MIM checkpoint) and logs the run to MLflow;
    then `-s init.vision=outputs/pretrain/eva.safetensors` starts the next EVA-CLIP from it.
    """
    import json

    from .checkpoint import atomic_write_text

    cfg = _load(params, profile, set_)
    if if_teacher and not cfg.pretrain.teacher:
        note = "pretrain.teacher is not set: nothing to pre-train; init.vision decides where the vision tower starts"
        atomic_write_text(Path(cfg.pretrain.output_dir) / "status.json", json.dumps({"teacher": None, "note": note}) + "\n")
        out.print(note)
        return
    from .tracking.store import run_id_of  # torch, DeepSpeed and MLflow: seconds of imports a no-op skips
    from .train import launch

    checkpoint = launch(cfg, stage="pretrain", node_rank=node_rank, on_output=_in_process.get())
    run_id = run_id_of(checkpoint.parent)
    out.print(f"EVA checkpoint: {checkpoint} (MLflow run {run_id})")
    out.print(f"initialize from it: evaclip init -s init.vision={checkpoint}")


@app.command()
@_reports_errors
def train(params: ParamsOpt = Path("params.yaml"), profile: ProfileOpt = None, set_: SetOpt = None,
          node_rank: NodeRankOpt = None):
    """Train with DeepSpeed (ZeRO-1, LAMB, token masking) from the initialized checkpoint.

    Starts train.devices processes (torchrun or the deepspeed launcher); resumes from the latest
    checkpoint in train.output_dir; writes train.output_dir/model.safetensors and metrics.jsonl.
    Several nodes (train.nodes): run it on each with its --node-rank; they meet at train.rdzv_endpoint.
    """
    from .train import launch

    cfg = _load(params, profile, set_)
    model_path = launch(cfg, node_rank=node_rank, on_output=_in_process.get())
    out.print(f"trained model: {model_path}")


@app.command()
@_reports_errors
def evaluate(params: ParamsOpt = Path("params.yaml"), profile: ProfileOpt = None, set_: SetOpt = None):
    """Zero-shot classification (class names x prompt templates) and retrieval on the evaluation sets.

    Writes eval.output_dir (metrics.json, per-class CSV, confusion matrix PNG) and logs the pipeline's
    runs and the model (an MLflow pyfunc) to the tracking store.
    """
    from .eval import evaluate as run_evaluation

    cfg = _load(params, profile, set_)
    result = run_evaluation(cfg, progress=_in_process.get() is None)  # no bar in a flow's log
    for set_result in result.sets:
        shown = ", ".join(f"{k} {v:.3f}" for k, v in set_result.metrics.items() if k != "samples")
        out.print(f"{set_result.name}: {shown}")
    if "zeroshot_top1" in result.metrics:
        out.print(f"zero-shot top-1: {result.metrics['zeroshot_top1']:.3f}")
    if not cfg.tracking.enabled:
        out.print("tracking.enabled is false: nothing logged to MLflow")
        return
    from .tracking import log_run

    record = log_run(cfg, result)
    out.print(f"MLflow: run {record.eval_run_id} ({record.tracking_uri}), model {record.model_uri}")


@app.command()
@_reports_errors
def promote(params: ParamsOpt = Path("params.yaml"), profile: ProfileOpt = None, set_: SetOpt = None):
    """Register the evaluated model in MLflow; move the `champion` alias only if it is better."""
    import json

    from .tracking import RECORD, TrackingRecord, register_and_promote

    cfg = _load(params, profile, set_)
    record_file = Path(cfg.eval.output_dir) / RECORD
    if not record_file.is_file():
        raise EvaclipError(f"{record_file} not found: run `evaclip evaluate` first")
    decision = register_and_promote(cfg, TrackingRecord(**json.loads(record_file.read_text())))
    verdict = "promoted to champion" if decision.promoted else "not promoted"
    out.print(f"{decision.name} version {decision.version}: {verdict} ({decision.reason}); "
              f"champion: version {decision.champion}")


@app.command()
@_reports_errors
def export(
    checkpoint: Annotated[Path, typer.Argument(help="A model checkpoint (e.g. outputs/init/model.safetensors).")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder to write the open_clip model into.")] = Path(
        "outputs/export"
    ),
    name: Annotated[Optional[str], typer.Option(help="Model name in the config (default: MODEL-PROFILE).")] = None,
    params: ParamsOpt = Path("params.yaml"),
    profile: ProfileOpt = None,
    set_: SetOpt = None,
):
    """Write a checkpoint as an open_clip model (config JSON + safetensors weights).

    Load it with open_clip.create_model_and_transforms("local-dir:OUT").
    """
    from .export import export_open_clip

    cfg = _load(params, profile, set_)
    result = export_open_clip(cfg, checkpoint, out_dir, name)
    out.print(f"exported {result.model_name} to {result.directory}")
    out.print(f'load it with: open_clip.create_model_and_transforms("local-dir:{result.directory}")')


@config_app.command("show")
@_reports_errors
def config_show(params: ParamsOpt = Path("params.yaml"), profile: ProfileOpt = None, set_: SetOpt = None):
    """Print the resolved configuration (after --profile and -s overrides) as YAML."""
    import yaml

    cfg = _load(params, profile, set_)
    out.print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="", highlight=False)


@config_app.command("use")
@_reports_errors
def config_use(
    profile: Annotated[str, typer.Argument(help="A packaged profile (evaclip/profiles/), e.g. eva02-clip-b16.")],
    params: ParamsOpt = Path("params.yaml"),
):
    """Make a profile the active params file (what DVC and the pipeline read)."""
    source = profile_path(profile)
    load_params(source)  # never install a profile that does not validate
    if params.exists():
        backup = params.with_suffix(params.suffix + ".bak")
        shutil.copyfile(params, backup)
        out.print(f"previous {params} kept as {backup}")
    shutil.copyfile(source, params)
    out.print(f"{params} now holds profile {profile!r}")


def main() -> None:  # pragma: no cover - `python -m evaclip.cli` (dvc.yaml's stages)
    skip_final_collection()
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    main()
