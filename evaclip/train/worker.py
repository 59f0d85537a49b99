"""Entry point of each training process (what `torchrun` / `deepspeed` start): `train(params)`."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from ..config import load_params
from ..errors import EvaclipError
from .callbacks import MetricsFile, ProgressBar
from .engine import train

ERROR_FILE = "error.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="one evaclip training process (started by a launcher)")
    parser.add_argument("--params", required=True, type=Path)
    parser.add_argument("--local_rank", type=int, default=None)  # the deepspeed launcher passes it
    args = parser.parse_args(argv)
    params = load_params(args.params)
    # torch deprecation notices from inside open_clip's loss and DeepSpeed, once per step and rank.
    warnings.filterwarnings("ignore", category=FutureWarning)
    callbacks = [ProgressBar(every=params.train.log_every), MetricsFile(Path(params.train.output_dir) / "metrics.jsonl")]
    if params.eval.every_n_steps and os.environ.get("RANK", "0") == "0":
        from ..eval import PeriodicEvaluation

        callbacks.insert(0, PeriodicEvaluation(params))  # before MetricsFile, which records what it adds
    try:
        result = train(params, callbacks)
    except EvaclipError as err:
        print(f"error: {err}", file=sys.stderr)
        if os.environ.get("RANK", "0") == "0":  # the launcher re-raises it with its exit code
            error_file = Path(params.train.output_dir) / ERROR_FILE
            error_file.write_text(json.dumps({"exit_code": err.exit_code, "message": str(err)}))
        return err.exit_code
    if os.environ.get("RANK", "0") == "0":
        print(f"trained {result.steps} steps ({result.samples_seen} samples): {result.model_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
