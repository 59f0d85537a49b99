"""`evaclip train` against open_clip's own trainer (`open_clip_train.main`, shipped with open_clip_torch),
side by side: the same shards, model config, per-process batch, processes, token masking, optimizer (LAMB:
ours vs timm's through `--opt timm/lamb`), learning-rate schedule, gradient clipping and number of steps,
at each precision of `--precisions`:
- `fp32`: both in fp32;
- `bf16`: each trainer's bf16 mixed precision, which keeps fp32 master weights: ours is DeepSpeed's bf16
  (bf16 weights and activations, fp32 master weights and optimizer state), theirs `--precision amp_bf16`
  (fp32 weights, bf16 autocast). `--precision pure_bf16`, bf16 weights with no fp32 master copy, would
  be a different optimizer and is not compared.
`peer_samples_per_s_ratio` is the ratio at params.yaml's `train.precision` (the demo's; `auto` resolved for
this machine: bf16 where it computes in bf16, else fp32 on CPUs); every precision's ratio is kept under
`by_precision`.

Per-step samples/s come from each trainer's own step log (ours: metrics.jsonl with train.log_every=1;
theirs: the `Batch (t): ..., N/s` lines), the first warm-up steps dropped, median. Runs alternate: ours,
theirs, ours, theirs. `peer_samples_per_s_ratio` is the median over repetitions of ours / theirs within the
repetition (two runs back to back); the ratio of the two medians is kept as `ratio_of_medians`. Peak
memory: the largest resident set of any process of the run (ru_maxrss of a wrapper's children), on a GPU
also what each trainer reports. Writes benchmarks/results/peer.json (or --name).

    python benchmarks/bench_peer.py [--steps 15] [--reps 2] [--batch 128] [--procs 2] [--masking 0.5]
                                    [--precisions fp32,bf16] [--name peer]
    python benchmarks/bench_peer.py --rederive --name peer   # the ratios again, from the file's runs
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from results_io import RESULTS, save

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BIN = Path(sys.executable).parent
WARMUP_STEPS = 3
# Runs a command and prints the largest resident set (KiB) among its processes.
MAXRSS = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
          "print('MAXRSS', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)")


def shards(data_dir: Path) -> str:
    manifest = json.loads((data_dir / "train" / "manifest.json").read_text())
    names = [s["name"] for s in manifest["shards"]]
    return "::".join(str(data_dir / "train" / name) for name in names)


def run(command: list[str], env: dict) -> tuple[str, float]:
    result = subprocess.run([sys.executable, "-c", MAXRSS, *command], env=env, cwd=REPO, capture_output=True,
                            text=True)
    if result.returncode != 0:
        raise SystemExit(f"{command[:4]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    maxrss_kib = int(re.findall(r"MAXRSS (\d+)", result.stdout)[-1])
    return result.stdout + result.stderr, maxrss_kib / 2**20  # GiB


THEIR_PRECISION = {"fp32": "fp32", "bf16": "amp_bf16"}


def ours(args, precision: str, work: Path, rep: int, env: dict) -> dict:
    out = work / f"ours-{precision}-{rep}"
    overrides = {
        "model.name": args.model, "model.token_masking": args.masking, "train.steps": args.steps,
        "train.batch_size": args.batch, "train.devices": args.procs, "train.lr": args.lr, "train.precision": precision,
        "train.visual_lr": args.lr, "train.text_lr": args.lr, "train.warmup_steps": args.warmup,
        "train.log_every": 1, "train.checkpoint_every": 10_000, "train.resume": "false",
        "train.output_dir": out, "init.output_dir": work / "random-init", "data.workers": args.workers,
    }
    command = [str(BIN / "evaclip"), "train", "-p", str(REPO / "params.yaml")]
    for key, value in overrides.items():
        command += ["-s", f"{key}={value}"]
    _, gib = run(command, env)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in rows if r["step"] > WARMUP_STEPS]
    return {"samples_per_s": statistics.median(rates), "max_rss_gib": gib, "steps_measured": len(rates)}


def theirs(args, precision: str, work: Path, rep: int, env: dict) -> dict:
    name = f"theirs-{precision}-{rep}"
    peer_args = [
        "--token-masking", str(args.masking), "--model", args.model, "--train-data", shards(REPO / "outputs" / "data"), "--dataset-type", "webdataset",
        "--train-num-samples", str(args.steps * args.batch * args.procs), "--epochs", "1",
        "--batch-size", str(args.batch), "--workers", str(args.workers), "--precision", THEIR_PRECISION[precision],
        "--opt", "timm/lamb", "--lr", str(args.lr), "--wd", "0.05", "--beta1", "0.9", "--beta2", "0.98",
        "--eps", "1e-6", "--warmup", str(args.warmup), "--grad-clip-norm", "5.0", "--local-loss",
        "--gather-with-grad", "--log-every-n-steps", "1", "--save-frequency", "0", "--report-to", "",
        "--logs", str(work), "--name", name, "--seed", "0",
    ]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.procs),
               str(HERE / "peer_open_clip.py")]
    _, gib = run(command, dict(env, EVACLIP_PEER_ARGS=json.dumps(peer_args)))
    log = (work / name / "out.log").read_text()
    rates = [float(x) for x in re.findall(r"Batch \(t\): [\d.]+, ([\d.e+]+)/s,", log)]
    rates = rates[WARMUP_STEPS:]
    if not rates:
        raise SystemExit(f"no step lines in {work / name / 'out.log'}")
    return {"samples_per_s": statistics.median(rates), "max_rss_gib": gib, "steps_measured": len(rates)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="evaclip-demo")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--masking", type=float, default=0.5)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16")
    parser.add_argument("--name", default="peer", help="results file name (another machine's: keep both)")
    parser.add_argument("--rederive", action="store_true",
                        help="measure nothing: recompute the ratios of results file --name from its runs")
    args = parser.parse_args()
    if args.rederive:
        return rederive(args.name)
    precisions = args.precisions.split(",")
    if unknown := set(precisions) - set(THEIR_PRECISION):
        raise SystemExit(f"--precisions: unknown {sorted(unknown)} (choose from {sorted(THEIR_PRECISION)})")
    if not (REPO / "outputs" / "data" / "train" / "manifest.json").is_file():
        raise SystemExit("no shards in outputs/data/train: run `dvc repro prepare` (or `dvc pull prepare`) first")

    threads = str(max(1, (os.cpu_count() or 2) // args.procs))
    env = dict(os.environ, OMP_NUM_THREADS=threads, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    sys.path.insert(0, str(REPO))
    from evaclip.config import load_params
    from evaclip.precision import resolve_precision

    default = resolve_precision(load_params(REPO / "params.yaml").train.precision)  # `auto`: this machine's pick
    runs = {p: {"evaclip": [], "open_clip_train": []} for p in precisions}
    with tempfile.TemporaryDirectory(prefix="evaclip-peer-") as tmp:
        for rep in range(args.reps):  # alternate: ours, theirs, at each precision, then again
            for precision in precisions:
                runs[precision]["evaclip"].append(ours(args, precision, Path(tmp), rep, env))
                runs[precision]["open_clip_train"].append(theirs(args, precision, Path(tmp), rep, env))
    result = {"benchmark": "peer", "config": vars(args), **derive(runs, default)}
    save(args.name, result)
    print_table(result)


def derive(runs: dict, default: str) -> dict:
    """The ratios, from each precision's runs."""
    by_precision = {}
    for precision, results in runs.items():
        median = {k: statistics.median(r["samples_per_s"] for r in rs) for k, rs in results.items()}
        memory = {k: max(r["max_rss_gib"] for r in rs) for k, rs in results.items()}
        # Each repetition's two runs follow each other: their ratio cancels the machine's drift over the
        # benchmark (a shared 2-core VM: both trainers ran 20% faster in the last reps than in the first).
        pairs = [a["samples_per_s"] / b["samples_per_s"]
                 for a, b in zip(results["evaclip"], results["open_clip_train"], strict=True)]
        by_precision[precision] = {
            "theirs": THEIR_PRECISION[precision], "runs": results, "samples_per_s": median, "max_rss_gib": memory,
            "pair_ratios": pairs,
            "peer_samples_per_s_ratio": statistics.median(pairs),
            "ratio_of_medians": median["evaclip"] / median["open_clip_train"],
            "peer_memory_ratio": memory["evaclip"] / memory["open_clip_train"],
        }
    headline = default if default in by_precision else next(iter(by_precision))
    return {"precision": headline, "by_precision": by_precision,
            "peer_samples_per_s_ratio": by_precision[headline]["peer_samples_per_s_ratio"],
            "peer_memory_ratio": by_precision[headline]["peer_memory_ratio"]}


def rederive(name: str) -> None:
    """Recompute a results file's ratios from its recorded runs (after a change of statistic); the runs, the
    config and the machine it was measured on stay as they are."""
    path = RESULTS / f"{name}.json"
    result = json.loads(path.read_text())
    runs = {p: entry["runs"] for p, entry in result["by_precision"].items()}
    result.update(derive(runs, result["precision"]))
    path.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)


def print_table(result: dict) -> None:
    config = result["config"]
    print(f"\n| trainer ({config['model']}, {config['procs']} x batch {config['batch']}, masking {config['masking']}, "
          "LAMB) | precision | samples/s (median) | max RSS (GiB) |")
    print("|---|---|---|---|")
    for precision, entry in result["by_precision"].items():
        for name, theirs_name in (("evaclip", precision), ("open_clip_train", entry["theirs"])):
            print(f"| {name} | {theirs_name} | {entry['samples_per_s'][name]:.1f} | {entry['max_rss_gib'][name]:.2f} |")
        print(f"| ours / open_clip, median of the repetitions' ratios "
              f"({', '.join(f'{r:.2f}' for r in entry['pair_ratios'])}) | {precision} | "
              f"{entry['peer_samples_per_s_ratio']:.2f} | {entry['peer_memory_ratio']:.2f} |")
        print(f"| ours / open_clip, ratio of the medians | {precision} | {entry['ratio_of_medians']:.2f} | |")


if __name__ == "__main__":
    main()
