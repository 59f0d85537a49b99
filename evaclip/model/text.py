"""Padding-free text batches: the text tower computes up to the batch's longest caption, not its context.

open_clip's CLIP text tower is causal and pools one token per caption (its end-of-text token), so the
padding after a caption's end can never reach its features: cutting a batch's trailing padding columns
gives the same features and the same gradients for less compute. The demo's captions take 8 to 12 of its
32 positions, and the text tower was as costly as the vision tower (profiled: `benchmarks/bench_train.py`).

open_clip's `TextTransformer` applies its whole causal mask whatever the sequence length, so a tower that
accepts short batches gets the mask cut to the batch's length (`allow_short_text`). Towers where cutting
would change the result (a class token, pooling the last position, a padding mask) are left alone.
"""

from __future__ import annotations

import types

import torch
from open_clip.transformer import TextTransformer


def _cuts_safely(text: torch.nn.Module) -> bool:
    return (isinstance(text, TextTransformer) and text.attn_mask is not None and text.cls_emb is None
            and not text.use_pad_mask and text.pool_type in ("argmax", "eos"))


def allow_short_text(model: torch.nn.Module) -> bool:
    """Let the model's text tower take batches shorter than its context length; False where unsafe."""
    text = getattr(model, "text", None)
    if text is None or not _cuts_safely(text):
        return False
    if "_embeds" not in text.__dict__:
        text._embeds = types.MethodType(_embeds_with_cut_mask, text)
    text.accepts_short_text = True
    return True


def _embeds_with_cut_mask(self: TextTransformer, text: torch.Tensor):
    x, attn_mask = TextTransformer._embeds(self, text)
    length = x.shape[1]
    if attn_mask is not None and attn_mask.dim() == 2 and attn_mask.shape[0] != length:
        attn_mask = attn_mask[:length, :length]
    return x, attn_mask


def trim_text_padding(model: torch.nn.Module, texts: torch.Tensor) -> torch.Tensor:
    """`texts` without the padding columns after its longest caption, where the model's tower allows it.

    Call it on the CPU batch, before the copy to a GPU: finding the length is then no device sync."""
    text = getattr(model, "text", None)
    if not getattr(text, "accepts_short_text", False) or not _cuts_safely(text) or texts.dim() != 2:
        return texts
    used = (texts != text.pad_id).any(dim=0).nonzero()
    length = int(used[-1]) + 1 if len(used) else 1
    return texts[:, :length]
