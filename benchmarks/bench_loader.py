"""Loader throughput against the training step's consumption, on the prepared demo data.

Images/s the loader delivers with 0, 1 and 2 workers (decode, open_clip's train transform, tokenize,
batch), and images/s one training step consumes on the demo model (image + text forward/backward
with 50% token masking, CLIP loss, LAMB step) in the same process; measured alternately, medians.
Needs `evaclip prepare` first. Writes benchmarks/results/loader.json.

    python benchmarks/bench_loader.py [--batch 128] [--batches 12] [--reps 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import open_clip
import torch
from results_io import save
from timm.optim import Lamb

from evaclip.config import load_params
from evaclip.data import make_train_loader
from evaclip.model import create_model, create_transforms, get_tokenizer


def loader_rate(params, workers: int, batch: int, batches: int) -> float:
    train, _ = create_transforms(params.model.name)
    cfg = params.data.model_copy(update={"workers": workers})
    loader, _ = make_train_loader(cfg, train, get_tokenizer(params.model.name), batch, seed=workers)
    iterator = iter(loader)
    next(iterator)  # worker start-up and the shuffle buffer's first fill are not throughput
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * batch / (time.perf_counter() - start)


def step_rate(params, batch: int, steps: int) -> float:
    model = create_model(params.model).train()
    loss_fn = open_clip.ClipLoss()
    optimizer = Lamb(model.parameters(), lr=1e-3, betas=(0.9, 0.98), weight_decay=0.05)
    images = torch.randn(batch, 3, *model.visual.image_size)
    texts = torch.randint(0, 49408, (batch, model.context_length))
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        image_features, text_features, scale = model(images, texts)
        loss_fn(image_features, text_features, scale).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    params = load_params(args.params)

    rates: dict[str, list[float]] = {"workers_0": [], "workers_1": [], "workers_2": [], "train_step": []}
    for _ in range(args.reps):  # alternate, so load changes hit every variant alike
        for workers in (0, 1, 2):
            rates[f"workers_{workers}"].append(loader_rate(params, workers, args.batch, args.batches))
        rates["train_step"].append(step_rate(params, args.batch, 4))
    median = {k: statistics.median(v) for k, v in rates.items()}
    consumption = median["train_step"]
    result = {
        "benchmark": "loader",
        "batch": args.batch,
        "images_per_s": median,
        "loader_over_consumption": {k: v / consumption for k, v in median.items() if k != "train_step"},
    }
    save("loader", result)
    print(f"\n| loader (batch {args.batch}) | images/s | over the training step's consumption |")
    print("|---|---|---|")
    for name, value in median.items():
        print(f"| {name} | {value:.0f} | {value / consumption:.2f} |")


if __name__ == "__main__":
    main()
