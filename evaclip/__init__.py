"""evaclip: train EVA-CLIP models and ship them through a model registry."""

__version__ = "0.1.0"
