"""The GPU check: EVA02-CLIP-B/16 training steps in bf16 with DeepSpeed ZeRO-1, the way `evaclip train`
builds them (our model factory, LAMB with EVA-CLIP's parameter groups, our DeepSpeed config), at token
masking 0 and 0.5 with the largest batch that fits. Reports samples/s, the masking speed-up, peak GPU
memory, and model FLOP utilization against the card's bf16 matmul rate measured first.

Run by gpu_check.sh on one GPU; `--smoke` runs the same code on a CPU with a micro model (tests do).

MFU counts the FLOPs the model needs (6 x parameters x tokens for the matmuls, plus attention scores,
forward + backward), not recomputation: tokens are the kept image tokens (+ CLS) and the text context.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from evaclip.config import ModelConfig, TrainConfig
from evaclip.model import create_model, model_config, set_token_masking
from evaclip.optim import create_optimizer, lr_multiplier
from evaclip.train.ds_config import deepspeed_config


def matmul_peak_flops(device, dtype, size: int = 8192, iters: int = 50) -> float:
    """The card's measured dense matmul rate (FLOP/s): the denominator of MFU."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    _sync(device)
    return 2 * size**3 * iters / (time.perf_counter() - start)


def flops_per_sample(name: str, masking: float) -> float:
    """Training FLOPs of one sample (forward + backward = 3 x forward)."""
    cfg = model_config(name)
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    model = create_model(ModelConfig(name=name), device="meta")
    grid = (vision["image_size"] // _patch(model)) ** 2
    tokens_v = 1 + int(grid * (1 - masking))
    tokens_t = text.get("context_length", 77)
    params_v = sum(p.numel() for p in model.visual.parameters())
    params_t = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("visual."))
    width_v, layers_v = model.visual.trunk.embed_dim, len(model.visual.trunk.blocks)
    width_t, layers_t = text["width"], text["layers"]
    forward = (2 * params_v * tokens_v + 4 * layers_v * tokens_v**2 * width_v
               + 2 * params_t * tokens_t + 4 * layers_t * tokens_t**2 * width_t)
    return 3 * forward


def _patch(model) -> int:
    return model.visual.trunk.patch_embed.patch_size[0]


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build_engine(name: str, batch: int, precision: str):
    import deepspeed

    cfg = TrainConfig(batch_size=batch, devices=1, zero_stage=1, precision=precision, steps=1000, warmup_steps=10,
                      optimizer="lamb")
    torch.manual_seed(0)
    model = create_model(ModelConfig(name=name, token_masking=0.0, attention="sdpa"))
    optimizer = create_optimizer(model, cfg)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(cfg),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_multiplier(cfg)),
    )
    optimizer.attach_zero_partitions(engine.optimizer)
    return engine


def run_steps(engine, batch: int, masking: float, steps: int, warmup: int) -> list[float]:
    from open_clip.loss import ClipLoss

    device = engine.device
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32
    model = engine.module
    size = model.visual.image_size
    images = torch.randn(batch, 3, *size, device=device, dtype=dtype)
    texts = torch.randint(1, 49407, (batch, model.context_length), device=device)
    set_token_masking(model, masking)
    loss_fn = ClipLoss()
    times = []
    for step in range(warmup + steps):
        _sync(device)
        start = time.perf_counter()
        image_features, text_features, logit_scale = engine(images, texts)
        loss = loss_fn(image_features.float(), text_features.float(), logit_scale.float())
        engine.backward(loss)
        engine.step()
        _sync(device)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return times


def largest_batch(name: str, candidates: list[int], precision: str):
    """The first batch size (largest first) whose unmasked training steps fit in memory."""
    for batch in candidates:
        try:
            engine = build_engine(name, batch, precision)
            run_steps(engine, batch, 0.0, steps=1, warmup=1)
            return batch, engine
        except torch.OutOfMemoryError:
            engine = None
            torch.cuda.empty_cache()
            print(f"batch {batch}: out of memory", flush=True)
    raise SystemExit(f"no batch size in {candidates} fits")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="EVA02-B-16")
    parser.add_argument("--batches", default="512,384,256,192,128,64")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/gpu.json")
    parser.add_argument("--smoke", action="store_true", help="CPU, evaclip-micro, fp32, batch 4, 2 steps")
    args = parser.parse_args()
    if args.smoke:
        args.model, args.batches, args.steps, args.warmup = "evaclip-micro", "4", 2, 1
    elif not torch.cuda.is_available():
        raise SystemExit("no GPU visible (use --smoke for a CPU run of the same code)")
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29561", "RANK": "0", "LOCAL_RANK": "0",
                       "WORLD_SIZE": "1"}.items():
        os.environ.setdefault(key, value)
    import deepspeed

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    precision = "fp32" if args.smoke else "bf16"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    peak = matmul_peak_flops(device, dtype, size=256 if args.smoke else 8192, iters=5 if args.smoke else 50)
    print(f"measured {dtype} matmul rate: {peak / 1e12:.1f} TFLOP/s", flush=True)

    batch, engine = largest_batch(args.model, [int(b) for b in args.batches.split(",")], precision)
    result = {"benchmark": "gpu_check", "model": args.model, "batch": batch, "precision": precision,
              "zero_stage": 1, "attention": "sdpa", "matmul_peak_tflops": peak / 1e12,
              "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", "masking": {}}
    for masking in (0.0, 0.5):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = run_steps(engine, batch, masking, args.steps, args.warmup)
        step = statistics.median(times)
        achieved = flops_per_sample(args.model, masking) * batch / step
        result["masking"][str(masking)] = {
            "step_s": step, "samples_per_s": batch / step, "mfu": achieved / peak,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        }
        print(f"masking {masking}: {batch / step:.1f} samples/s, MFU {achieved / peak:.1%}", flush=True)
    unmasked, masked = result["masking"]["0.0"], result["masking"]["0.5"]
    result["masking_speedup_0_5"] = masked["samples_per_s"] / unmasked["samples_per_s"]
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
