"""Data: sources -> deterministic webdataset shards (versioned with DVC), the training loader, eval sets."""

from .evalsets import EvalSet, load_eval_set
from .loader import make_train_loader
from .prepare import PrepareResult, prepare
from .versioning import data_version

__all__ = ["EvalSet", "PrepareResult", "data_version", "load_eval_set", "make_train_loader", "prepare"]
