"""Attention backend of the vision tower: `sdpa`, `flash_attn` or `math`.

- `sdpa` (default): `torch.nn.functional.scaled_dot_product_attention`, which picks the fused
  flash / memory-efficient kernels on GPUs and a fused CPU kernel here.
- `math`: the plain reference (q @ k^T, softmax, @ v), timm's non-fused path.
- `flash_attn`: the flash-attn package (GPU only, an optional extra: `pip install -e .[flash]`).

The text tower keeps open_clip's `nn.MultiheadAttention`: its sequences are short (context
length 77) and the vision tower carries the cost the paper optimizes.

Which of SDPA's kernels runs is torch's choice, except in one measured case (`sdpa_kernels_for`): on a
CPU, the fused kernel's backward in bf16/fp16 was 2-5x slower than the math kernel's on the demo's
shapes (vision 128x3x33x64: 21.5 against 9.5 ms forward + backward; text 128x3x10x64: 13.7 against 2.5),
while in fp32, and for inference in any precision, the fused kernel was the faster one.
"""

from __future__ import annotations

import contextlib
import types

import torch
from timm.layers.pos_embed_sincos import apply_rot_embed_cat
from timm.models.eva import EvaAttention
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..errors import EvaclipError

BACKENDS = ("sdpa", "flash_attn", "math")


def set_attention_backend(model: torch.nn.Module, backend: str) -> int:
    """Switch every EVA attention layer of `model` to `backend`; returns how many were switched."""
    if backend not in BACKENDS:
        raise EvaclipError(f"attention backend {backend!r} is unknown: choose one of {', '.join(BACKENDS)}")
    if backend == "flash_attn":
        _require_flash_attn(model)
    layers = [module for module in model.modules() if isinstance(module, EvaAttention)]
    for layer in layers:
        # Drop an earlier flash override so that timm's own forward runs again.
        layer.__dict__.pop("forward", None)
        layer.fused_attn = backend != "math"
        if backend == "flash_attn":
            layer.forward = types.MethodType(_flash_attn_forward, layer)
    return len(layers)


def sdpa_kernels_for(device: torch.device | str | None, dtype: torch.dtype, training: bool):
    """A context for forward passes whose backward will run: SDPA's math kernel where its fused CPU kernel is
    the slower one (training on a CPU in bf16/fp16), torch's own choice everywhere else.

    The kernel is fixed at the forward: autograd records it, so the backward outside the context follows."""
    on_cpu = device is None or torch.device(device).type == "cpu"  # DeepSpeed's CPU engine may say None
    if training and on_cpu and dtype in (torch.bfloat16, torch.float16):
        return sdpa_kernel([SDPBackend.MATH])
    return contextlib.nullcontext()


def _require_flash_attn(model: torch.nn.Module) -> None:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        raise EvaclipError(
            "model.attention=flash_attn needs the flash-attn package (GPU only): "
            "`pip install -e .[flash]` on a CUDA machine, or use model.attention=sdpa, "
            "which runs torch's own flash kernels on GPUs"
        ) from None
    if not torch.cuda.is_available():
        raise EvaclipError("model.attention=flash_attn needs a CUDA GPU; use model.attention=sdpa on CPUs")


def _flash_attn_forward(self: EvaAttention, x, rope=None, attn_mask=None, is_causal=False):
    """timm's `EvaAttention.forward` with the attention product done by flash-attn.

    timm has no hook for a third attention kernel, so this mirrors its forward for the EVA-02
    CLIP layout (separate or fused qkv, rotary embedding after the CLS token, sub-LN).
    """
    from flash_attn import flash_attn_func

    if attn_mask is not None:
        raise EvaclipError("model.attention=flash_attn does not take an attention mask")
    B, N, C = x.shape
    if self.qkv is not None:
        bias = None if self.q_bias is None else torch.cat((self.q_bias, self.k_bias, self.v_bias))
        qkv = torch.nn.functional.linear(x, self.qkv.weight, bias)
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        q = self.q_proj(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)
        k = self.k_proj(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)
        v = self.v_proj(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)
    q, k = self.q_norm(q), self.k_norm(k)
    if rope is not None:
        npt = self.num_prefix_tokens
        half = getattr(self, "rotate_half", False)
        q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope, half=half)], dim=2).type_as(v)
        k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, half=half)], dim=2).type_as(v)
    # flash-attn wants (B, N, heads, head_dim).
    out = flash_attn_func(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        dropout_p=self.attn_drop.p if self.training else 0.0,
        causal=is_causal,
    )
    x = self.norm(out.reshape(B, N, C))
    return self.proj_drop(self.proj(x))
