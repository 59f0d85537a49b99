"""`make demo` as a new user runs it: a fresh clone, `make demo`, then `dvc status` and `dvc repro`.

    python benchmarks/demo_record.py                      # clone this checkout to a temporary folder, run, record
    python benchmarks/demo_record.py --clone DIR --seconds S   # record a run already made in DIR (timed by you)

Writes benchmarks/results/demo.json: the wall time, each stage's status and seconds (from the flow's Prefect
artifact-free summary in the log), the zero-shot metrics, and whether DVC had anything left to do.
Hours of a 2-core machine: never part of the tests.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import tempfile
import time
from pathlib import Path

from results_io import save

REPO = Path(__file__).resolve().parent.parent


def run_demo(clone: Path) -> tuple[float, str]:
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    started = time.perf_counter()
    result = subprocess.run(["make", "demo"], cwd=clone, capture_output=True, text=True)
    log = result.stdout + result.stderr
    (clone / "demo.log").write_text(log)
    if result.returncode != 0:
        raise SystemExit(f"make demo failed:\n{log[-4000:]}")
    return time.perf_counter() - started, log


def stage_table(log: str) -> dict:
    """The summary table `evaclip pipeline` prints: stage, status, seconds."""
    rows = re.findall(r"[│|]\s*(\w+)\s*[│|]\s*(ran|skipped \(unchanged\))\s*[│|]\s*([\d.]+)\s*[│|]", log)
    return {stage: {"status": status, "seconds": float(seconds)} for stage, status, seconds in rows}


def record(clone: Path, seconds: float, log: str) -> dict:
    dvc = str(clone / ".venv" / "bin" / "dvc")
    status = subprocess.run([dvc, "status"], cwd=clone, capture_output=True, text=True).stdout
    repro = subprocess.run([dvc, "repro"], cwd=clone, capture_output=True, text=True).stdout
    metrics = json.loads((clone / "outputs/eval/metrics.json").read_text())["metrics"]
    return {
        "make_demo_seconds": round(seconds, 1),
        "stages": stage_table(log),
        "zeroshot_top1": metrics["zeroshot_top1"], "zeroshot_top5": metrics["zeroshot_top5"],
        "dvc_status_clean": "Data and pipelines are up to date" in status,
        "dvc_repro_ran_nothing": "Running stage" not in repro,
        "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True, text=True).stdout.strip(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clone", type=Path, help="a fresh clone where `make demo` already ran")
    parser.add_argument("--seconds", type=float, help="its wall time (with --clone)")
    parser.add_argument("--log", type=Path, help="its output (with --clone; default: DIR/demo.log)")
    parser.add_argument("--setup-done", action="store_true", help="the clone's .venv existed before `make demo`")
    args = parser.parse_args()
    if args.clone:
        log = (args.log or args.clone / "demo.log").read_text()
        result = record(args.clone, args.seconds, log)
        result["setup_included"] = not args.setup_done
    else:
        clone = Path(tempfile.mkdtemp(prefix="evaclip-demo-")) / "evaclip"
        seconds, log = run_demo(clone)
        result = record(clone, seconds, log)
        result["setup_included"] = True
    save("demo", result)
    print("| stage | status | seconds |\n|---|---|---|")
    for stage, row in result["stages"].items():
        print(f"| {stage} | {row['status']} | {row['seconds']} |")


if __name__ == "__main__":
    main()
