"""The demo pipeline on the full default, three ways, alternately on one machine, each in a fresh clone:

- `baseline`: the pipeline of an earlier commit (`--baseline`, default: the one before the performance work),
  as `make demo` runs it (`evaclip pipeline --bootstrap`, its first run: random initialization);
- `flow`: the same for this checkout's commit, after `make stores` (part of `make setup` since issue 17: the local
  Prefect and MLflow databases, migrated), timed apart as `setup_seconds`;
- `direct`: this commit's stages called as library functions in one plain process (prepare, pretrain's
  no-op skipped, init, train, evaluate), with no Prefect, no DVC and no MLflow (`tracking.enabled=false`).

`demo_time_ratio` is flow / baseline, `orchestration_overhead` is (flow - direct) / direct, both from wall
times measured here on the full demo, never projected; `demo_zeroshot_top1` is the flow's result on the 10k
test split with the 80 templates. Each clone uses this checkout's .venv with its own code first on the path,
so that no `make setup` runs in between. Writes benchmarks/results/demo_ab.json (a subset of the arms:
demo_ab-<arms>.json). About 30 minutes per
repetition on 2 CPU cores: never part of the tests.

    python benchmarks/bench_demo.py [--baseline 991f541] [--reps 1]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from results_io import save

REPO = Path(__file__).resolve().parent.parent
VENV = REPO / ".venv"
DEFAULT_ARMS = "baseline,flow,direct"
BASELINE = "991f541"  # the last commit before issue 17's changes: today's demo
DIRECT = """
import json, sys, time
started = time.perf_counter()
from evaclip.config import load_params
from evaclip.data import prepare
from evaclip.eval import evaluate
from evaclip.init import initialize
from evaclip.train import launch

params = load_params("params.yaml", sys.argv[1:])
stages = {"imports": round(time.perf_counter() - started, 1)}
for name, step in (("prepare", prepare), ("init", initialize), ("train", launch),
                   ("evaluate", lambda p: evaluate(p, progress=False))):
    began = time.perf_counter()
    step(params)
    stages[name] = round(time.perf_counter() - began, 1)
print("DIRECT_STAGES", json.dumps(stages))
"""
# What `make demo` exports (Makefile), so that every arm runs in the same environment.
MAKE_ENV = {"DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
            "HF_HUB_OFFLINE": "1"}


def clone(rev: str, into: Path) -> Path:
    subprocess.run(["git", "clone", "-q", str(REPO), str(into)], check=True)
    subprocess.run(["git", "checkout", "-q", rev], cwd=into, check=True)
    (into / ".venv").symlink_to(VENV)  # bin/evaclip (the stages' command) finds it
    (into / "outputs" / "prefect").mkdir(parents=True)
    return into


def environment(root: Path) -> dict:
    env = dict(os.environ, **MAKE_ENV, PREFECT_HOME=str(root / "outputs" / "prefect"), PYTHONPATH=str(root),
               PATH=f"{VENV / 'bin'}{os.pathsep}{os.environ['PATH']}")
    for key in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "OMP_NUM_THREADS"):
        env.pop(key, None)
    return env


def run_arm(arm: str, rev: str, work: Path, rep: int) -> dict:
    root = clone(rev, work / f"{arm}-{rep}")
    python = str(VENV / "bin" / "python")
    setup = None
    if arm == "direct":  # the source files where data.dvc would import them from
        command = [python, "-c", DIRECT, "data.path=/usr/share/datasets/fashion-mnist", "tracking.enabled=false"]
    else:
        command = [python, "-m", "flows.cli", "pipeline", "--bootstrap"]  # the `evaclip` script, this clone's code
        if arm == "flow":  # what `make setup` does besides installing: the local stores, timed apart
            began = time.perf_counter()
            subprocess.run(["make", "-s", "-o", ".venv/.installed", "stores"], cwd=root, env=environment(root),
                           check=True, capture_output=True)
            setup = round(time.perf_counter() - began, 1)
    started = time.perf_counter()
    result = subprocess.run(command, cwd=root, env=environment(root), capture_output=True, text=True)
    seconds = time.perf_counter() - started
    log = result.stdout + result.stderr
    (work / f"{arm}-{rep}.log").write_text(log)
    if result.returncode != 0:
        raise SystemExit(f"{arm} failed:\n{log[-4000:]}")
    top1 = json.loads((root / "outputs/eval/metrics.json").read_text())["metrics"]["zeroshot_top1"]
    rows = [json.loads(line) for line in (root / "outputs/train/metrics.jsonl").read_text().splitlines()]
    stages = {name: float(s) for name, _, s in
              re.findall(r"[│|]\s*(\w+)\s*[│|]\s*(ran|skipped \(unchanged\))\s*[│|]\s*([\d.]+)\s*[│|]", log)}
    if arm == "direct":  # the plain process's own stage times, to set beside the flow's
        stages = json.loads(log.split("DIRECT_STAGES", 1)[1].splitlines()[0])
    return {"seconds": round(seconds, 1), "setup_seconds": setup, "zeroshot_top1": top1, "steps": rows[-1]["step"],
            "train_samples_per_s": statistics.median(r["samples_per_s"] for r in rows[1:] or rows),
            "stages": stages, "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                                       text=True).stdout.strip()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default=BASELINE)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--arms", default=DEFAULT_ARMS, help="which arms, in the order they alternate")
    args = parser.parse_args()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    arms = args.arms.split(",")
    runs: dict[str, list[dict]] = {arm: [] for arm in arms}
    with tempfile.TemporaryDirectory(prefix="evaclip-demo-ab-") as tmp:
        for rep in range(args.reps):
            for arm in arms:
                runs[arm].append(run_arm(arm, args.baseline if arm == "baseline" else head, Path(tmp), rep))
                print(arm, rep, json.dumps(runs[arm][-1]), flush=True)
    seconds = {arm: statistics.median(r["seconds"] for r in rs) for arm, rs in runs.items()}
    result = {"benchmark": "demo_ab", "baseline": args.baseline, "reps": args.reps, "order": arms, "runs": runs,
              "seconds": seconds}
    if "flow" in seconds:
        result["demo_zeroshot_top1"] = statistics.median(r["zeroshot_top1"] for r in runs["flow"])
    if {"flow", "baseline"} <= set(seconds):
        result["demo_time_ratio"] = seconds["flow"] / seconds["baseline"]
    if {"flow", "direct"} <= set(seconds):
        result["orchestration_overhead"] = (seconds["flow"] - seconds["direct"]) / seconds["direct"]
    save("demo_ab" if arms == DEFAULT_ARMS.split(",") else f"demo_ab-{'-'.join(arms)}", result)  # a subset: its own file
    print("\n| demo pipeline | wall (s) | zero-shot top-1 | train samples/s |\n|---|---|---|---|")
    for arm, rs in runs.items():
        print(f"| {arm} | {seconds[arm]:.0f} | {statistics.median(r['zeroshot_top1'] for r in rs):.4f} | "
              f"{statistics.median(r['train_samples_per_s'] for r in rs):.1f} |")
    for key in ("demo_time_ratio", "orchestration_overhead"):
        if key in result:
            print(f"| {key} | {result[key]:.3f} | | |")


if __name__ == "__main__":
    main()
