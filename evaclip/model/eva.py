"""EVA-02 vision towers of our own sizes, registered with timm.

open_clip's timm adapter passes only a model *name* to `timm.create_model` (no image size or
width), so every tower size must exist as a registered timm variant. These follow timm's
`eva02_base_patch16_clip_224` exactly (SwiGLU MLP with sub-LN, attention sub-LN, rotary position
embeddings, CLS-token pooling) and only change the size: the demo trains on a 2-core CPU.

Importing `evaclip.model` registers them; open_clip then builds them from a JSON config like any
other timm tower.
"""

import torch
import torch.nn.functional as F
from timm.layers.pos_embed_sincos import apply_rot_embed_cat
from timm.models import generate_default_cfgs, register_model
from timm.models.eva import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Eva, EvaAttention, _cfg, _create_eva

# Keyword arguments that make an Eva an EVA-02 *CLIP* tower (as timm's eva02_*_clip_* variants).
EVA02_CLIP_ARGS = dict(
    qkv_fused=False,
    mlp_ratio=4 * 2 / 3,
    swiglu_mlp=True,
    scale_mlp=True,
    scale_attn_inner=True,
    use_rot_pos_emb=True,
)


# timm reads these by the module attribute name `default_cfgs`; no weights are hosted anywhere.
default_cfgs = generate_default_cfgs({
    "eva02_demo_patch4_clip_32": _cfg(input_size=(3, 32, 32), num_classes=0, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD),
    "eva02_demo_patch4_mim_32": _cfg(input_size=(3, 32, 32), num_classes=0, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD),
    "eva02_micro_patch8_clip_32": _cfg(input_size=(3, 32, 32), num_classes=0, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD),
})


def _eva02_clip(variant: str, pretrained: bool, grid: int, kwargs: dict, **size) -> Eva:
    """An EVA-02 CLIP tower of `size` (img_size, patch_size, embed_dim, depth, num_heads) on a `grid`^2 patch grid."""
    model_args = dict(ref_feat_shape=(grid, grid), global_pool=kwargs.pop("global_pool", "token"), **size,
                      **EVA02_CLIP_ARGS)
    return _create_eva(variant, pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def eva02_demo_patch4_clip_32(pretrained: bool = False, **kwargs) -> Eva:
    """Demo EVA-02 CLIP tower: 32x32 images, 4x4 patches (64 tokens + CLS), width 192, depth 6."""
    return _eva02_clip("eva02_demo_patch4_clip_32", pretrained, 8, kwargs,
                       img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3)


@register_model
def eva02_demo_patch4_mim_32(pretrained: bool = False, **kwargs) -> Eva:
    """The demo tower as a masked-image-modelling backbone (no CLIP projection head)."""
    kwargs.setdefault("num_classes", 0)
    return eva02_demo_patch4_clip_32(pretrained=pretrained, **kwargs)


@register_model
def eva02_micro_patch8_clip_32(pretrained: bool = False, **kwargs) -> Eva:
    """A micro EVA-02 CLIP tower (16 tokens + CLS, width 64, depth 2) for fast multi-process tests."""
    return _eva02_clip("eva02_micro_patch8_clip_32", pretrained, 4, kwargs,
                       img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2)


def pool_vision_early(model) -> bool:
    """Let a CLS-pooled EVA tower's last block compute the class token alone.

    With `token` pooling, only the class token leaves the last block: the other tokens' attention outputs
    are read by no one, so their MLP (two thirds of a block's work) is skipped, and with EVA-02's separate
    q/k/v projections so are their queries and output projection. The class token still attends to every
    token's key and value, so features and gradients are the same. For CLIP training and evaluation; MIM
    pre-training, which reads every token, builds its tower without it. False where it does not apply.
    """
    from timm.models.eva import EvaBlock

    trunk = getattr(getattr(model, "visual", None), "trunk", None)
    if not isinstance(trunk, Eva) or trunk.global_pool != "token" or trunk.attn_pool is not None:
        return False
    last = trunk.blocks[-1]
    if type(last) is not EvaBlock:
        return False
    last.keep_tokens = trunk.num_prefix_tokens
    last.forward = _prefix_only_forward.__get__(last)
    return True


def _prefix_only_forward(self, x, rope=None, attn_mask=None, is_causal=False):
    """timm's `EvaBlock.forward`, computing only the first `keep_tokens` tokens."""
    if _queries_can_be_cut(self.attn, attn_mask, is_causal):
        x_attn = _prefix_query_attention(self.attn, self.norm1(x), self.keep_tokens, rope)
    else:  # timm's attention for every token, then the prefix rows
        x_attn = self.attn(self.norm1(x), rope=rope, attn_mask=attn_mask, is_causal=is_causal)[:, :self.keep_tokens]
    if self.gamma_1 is not None:
        x_attn = self.gamma_1 * x_attn
    x = x[:, :self.keep_tokens] + self.drop_path1(x_attn)
    x_mlp = self.mlp(self.norm2(x))
    if self.gamma_2 is not None:
        x_mlp = self.gamma_2 * x_mlp
    return x + self.drop_path2(x_mlp)


def _queries_can_be_cut(attn, attn_mask, is_causal: bool) -> bool:
    # EVA-02's layout: separate q/k/v projections, no gate; no mask (its rows would need cutting too), and
    # timm's own forward (not the flash_attn override of attention.py).
    return (type(attn) is EvaAttention and attn.qkv is None and attn.gate is None and attn_mask is None
            and not is_causal and "forward" not in attn.__dict__)


def _prefix_query_attention(attn, x, keep: int, rope):
    """timm's `EvaAttention.forward` with queries for the first `keep` tokens only (keys and values for all).

    The kept tokens are prefix tokens, which timm does not rotate: only the keys after the prefix get the
    rotary embedding, exactly as in timm."""
    B, N, C = x.shape
    q = attn.q_proj(x[:, :keep]).reshape(B, keep, attn.num_heads, -1).transpose(1, 2)
    k = attn.k_proj(x).reshape(B, N, attn.num_heads, -1).transpose(1, 2)
    v = attn.v_proj(x).reshape(B, N, attn.num_heads, -1).transpose(1, 2)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        npt = attn.num_prefix_tokens
        half = getattr(attn, "rotate_half", False)
        k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, half=half)], dim=2).type_as(v)
    dropout = attn.attn_drop.p if attn.training else 0.0
    if attn.fused_attn:
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
    else:  # model.attention=math: timm's reference path
        weights = attn.attn_drop((q * attn.scale @ k.transpose(-2, -1)).softmax(dim=-1))
        out = weights @ v
    out = attn.norm(out.transpose(1, 2).reshape(B, keep, -1))
    return attn.proj_drop(attn.proj(out))
