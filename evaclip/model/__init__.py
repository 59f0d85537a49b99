"""EVA-CLIP models: open_clip models with an EVA-02 vision tower from timm."""

from .attention import BACKENDS, sdpa_kernels_for, set_attention_backend
from .factory import create_model, create_transforms, get_tokenizer, model_config, pool_early, set_token_masking
from .text import allow_short_text, trim_text_padding

__all__ = [
    "BACKENDS",
    "allow_short_text",
    "create_model",
    "create_transforms",
    "get_tokenizer",
    "model_config",
    "pool_early",
    "sdpa_kernels_for",
    "set_attention_backend",
    "set_token_masking",
    "trim_text_padding",
]
