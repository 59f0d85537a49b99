"""Compute precision: the names `train.precision` takes, their torch dtypes, and what `auto` picks.

bf16 pays only where the hardware computes in it: on a CPU without AVX-512 (an AVX2 EPYC here), PyTorch's
bf16 matrix products fall back to a reference loop, and the demo trained at 13 samples/s in bf16 against
110-124 in fp32 (by hand, the same 2-core machine; on an AVX-512 one bf16 was 1.5x faster than fp32). `auto` therefore picks bf16 on GPUs that have it and on
CPUs whose oneDNN has bf16 kernels (AVX-512 or AMX), fp16 on older GPUs, and fp32 on other CPUs.
"""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def native_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(precision: str, device: torch.device | None = None) -> str:
    """`fp32` / `bf16` / `fp16` as given; `auto` for `device` (default: the first GPU, else the CPU)."""
    if precision != "auto":
        return precision
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if native_bf16(device):
        return "bf16"
    return "fp16" if device.type == "cuda" else "fp32"
