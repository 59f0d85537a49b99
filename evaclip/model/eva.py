"""EVA-02 vision towers of our own sizes, registered with timm.

open_clip's timm adapter passes only a model *name* to `timm.create_model` (no image size or
width), so every tower size must exist as a registered timm variant. These follow timm's
`eva02_base_patch16_clip_224` exactly (SwiGLU MLP with sub-LN, attention sub-LN, rotary position
embeddings, CLS-token pooling) and only change the size: the demo trains on a 2-core CPU.

Importing `evaclip.model` registers them; open_clip then builds them from a JSON config like any
other timm tower.
"""

from timm.models import generate_default_cfgs, register_model
from timm.models.eva import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Eva, _cfg, _create_eva

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
    """Let a CLS-pooled EVA tower's last block run its MLP on the class token alone.

    With `token` pooling, only the class token leaves the last block: the other tokens' attention outputs
    are read by no one, so their MLP (two thirds of a block's work) is skipped. The class token still
    attends to every token, so features and gradients are the same. For CLIP training and evaluation; MIM
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
    """timm's `EvaBlock.forward`, keeping only the first `keep_tokens` tokens after the attention."""
    x_attn = self.attn(self.norm1(x), rope=rope, attn_mask=attn_mask, is_causal=is_causal)
    if self.gamma_1 is not None:
        x_attn = self.gamma_1 * x_attn
    x = (x + self.drop_path1(x_attn))[:, :self.keep_tokens]
    x_mlp = self.mlp(self.norm2(x))
    if self.gamma_2 is not None:
        x_mlp = self.gamma_2 * x_mlp
    return x + self.drop_path2(x_mlp)
