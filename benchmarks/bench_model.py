"""Vision-tower training-step cost: token masking ratios and attention backends, side by side.

Every variant runs alternately in the same process (round robin, several repetitions, median), so
the figures that matter are ratios that a noisy shared machine does not distort much.
Prints one JSON line and a short table; writes benchmarks/results/model-MODEL.json.

    python benchmarks/bench_model.py [--model evaclip-demo] [--batch 64] [--reps 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from results_io import save

from evaclip.config import ModelConfig
from evaclip.model import create_model, set_attention_backend, set_token_masking


def vision_step(model, images) -> float:
    """Seconds for one forward + backward of the vision tower (where masking saves compute)."""
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    model.encode_image(images).float().pow(2).mean().backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="evaclip-demo")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = create_model(ModelConfig(name=args.model)).train()
    size = model.visual.image_size
    images = torch.randn(args.batch, 3, *size)
    variants = {
        "mask_0.0_sdpa": (0.0, "sdpa"),
        "mask_0.5_sdpa": (0.5, "sdpa"),
        "mask_0.75_sdpa": (0.75, "sdpa"),
        "mask_0.0_math": (0.0, "math"),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for rep in range(args.reps + 1):  # the first round warms up and is discarded
        for name, (ratio, backend) in variants.items():
            set_token_masking(model, ratio)
            set_attention_backend(model, backend)
            elapsed = vision_step(model, images)
            if rep:
                times[name].append(elapsed)
    median = {name: statistics.median(values) for name, values in times.items()}
    base = median["mask_0.0_sdpa"]
    result = {
        "benchmark": "model",
        "model": args.model,
        "batch": args.batch,
        "reps": args.reps,
        "median_s": median,
        "masking_step_ratio_0_5": median["mask_0.5_sdpa"] / base,
        "masking_step_ratio_0_75": median["mask_0.75_sdpa"] / base,
        "math_over_sdpa": median["mask_0.0_math"] / base,
    }
    save(f"model-{args.model}", result)
    print(f"\n| variant ({args.model}, batch {args.batch}) | median step (s) | ratio to mask 0 / sdpa |")
    print("|---|---|---|")
    for name, value in median.items():
        print(f"| {name} | {value:.4f} | {value / base:.2f} |")


if __name__ == "__main__":
    main()
