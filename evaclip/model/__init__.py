"""EVA-CLIP models: open_clip models with an EVA-02 vision tower from timm."""

from .attention import BACKENDS, set_attention_backend
from .factory import create_model, create_transforms, get_tokenizer, model_config, set_token_masking

__all__ = [
    "BACKENDS",
    "create_model",
    "create_transforms",
    "get_tokenizer",
    "model_config",
    "set_attention_backend",
    "set_token_masking",
]
