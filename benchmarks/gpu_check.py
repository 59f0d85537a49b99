"""The GPU check: the real `evaclip prepare`, `evaclip train` and `evaclip evaluate` for EVA02-CLIP-B/16 on one GPU.

Synthetic image-text pairs (no network, no dataset on the machine) go through `evaclip prepare` into shards;
then `evaclip train` (torchrun, DeepSpeed ZeRO-1, LAMB, the packaged eva02-clip-b16 profile with a short
schedule) runs once per variant: bf16 at token masking 0.5 and 0, fp16 (dynamic loss scaling) at 0.5, and
flash-attn at 0.5 where the package is installed; `evaclip evaluate` then runs on the GPU in bf16. Each run's
samples/s and peak GPU memory come from its own metrics.jsonl (what the training loop logs every log_every
steps); MFU divides the model's training FLOPs at that rate by the card's bf16 matmul rate measured here.
Writes benchmarks/results/gpu.json. Nothing is tracked (tracking.enabled=false): no MLflow server needed.

    benchmarks/gpu_check.sh                     # on the GPU machine (installs the carried wheels first)
    python benchmarks/gpu_check.py --smoke      # the same commands on a CPU: evaclip-micro, fp32 (tests)

MFU counts the FLOPs the model needs (6 x parameters x tokens for the matmuls, plus attention scores,
forward + backward), not recomputation: tokens are the kept image tokens (+ CLS) and the text context.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from evaclip.config import ModelConfig
from evaclip.model import create_model, model_config

REPO = Path(__file__).resolve().parents[1]


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


def synthetic_data(work: Path, pairs: int, classes: int, per_class: int) -> tuple[Path, Path]:
    """Image-text pairs (smooth random pictures, a caption naming their number) and an ImageFolder."""
    rng = np.random.default_rng(0)
    source, evalset = work / "pairs", work / "eval"

    def picture() -> Image.Image:
        return Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).resize((64, 64), Image.BICUBIC)

    source.mkdir(parents=True, exist_ok=True)
    for i in range(pairs):
        picture().save(source / f"{i:06d}.png")
        (source / f"{i:06d}.txt").write_text(f"a picture of pattern number {i % 100}")
    for c in range(classes):
        (evalset / f"class_{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            picture().save(evalset / f"class_{c}" / f"{i}.png")
    return source, evalset


def evaclip(verb: str, base: list[str], overrides: dict, log: Path) -> float:
    """Run `evaclip VERB` as a user does; returns its wall time. Its output goes to `log` (and a failure's tail
    to the terminal)."""
    command = [sys.executable, "-m", "evaclip.cli", verb, *base]
    for key, value in overrides.items():
        command += ["-s", f"{key}={value}"]
    started = time.perf_counter()
    with open(log, "w") as handle:
        result = subprocess.run(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        sys.stdout.write(log.read_text()[-4000:])
        raise SystemExit(f"evaclip {verb} failed (exit code {result.returncode}); its output: {log}")
    return time.perf_counter() - started


def run_figures(run: Path) -> dict:
    """samples/s (median of the logged intervals after the first, which holds start-up) and peak memory."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rates = [row["samples_per_s"] for row in rows[1:]] or [rows[-1]["samples_per_s"]]
    memory = [row["gpu_peak_memory_gib"] for row in rows if "gpu_peak_memory_gib" in row]
    return {"samples_per_s": statistics.median(rates), "peak_memory_gib": max(memory) if memory else None,
            "final_loss": rows[-1]["loss"], "steps": rows[-1]["step"]}


def flash_attn_installed() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="eva02-clip-b16")
    parser.add_argument("--batch", type=int, default=256, help="per GPU")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--work", type=Path, default=Path("/tmp/evaclip-gpu-check"))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "gpu.json")
    parser.add_argument("--smoke", action="store_true", help="CPU, evaclip-micro, fp32, batch 8, 4 steps")
    args = parser.parse_args()
    gpu = torch.cuda.is_available()
    if not gpu and not args.smoke:
        raise SystemExit("no GPU visible (use --smoke for a CPU run of the same commands)")
    base = ["--params", str(REPO / "params.yaml")] if args.smoke else ["--profile", args.profile]
    model = "evaclip-micro" if args.smoke else None
    batch, steps = (8, 4) if args.smoke else (args.batch, args.steps)
    work = args.work.resolve()
    source, evalset = synthetic_data(work, pairs=256 if args.smoke else 8192, classes=10, per_class=4 if args.smoke else 20)

    common = {
        "data.source": "pairs", "data.path": source, "data.mix": "[]", "data.output_dir": work / "data",
        "data.version": "false", "data.samples_per_shard": 32 if args.smoke else 512, "data.eval_path": "null",
        "data.dedup_against_eval": "false", "data.resampled": "true", "data.workers": 0 if args.smoke else 8,
        "data.shuffle_buffer": 64 if args.smoke else 1000, "eval.sets": f"[{evalset}]", "eval.every_n_steps": 0,
        "tracking.enabled": "false", "init.output_dir": work / "no-init",  # random initialization
    }
    if model:
        common["model.name"] = model
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    prepare_s = evaclip("prepare", base, common, logs / "prepare.log")

    variants = {"bf16_mask0.5": ("bf16", 0.5, "sdpa"), "bf16_mask0": ("bf16", 0.0, "sdpa"),
                "fp16_mask0.5": ("fp16", 0.5, "sdpa")}
    if args.smoke:
        variants = {"fp32_mask0.5": ("fp32", 0.5, "sdpa"), "fp32_mask0": ("fp32", 0.0, "sdpa")}
    if flash_attn_installed():
        variants["bf16_mask0.5_flash_attn"] = ("bf16", 0.5, "flash_attn")
    runs = {}
    for name, (precision, masking, attention) in variants.items():
        out = work / "runs" / name
        overrides = {**common, "train.output_dir": out, "train.resume": "false", "train.steps": steps,
                     "train.warmup_steps": 2, "train.batch_size": batch, "train.devices": 1, "train.nodes": 1,
                     "train.launcher": "torchrun", "train.precision": precision, "train.unmasked_tuning_steps": 0,
                     "train.log_every": max(1, steps // 8), "train.checkpoint_every": 10**6,
                     "train.keep_checkpoints": 1, "train.grad_accum_steps": 1, "model.token_masking": masking,
                     "model.attention": attention}
        seconds = evaclip("train", base, overrides, logs / f"train-{name}.log")
        runs[name] = {"precision": precision, "token_masking": masking, "attention": attention,
                      "wall_s": seconds, **run_figures(out)}
        print(f"{name}: {runs[name]['samples_per_s']:.1f} samples/s, peak {runs[name]['peak_memory_gib']} GiB",
              flush=True)

    main_run = "fp32_mask0.5" if args.smoke else "bf16_mask0.5"
    evaluate_s = evaclip("evaluate", base, {**common, "eval.checkpoint": work / "runs" / main_run / "model.safetensors",
                                            "eval.output_dir": work / "eval-out",
                                            "train.precision": runs[main_run]["precision"]}, logs / "evaluate.log")
    evaluation = json.loads((work / "eval-out" / "metrics.json").read_text())

    device = torch.device("cuda" if gpu else "cpu")
    dtype = torch.bfloat16 if gpu else torch.float32
    peak = matmul_peak_flops(device, dtype, size=8192 if gpu else 256, iters=50 if gpu else 5)
    name_of_model = model or model_name(args.profile)
    for figures in runs.values():
        figures["mfu"] = flops_per_sample(name_of_model, figures["token_masking"]) * figures["samples_per_s"] / peak
    result = {
        "benchmark": "gpu_check", "model": name_of_model, "profile": None if args.smoke else args.profile,
        "device": torch.cuda.get_device_name(0) if gpu else "cpu", "torch": torch.__version__,
        "batch_per_gpu": batch, "steps": steps, "matmul_peak_tflops": peak / 1e12, "runs": runs,
        "prepare_s": prepare_s,
        "evaluate": {"seconds": evaluate_s, "device": evaluation["device"], "dtype": evaluation["dtype"],
                     "zeroshot_top1_synthetic": evaluation["metrics"].get("zeroshot_top1")},
    }
    first, second = (("fp32_mask0.5", "fp32_mask0") if args.smoke else ("bf16_mask0.5", "bf16_mask0"))
    result["masking_speedup_0_5"] = runs[first]["samples_per_s"] / runs[second]["samples_per_s"]
    if "fp16_mask0.5" in runs:
        result["fp16_over_bf16"] = runs["fp16_mask0.5"]["samples_per_s"] / runs["bf16_mask0.5"]["samples_per_s"]
    if "bf16_mask0.5_flash_attn" in runs:
        result["flash_attn_over_sdpa"] = (runs["bf16_mask0.5_flash_attn"]["samples_per_s"]
                                          / runs["bf16_mask0.5"]["samples_per_s"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    print("\n| run | samples/s | MFU | peak GiB |\n|---|---|---|---|")
    for name, figures in runs.items():
        print(f"| {name} | {figures['samples_per_s']:.1f} | {figures['mfu']:.1%} | {figures['peak_memory_gib']} |")


def model_name(profile: str) -> str:
    from evaclip.config import load_params, profile_path

    return load_params(profile_path(profile)).model.name


if __name__ == "__main__":
    main()
