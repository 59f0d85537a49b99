"""Training-step cost side by side: token masking 0 / 0.5 / 0.75, `sdpa` vs `math`, and LAMB under ZeRO-1.

- Full step (image + text forward/backward, CLIP loss, LAMB step) per masking ratio and attention
  backend, alternated round robin; medians. Memory: the bytes autograd saves for backward (the
  activation memory that masking shrinks), counted with saved-tensor hooks, so it works on CPUs too;
  on a GPU also the peak allocated memory.
- The ZeRO-aware LAMB step on a rank's flat partition (per-tensor trust ratios from segment sums)
  against the plain per-tensor LAMB step on the same parameters (one process: the all-reduce of the
  per-tensor sums is not included), and timm's `Lamb` (single- and multi-tensor) on them as a reference.
Writes benchmarks/results/train-MODEL.json (or --name).

    python benchmarks/bench_train.py [--model evaclip-demo] [--batch 64] [--reps 5] [--name NAME]
"""

from __future__ import annotations

import argparse
import statistics
import time

import open_clip
import torch
from results_io import save
from timm.optim import Lamb as TimmLamb

from evaclip.config import ModelConfig, TrainConfig
from evaclip.data.sources import FASHION_MNIST_CLASSES
from evaclip.model import (
    create_model,
    get_tokenizer,
    pool_early,
    set_attention_backend,
    set_token_masking,
    trim_text_padding,
)
from evaclip.optim import Lamb, param_groups
from evaclip.optim.lamb import _segments


def train_step(model, optimizer, loss_fn, images, texts) -> tuple[float, int]:
    saved = [0]

    def pack(tensor):
        saved[0] += tensor.numel() * tensor.element_size()
        return tensor

    device = images.device
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(*model(images, texts))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, saved[0]


def zero_lamb_step_ratio(model, reps: int) -> dict:
    """Flat-partition LAMB (2 ranks' layout, rank 0's half) vs per-tensor LAMB, same parameters."""
    params = [p for p in model.parameters() if p.ndim > 1]
    numels = [p.numel() for p in params]
    offsets = [sum(numels[:i]) for i in range(len(numels))]
    half = (sum(numels) + 1) // 2
    flat = torch.nn.Parameter(torch.cat([p.detach().flatten() for p in params])[:half].clone())
    zero = Lamb([{"params": [flat], "weight_decay": 0.05}], lr=1e-3)
    zero._layouts[id(flat)] = _segments(offsets, numels, 0, half, None)
    whole = {name: [torch.nn.Parameter(p.detach().clone()) for p in params]
             for name in ("per_tensor", "timm_single_tensor", "timm_foreach")}
    group = lambda ps: [{"params": ps, "weight_decay": 0.05}]  # noqa: E731
    optimizers = {
        "zero1_partition": zero,
        "per_tensor": Lamb(group(whole["per_tensor"]), lr=1e-3),
        "timm_single_tensor": TimmLamb(group(whole["timm_single_tensor"]), lr=1e-3, betas=(0.9, 0.98), eps=1e-6,
                                       max_grad_norm=None, foreach=False),
        "timm_foreach": TimmLamb(group(whole["timm_foreach"]), lr=1e-3, betas=(0.9, 0.98), eps=1e-6,
                                 max_grad_norm=None, foreach=True),
    }
    times = {name: [] for name in optimizers}
    for rep in range(reps + 1):
        flat.grad = torch.randn_like(flat)
        grads = [torch.randn_like(p) for p in params]
        for ps in whole.values():
            for p, grad in zip(ps, grads, strict=True):
                p.grad = grad
        for name, opt in optimizers.items():
            start = time.perf_counter()
            opt.step()
            if rep:
                times[name].append(time.perf_counter() - start)
    median = {k: statistics.median(v) for k, v in times.items()}
    # Per element: the partition holds half of the elements.
    return {"median_s": median,
            "per_element_ratio": (median["zero1_partition"] / half) / (median["per_tensor"] / sum(numels)),
            "timm_single_tensor_over_per_tensor": median["timm_single_tensor"] / median["per_tensor"],
            "timm_foreach_over_per_tensor": median["timm_foreach"] / median["per_tensor"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="evaclip-demo")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--name", default=None, help="results file name (default: train-MODEL)")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = create_model(ModelConfig(name=args.model)).to(device).train()
    pool_early(model)  # as the training engine builds it
    cfg = TrainConfig(steps=1, batch_size=args.batch)
    optimizer = Lamb(param_groups(model, cfg), lr=1e-5)
    loss_fn = open_clip.ClipLoss()
    images = torch.randn(args.batch, 3, *model.visual.image_size, device=device)
    # Captions as the demo's data makes them (class names in templates), cut to the longest as training does.
    captions = [f"a photo of a {name}." for name in FASHION_MNIST_CLASSES]
    tokens = get_tokenizer(args.model)([captions[i % len(captions)] for i in range(args.batch)])
    texts = trim_text_padding(model, tokens).to(device)
    variants = {"mask_0.0": (0.0, "sdpa"), "mask_0.5": (0.5, "sdpa"), "mask_0.75": (0.75, "sdpa"),
                "mask_0.0_math": (0.0, "math")}
    times = {k: [] for k in variants}
    saved = {}
    for rep in range(args.reps + 1):
        for name, (ratio, backend) in variants.items():
            set_token_masking(model, ratio)
            set_attention_backend(model, backend)
            elapsed, saved[name] = train_step(model, optimizer, loss_fn, images, texts)
            if rep:
                times[name].append(elapsed)
    median = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "benchmark": "train",
        "model": args.model,
        "batch": args.batch,
        "device": str(device),
        "step_median_s": median,
        "step_ratio_mask_0_5": median["mask_0.5"] / median["mask_0.0"],
        "step_ratio_mask_0_75": median["mask_0.75"] / median["mask_0.0"],
        "math_over_sdpa": median["mask_0.0_math"] / median["mask_0.0"],
        "saved_activation_bytes": saved,
        "activation_ratio_mask_0_5": saved["mask_0.5"] / saved["mask_0.0"],
        "zero1_lamb": zero_lamb_step_ratio(model.cpu(), args.reps),
    }
    save(args.name or f"train-{args.model}", result)
    print(f"\n| training step ({args.model}, batch {args.batch}, {device}) | median (s) | ratio | saved activations (MB) |")
    print("|---|---|---|---|")
    for name, value in median.items():
        print(f"| {name} | {value:.3f} | {value / median['mask_0.0']:.2f} | {saved[name] / 2**20:.1f} |")
    lamb = result["zero1_lamb"]
    print(f"| LAMB step, ZeRO-1 partition vs per tensor (per element) | | {lamb['per_element_ratio']:.2f} | |")
    print(f"| LAMB step, timm single-tensor / ours per tensor | {lamb['median_s']['timm_single_tensor']:.3f} | "
          f"{lamb['timm_single_tensor_over_per_tensor']:.2f} | |")


if __name__ == "__main__":
    main()
