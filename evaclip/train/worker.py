"""Entry point of each training process (what `torchrun` / `deepspeed` start): `train(params)`.

`run_worker` is shared with `evaclip.pretrain.worker`: arguments, callbacks, and the error file through
which rank 0 hands a known error's exit code to the launcher.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from ..config import load_params
from ..errors import EvaclipError
from ..process import skip_final_collection
from .callbacks import MetricsFile, ProgressBar
from .launch import stage_output_dir

ERROR_FILE = "error.json"


def run_worker(run, stage: str, argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=f"one evaclip {stage} process (started by a launcher)")
    parser.add_argument("--params", required=True, type=Path)
    parser.add_argument("--local_rank", type=int, default=None)  # the deepspeed launcher passes it
    args = parser.parse_args(argv)
    skip_final_collection()
    params = load_params(args.params)
    out = stage_output_dir(params, stage)
    # torch deprecation notices from inside open_clip's loss and DeepSpeed, once per step and rank.
    warnings.filterwarnings("ignore", category=FutureWarning)
    callbacks = [ProgressBar(every=params.train.log_every, desc=stage), MetricsFile(out / "metrics.jsonl")]
    if stage == "train" and params.eval.every_n_steps and os.environ.get("RANK", "0") == "0":
        from ..eval import PeriodicEvaluation

        callbacks.insert(0, PeriodicEvaluation(params))  # before MetricsFile, which records what it adds
    if params.tracking.enabled and os.environ.get("RANK", "0") == "0":
        from ..tracking.live import MlflowLogger  # the launcher's run (tracking/live.py), if it opened one

        callbacks.append(MlflowLogger(stage, out=out, flush_timeout_s=params.tracking.flush_timeout_s))
    try:
        result = run(params, callbacks)
    except EvaclipError as err:
        print(f"error: {err}", file=sys.stderr)
        if os.environ.get("RANK", "0") == "0":  # the launcher re-raises it with its exit code
            (out / ERROR_FILE).write_text(json.dumps({"exit_code": err.exit_code, "message": str(err)}))
        return err.exit_code
    if os.environ.get("RANK", "0") == "0":
        print(f"{stage}: {result.steps} steps done: {getattr(result, 'model_path', None) or result.checkpoint}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from .engine import train

    return run_worker(train, "train", argv)


if __name__ == "__main__":
    sys.exit(main())
