"""Zero-shot evaluation throughput on the demo's evaluation set (Fashion-MNIST's official test split,
10 classes x 80 OpenAI templates): images/s through decoding, preprocessing, the image tower and the
classifier, and the seconds to build the classifier (800 prompts through the text tower).
Repetitions alternate; medians. Writes benchmarks/results/eval.json.

    python benchmarks/bench_eval.py [--images 2000] [--reps 3] [--checkpoint outputs/train/model.safetensors]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from pathlib import Path

import torch
from open_clip import build_zero_shot_classifier
from results_io import save

from evaclip.checkpoint import load_model_weights
from evaclip.config import load_params
from evaclip.data.evalsets import load_eval_set
from evaclip.eval import zero_shot_classification
from evaclip.model import create_model, create_transforms, get_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--checkpoint", default=None, help="weights (throughput does not depend on them)")
    args = parser.parse_args()

    params = load_params(args.params)
    evalset = load_eval_set(params.eval.sets[0], params.eval.templates)
    all_samples = evalset.samples
    evalset.samples = lambda: itertools.islice(all_samples(), args.images)
    model = create_model(params.model).eval()
    if args.checkpoint and Path(args.checkpoint).is_file():
        load_model_weights(model, args.checkpoint)
    _, preprocess = create_transforms(params.model.name)
    tokenizer = get_tokenizer(params.model.name)
    templates = [t.replace("{c}", "{}") for t in evalset.templates]

    classifier_s, total_s = [], []
    for rep in range(args.reps + 1):  # the first round warms up
        start = time.perf_counter()
        with torch.no_grad():
            build_zero_shot_classifier(model, tokenizer, evalset.classnames, templates, use_tqdm=False)
        built = time.perf_counter() - start
        start = time.perf_counter()
        result = zero_shot_classification(model, evalset, preprocess, tokenizer, params.eval.batch_size)
        elapsed = time.perf_counter() - start
        if rep:
            classifier_s.append(built)
            total_s.append(elapsed)
    classifier = statistics.median(classifier_s)
    images_s = result.metrics["samples"] / (statistics.median(total_s) - classifier)
    out = {"benchmark": "eval", "model": params.model.name, "eval_set": evalset.identity,
           "images": int(result.metrics["samples"]), "prompts": len(templates) * len(evalset.classnames),
           "batch": params.eval.batch_size, "images_per_s": images_s, "classifier_s": classifier,
           "full_test_split_s_estimate": classifier + 10_000 / images_s}
    save("eval", out)
    print(f"\n| zero-shot evaluation ({params.model.name}, batch {params.eval.batch_size}) | value |")
    print("|---|---|")
    print(f"| images/s | {images_s:.0f} |")
    print(f"| classifier ({out['prompts']} prompts), s | {classifier:.1f} |")
    print(f"| 10k test split, s (estimate) | {out['full_test_split_s_estimate']:.0f} |")


if __name__ == "__main__":
    main()
