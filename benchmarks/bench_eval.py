"""The evaluate stage against CLIP_benchmark's own zero-shot loop, on the same exported model and images.

- `ours`: the pipeline's evaluate stage as the flow runs it: `evaclip evaluate` in the flow's process
  (`cli.invoke`), timed in a process that first imports what the flow's process holds by then (the flow
  module and the earlier stages' libraries, not evaluation's own): every evaluation set, the reports and
  plots, and logging the run and the model (an MLflow pyfunc) to a SQLite store.
- `ours_process`: the same command as a fresh process (how `dvc repro` runs the stage), interpreter start and
  every import included.
- `clip_benchmark`: clip-benchmark 1.6.2's `zero_shot_classifier` + `run_classification` (what its CLI
  runs), timed around those two calls alone, on the same weights loaded into the same open_clip model and
  the same test shards read the way its `wds/` datasets are (a webdataset pipeline, a DataLoader with
  `--workers` workers). `amp` is on exactly when our evaluation runs in bf16 (it follows train.precision),
  so that both compute in the same precision; on a CPU its autocast is bf16.

Repetitions alternate; medians. `eval_over_clip_benchmark` = their seconds / ours (>= 1: ours is no
slower, with model loading and logging counted on our side only); `eval_process_over_clip_benchmark` the same
for `ours_process`. Also the zero-shot
top-1 of each, which must agree. Needs `pip install --no-deps clip-benchmark==1.6.2` (its other
dependencies, transformers and pycocoevalcap, serve parts not used here; `make bench` installs it so).
Writes benchmarks/results/eval.json (or --name).

    python benchmarks/bench_eval.py [--checkpoint outputs/train/model.safetensors] [--reps 2] [--workers 2] [--name eval]
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
from evaclip.eval import evaluation_device

REPO = Path(__file__).resolve().parent.parent
IN_FLOW = """
import json, sys, time
import flows.pipeline, evaclip.data, evaclip.init, evaclip.train.launch  # held by the flow's process by then
from evaclip.cli import invoke
start = time.perf_counter()
invoke(sys.argv[1:], lambda line: None)
print("RESULT", json.dumps({"seconds": time.perf_counter() - start}))
"""
THEIRS = """
import json, sys, time
import torch, webdataset as wds
from clip_benchmark.metrics.zeroshot_classification import run_classification, zero_shot_classifier
from evaclip.checkpoint import load_model_weights
from evaclip.config import load_params
from evaclip.data.evalsets import load_eval_set
from evaclip.model import create_model, create_transforms, get_tokenizer

params_file, checkpoint, workers, amp = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
params = load_params(params_file)
root = params.eval.sets[0]
evalset = load_eval_set(root, params.eval.templates)
model = create_model(params.model).eval()  # the weights of the exported model, in open_clip's model
load_model_weights(model, checkpoint)
_, transform = create_transforms(params.model.name)
urls = sorted(str(p) for p in __import__("pathlib").Path(root).glob("*.tar"))
dataset = (wds.WebDataset(urls, nodesplitter=lambda src: src, shardshuffle=False)
           .decode(wds.autodecode.ImageHandler("pil", extensions=["webp", "png", "jpg", "jpeg"]))
           .to_tuple(["webp", "png", "jpg", "jpeg"], "cls").map_tuple(transform, None))
loader = torch.utils.data.DataLoader(dataset.batched(params.eval.batch_size), batch_size=None, shuffle=False,
                                     num_workers=workers)
start = time.perf_counter()  # its templates are CLIP_benchmark's own format ({c})
classifier = zero_shot_classifier(model, get_tokenizer(params.model.name), evalset.classnames, evalset.templates, "cpu",
                                  amp=amp)
logits, target = run_classification(model, classifier, loader, "cpu", amp=amp)
seconds = time.perf_counter() - start
top1 = (logits.argmax(dim=1) == target).float().mean().item()
print("RESULT", json.dumps({"seconds": seconds, "zeroshot_top1": top1, "images": len(target)}))
"""


def ours(params_file: Path, checkpoint: Path, work: Path, rep: int, env: dict, in_flow: bool) -> dict:
    out = work / f"ours-{rep}-{int(in_flow)}"
    args = ["evaluate", "-p", str(params_file), "-s", f"eval.checkpoint={checkpoint}", "-s", f"eval.output_dir={out}"]
    command = [sys.executable, "-c", IN_FLOW, *args] if in_flow else [sys.executable, "-m", "evaclip.cli", *args]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, env=dict(env, MLFLOW_TRACKING_URI=f"sqlite:///{work}/mlflow.db",
                                                        PYTHONPATH=str(REPO)), capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"evaclip evaluate failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    if in_flow:
        seconds = json.loads(result.stdout.split("RESULT", 1)[1])["seconds"]
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    return {"seconds": seconds, "zeroshot_top1": metrics["zeroshot_top1"], "images": metrics["samples"]}


def theirs(params_file: Path, checkpoint: Path, workers: int, amp: bool, env: dict) -> dict:
    command = [sys.executable, "-c", THEIRS, str(params_file), str(checkpoint), str(workers), "1" if amp else "0"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"clip_benchmark loop failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.split("RESULT", 1)[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--checkpoint", default="outputs/train/model.safetensors")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="clip_benchmark's DataLoader workers")
    parser.add_argument("--name", default="eval", help="results file name (another machine's: keep both)")
    args = parser.parse_args()
    try:
        import clip_benchmark  # noqa: F401
    except ImportError:
        raise SystemExit("needs clip-benchmark: pip install --no-deps clip-benchmark==1.6.2") from None
    params_file, checkpoint = (REPO / args.params).resolve(), (REPO / args.checkpoint).resolve()
    if not checkpoint.is_file():
        raise SystemExit(f"{checkpoint}: no trained weights (run `make demo` or `evaclip train` first)")
    params = load_params(params_file)
    amp = evaluation_device(params)[1] != __import__("torch").float32
    env = dict(os.environ, DO_NOT_TRACK="true", MLFLOW_DISABLE_TELEMETRY="true")
    runs: dict[str, list[dict]] = {"ours": [], "ours_process": [], "clip_benchmark": []}
    with tempfile.TemporaryDirectory(prefix="evaclip-eval-") as tmp:
        for rep in range(args.reps):
            runs["ours"].append(ours(params_file, checkpoint, Path(tmp), rep, env, in_flow=True))
            runs["ours_process"].append(ours(params_file, checkpoint, Path(tmp), rep, env, in_flow=False))
            runs["clip_benchmark"].append(theirs(params_file, checkpoint, args.workers, amp, env))
    seconds = {k: statistics.median(r["seconds"] for r in rs) for k, rs in runs.items()}
    result = {"benchmark": "eval", "model": params.model.name, "precision": params.train.precision, "amp": amp,
              "workers": args.workers, "reps": args.reps, "runs": runs, "seconds": seconds,
              "eval_over_clip_benchmark": seconds["clip_benchmark"] / seconds["ours"],
              "eval_process_over_clip_benchmark": seconds["clip_benchmark"] / seconds["ours_process"],
              "images_per_s": runs["ours"][0]["images"] / seconds["ours"]}
    save(args.name, result)
    print(f"\n| zero-shot evaluation ({params.model.name}, 10k test split, 80 templates) | seconds | top-1 |")
    print("|---|---|---|")
    print(f"| evaluate stage in the flow's process (reports, MLflow logging) | {seconds['ours']:.1f} | "
          f"{runs['ours'][0]['zeroshot_top1']:.4f} |")
    print(f"| `evaclip evaluate` as a fresh process (as `dvc repro` runs it) | {seconds['ours_process']:.1f} | "
          f"{runs['ours_process'][0]['zeroshot_top1']:.4f} |")
    print(f"| clip_benchmark classifier + loop | {seconds['clip_benchmark']:.1f} | "
          f"{runs['clip_benchmark'][0]['zeroshot_top1']:.4f} |")
    print(f"| theirs / ours: in the flow, as a process | {result['eval_over_clip_benchmark']:.2f}, "
          f"{result['eval_process_over_clip_benchmark']:.2f} | |")


if __name__ == "__main__":
    main()
