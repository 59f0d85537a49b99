"""DeepSpeed training: the per-rank loop (`engine`), its launcher, checkpoints and callbacks."""

from .callbacks import BaseCallback, Callback, MetricsFile, ProgressBar
from .launch import check_runnable, launch

__all__ = ["BaseCallback", "Callback", "MetricsFile", "ProgressBar", "check_runnable", "launch"]
