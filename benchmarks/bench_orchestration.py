"""What Prefect + MLflow + DVC add to a pipeline run: the Prefect flow (`evaclip pipeline`: an ephemeral
Prefect API, each stage through `dvc repro`, MLflow logging, a DVC experiment, registration and promotion)
against the same stages called directly as library functions (prepare, init, train, evaluate; no Prefect,
no DVC, no MLflow). Each variant runs in its own fresh clone of this checkout (the flow writes params.yaml
and dvc.lock there, never here), as fresh processes, alternately; wall time including interpreter start.

The overhead is mostly fixed (Prefect's local API start, MLflow's model logging, DVC's hashing), so its
fraction shrinks with the run: besides the measured fraction at `--steps`, the JSON has the fraction
projected onto the full demo (params.yaml's train.steps) with the per-step time measured in the same run.
Writes benchmarks/results/orchestration.json.

    python benchmarks/bench_orchestration.py [--steps 30] [--reps 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_io import save

from evaclip.config import load_params

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DIRECT = """
import sys
from evaclip.config import load_params
from evaclip.data import prepare
from evaclip.eval import evaluate
from evaclip.init import initialize
from evaclip.train import launch

params = load_params(sys.argv[1], sys.argv[2:])
prepare(params)
initialize(params)
launch(params)
evaluate(params, progress=False)
"""


def clone(into: Path) -> Path:
    subprocess.run(["git", "clone", "-q", str(REPO), str(into)], check=True)
    (into / ".venv").symlink_to(REPO / ".venv")  # bin/evaclip (the stages' command) finds it
    return into


def timed(command: list[str], env: dict, cwd: Path) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{command[:3]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--reps", type=int, default=1)
    args = parser.parse_args()
    demo = load_params(REPO / "params.yaml")

    times: dict[str, list[float]] = {"flow": [], "direct": []}
    step_s: dict[str, list[float]] = {"flow": [], "direct": []}
    with tempfile.TemporaryDirectory(prefix="evaclip-orch-") as tmp:
        for rep in range(args.reps):
            for variant in ("flow", "direct"):
                out = clone(Path(tmp) / f"{variant}-{rep}")
                overrides = [f"train.steps={args.steps}", f"train.warmup_steps={min(demo.train.warmup_steps, args.steps)}"]
                env = dict(os.environ, PREFECT_HOME=str(out / "outputs" / "prefect"),
                           PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
                env.pop("MLFLOW_TRACKING_URI", None)
                (out / "outputs" / "prefect").mkdir(parents=True)
                if variant == "flow":
                    command = [str(BIN / "evaclip"), "pipeline", *[arg for o in overrides for arg in ("-s", o)]]
                else:  # the source files where data.dvc would import them from
                    command = [sys.executable, "-c", DIRECT, "params.yaml", *overrides,
                               "data.path=/usr/share/datasets/fashion-mnist"]
                times[variant].append(timed(command, env, out))
                rows = [json.loads(line) for line in (out / "outputs/train/metrics.jsonl").read_text().splitlines()]
                rate = statistics.median(r["samples_per_s"] for r in rows[1:] or rows)
                step_s[variant].append(demo.train.global_batch_size / rate)
    flow, direct = statistics.median(times["flow"]), statistics.median(times["direct"])
    overhead = flow - direct
    step = statistics.median(step_s["direct"])
    flow_step = statistics.median(step_s["flow"])
    projected_direct = direct + (demo.train.steps - args.steps) * step
    result = {
        "benchmark": "orchestration", "steps": args.steps, "reps": args.reps, "wall_s": times,
        "flow_s": flow, "direct_s": direct, "overhead_s": overhead,
        "orchestration_overhead": overhead / direct,
        "demo_steps": demo.train.steps, "step_s": step, "flow_step_s": flow_step,
        "training_step_ratio_flow_over_direct": flow_step / step,
        "orchestration_overhead_projected_demo": overhead / projected_direct,
    }
    save("orchestration", result)
    print(f"\n| pipeline, {args.steps} training steps | wall (s) |")
    print("|---|---|")
    print(f"| Prefect flow + MLflow + DVC | {flow:.1f} |")
    print(f"| the same stages called directly | {direct:.1f} |")
    print(f"| overhead | {overhead:.1f} s = {overhead / direct:.1%} |")
    print(f"| training step under the flow / direct | {flow_step / step:.3f} |")
    print(f"| projected on the {demo.train.steps}-step demo | {result['orchestration_overhead_projected_demo']:.1%} |")


if __name__ == "__main__":
    main()
