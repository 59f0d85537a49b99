"""Padding-free text batches: the text tower computes up to the batch's longest caption, not its context.

open_clip's CLIP text tower is causal and pools one token per caption (its end-of-text token), so the
padding after a caption's end can never reach its features: cutting a batch's trailing padding columns
gives the same features and the same gradients for less compute. The demo's captions take 8 to 12 of its
32 positions, and the text tower was as costly as the vision tower (profiled: `benchmarks/bench_train.py`).

open_clip's `TextTransformer` applies its whole causal mask whatever the sequence length, so a tower that
accepts short batches gets the mask cut to the batch's length (`allow_short_text`). Towers where cutting
would change the result (a class token, pooling the last position, a padding mask) are left alone.

For the same reason the last block only needs its pooled token's row (`pool_text_early`): keys and values
from every position, but one query, one output projection and one MLP per caption.
"""

from __future__ import annotations

import types

import torch
from open_clip.transformer import ResidualAttentionBlock, TextTransformer
from torch.utils.checkpoint import checkpoint


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


def pool_text_early(model: torch.nn.Module) -> bool:
    """Let the text tower's last block compute the pooled (end-of-text) token alone; False where unsafe.

    Under the causal mask, the pooled token reads the keys and values of the positions up to it; no other
    position of the last block reaches the features. Same features and gradients, less work (the text
    counterpart of the vision tower's `pool_early`). Plain open_clip blocks only: other block types keep
    their full forward.
    """
    text = getattr(model, "text", None)
    if text is None or not _cuts_safely(text) or text.output_tokens or not text.transformer.batch_first:
        return False
    last = text.transformer.resblocks[-1]
    if type(last) is not ResidualAttentionBlock or hasattr(last, "ln_1_kv") or not last.attn.batch_first:
        return False
    text.forward = types.MethodType(_forward_pooling_early, text)
    return True


def _forward_pooling_early(self: TextTransformer, text: torch.Tensor) -> torch.Tensor:
    """open_clip's `TextTransformer.forward` for an argmax/eos-pooled causal tower, last block on one row."""
    x, attn_mask = self._embeds(text)
    *blocks, last = self.transformer.resblocks
    for block in blocks:
        if self.transformer.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint(block, x, None, None, attn_mask, use_reentrant=False)
        else:
            x = block(x, attn_mask=attn_mask)
    # Each caption's pooled position, found as open_clip's `text_global_pool` finds it.
    index = text.argmax(dim=-1) if self.pool_type == "argmax" else (text == self.eos_id).int().argmax(dim=-1)
    rows = torch.arange(x.shape[0], device=x.device)
    normed = last.ln_1(x)
    query = normed[rows, index].unsqueeze(1)
    mask = attn_mask[index].to(x.dtype).unsqueeze(1)  # the causal mask's row of each pooled token: (B, 1, L)
    mask = mask.repeat_interleave(last.attn.num_heads, dim=0)  # (B * heads, 1, L), as MultiheadAttention takes it
    pooled = x[rows, index] + last.ls_1(last.attn(query, normed, normed, need_weights=False, attn_mask=mask)[0][:, 0])
    pooled = pooled + last.ls_2(last.mlp(last.ln_2(pooled)))
    pooled = self.ln_final(pooled)
    if self.text_projection is not None:
        pooled = self.text_projection(pooled) if isinstance(self.text_projection, torch.nn.Linear) \
            else pooled @ self.text_projection
    return pooled
