"""The headline ratios of every benchmark result in benchmarks/results/: summary.json and a Markdown table.

    python benchmarks/summary.py        # after the bench_*.py scripts (make bench runs them all)
"""

from __future__ import annotations

import json
import subprocess

from results_io import RESULTS, machine

# bench_demo.py run on a subset of its arms writes its own file: a key both hold comes from the newer code.
DEMO_FILES = ("demo_ab", "demo_ab-flow-direct")

# (summary key, result file(s), path in the file, what it is, goal)
HEADLINES = [
    ("masking_step_ratio_0_5", "model-evaclip-demo", ["masking_step_ratio_0_5"],
     "vision-tower step, masking 0.5 / 0 (demo)", "<= 0.55"),
    ("masking_step_ratio_0_5_b16", "model-EVA02-B-16", ["masking_step_ratio_0_5"],
     "vision-tower step, masking 0.5 / 0 (B/16)", "<= 0.55"),
    ("train_step_ratio_0_5", "train-evaclip-demo", ["step_ratio_mask_0_5"],
     "full training step, masking 0.5 / 0 (demo)", "<= 0.65"),
    ("train_step_ratio_0_5_b16", "train-EVA02-B-16", ["step_ratio_mask_0_5"],
     "full training step, masking 0.5 / 0 (B/16, batch 2)", "<= 0.65"),
    ("train_step_ratio_0_5_b16_batch8", "train-EVA02-B-16-batch8", ["step_ratio_mask_0_5"],
     "full training step, masking 0.5 / 0 (B/16, batch 8)", "<= 0.65"),
    ("lamb_timm_single_tensor_over_ours", "train-EVA02-B-16", ["zero1_lamb", "timm_single_tensor_over_per_tensor"],
     "LAMB step time, timm's single-tensor form / ours (B/16's matrices)", ""),
    ("activation_ratio_0_5", "train-evaclip-demo", ["activation_ratio_mask_0_5"],
     "saved activations, masking 0.5 / 0 (demo)", ""),
    ("math_over_sdpa", "model-evaclip-demo", ["math_over_sdpa"], "vision step, math / sdpa attention", ""),
    ("peer_samples_per_s_ratio", "peer", ["peer_samples_per_s_ratio"],
     "samples/s, evaclip train / open_clip_train, at the demo's precision (bf16: theirs amp_bf16)", ">= 1.25"),
    ("peer_samples_per_s_ratio_fp32", "peer", ["by_precision", "fp32", "peer_samples_per_s_ratio"],
     "samples/s, evaclip train / open_clip_train, both fp32", ">= 1.25"),
    ("peer_memory_ratio", "peer", ["peer_memory_ratio"], "peak RSS, evaclip train / open_clip_train", ""),
    ("peer_samples_per_s_ratio_avx2", "peer-avx2", ["peer_samples_per_s_ratio"],
     "the same on an AVX2 CPU without bf16, both fp32 (`auto`'s pick there)", ">= 1.25"),
    ("loader_over_consumption", "loader", ["loader_over_consumption", "workers_2"],
     "loader images/s (2 workers) / training consumption", ">= 2"),
    ("s3_over_local_images_per_s", "streaming", ["s3_over_local_images_per_s"],
     "loader images/s, loopback S3 / local disk", ">= 0.8"),
    ("manifest_20k_shards_seconds", "streaming", ["manifest_20k_shards_seconds"],
     "seconds to write the manifest of 20,000 remote shards", "< 60"),
    ("eval_images_per_s", "eval", ["images_per_s"], "evaluate stage, 10k images / its wall time (demo)", ""),
    ("eval_over_clip_benchmark", "eval", ["eval_over_clip_benchmark"],
     "CLIP_benchmark's classifier + loop / our whole evaluate stage in the flow, same model and images", ">= 1.0"),
    ("eval_process_over_clip_benchmark", "eval", ["eval_process_over_clip_benchmark"],
     "the same, our stage as a fresh `evaclip evaluate` process (dvc repro's way)", ""),
    ("eval_over_clip_benchmark_avx2", "eval-avx2", ["eval_over_clip_benchmark"],
     "the same as the flow runs it, on an AVX2 CPU without bf16 (fp32)", ">= 1.0"),
    ("demo_time_ratio", DEMO_FILES, ["demo_time_ratio"], "demo pipeline wall time, this commit / the baseline's",
     "<= 0.5"),
    ("demo_zeroshot_top1", DEMO_FILES, ["demo_zeroshot_top1"], "the demo's zero-shot top-1 (10k test, 80 templates)",
     ">= 0.75"),
    ("orchestration_overhead", DEMO_FILES, ["orchestration_overhead"],
     "extra wall time of Prefect + DVC + MLflow on the full demo (measured)", "<= 0.05"),
    ("demo_pipeline_seconds_avx2", "demo_ab-flow-direct-avx2", ["seconds", "flow"],
     "demo pipeline wall time (s) on an AVX2 CPU without bf16 (fp32 by `auto`), one run", "< 900"),
    ("demo_zeroshot_top1_avx2", "demo_ab-flow-direct-avx2", ["demo_zeroshot_top1"],
     "its zero-shot top-1", ">= 0.75"),
    ("orchestration_overhead_avx2", "demo_ab-flow-direct-avx2", ["orchestration_overhead"],
     "its Prefect + DVC + MLflow overhead, one pair (noise-sized)", ""),
    ("gpu_masking_speedup_0_5", "gpu", ["masking_speedup_0_5"], "GPU samples/s, masking 0.5 / 0 (B/16)", ""),
    ("gpu_mfu", "gpu", ["runs", "bf16_mask0", "mfu"], "GPU model FLOP utilization, bf16, masking 0 (B/16)", ">= 0.40"),
    ("gpu_fp16_over_bf16", "gpu", ["fp16_over_bf16"], "GPU samples/s, fp16 / bf16 at masking 0.5 (B/16)", ""),
    ("gpu_flash_attn_over_sdpa", "gpu", ["flash_attn_over_sdpa"], "GPU samples/s, flash-attn / sdpa (B/16)", ""),
]


def lookup(name: str, path: list[str]):
    file = RESULTS / f"{name}.json"
    value = json.loads(file.read_text()) if file.is_file() else None
    for part in path:
        value = value.get(part) if isinstance(value, dict) else None
    return value  # None: not measured, or a results file from before this key existed


def measured_commit(name: str) -> str:
    """The commit a demo result measured (its flow arm's), to tell which of two files is newer."""
    return json.loads((RESULTS / f"{name}.json").read_text())["runs"]["flow"][0]["commit"]


def newer(a: str, b: str) -> bool:
    """Whether result `a` measured code that descends from `b`'s (git history decides, not file times)."""
    return subprocess.run(["git", "merge-base", "--is-ancestor", measured_commit(b), measured_commit(a)],
                          cwd=RESULTS, capture_output=True).returncode == 0


def value_of(files, path: list[str]):
    if isinstance(files, str):
        return lookup(files, path)
    found = [name for name in files if lookup(name, path) is not None]
    for name in found:
        if all(other == name or newer(name, other) for other in found):
            return lookup(name, path)
    return lookup(found[0], path) if found else None


def main() -> None:
    summary, rows = {}, []
    for key, files, path, what, goal in HEADLINES:
        value = value_of(files, path)
        if value is None:
            rows.append(f"| {what} | not measured | {goal} |")
            continue
        summary[key] = value
        rows.append(f"| {what} | {value:.3g} | {goal} |")
    (RESULTS / "summary.json").write_text(json.dumps({**summary, "machine": machine()}, indent=2) + "\n")
    print(json.dumps(summary))
    print("\n| ratio | value | goal |\n|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
