"""Data: sources -> deterministic webdataset shards (dvc.yaml's prepare stage), the training loader, eval sets."""

from .evalsets import EvalSet, load_eval_set
from .loader import make_train_loader
from .prepare import PrepareResult, prepare

__all__ = ["EvalSet", "PrepareResult", "load_eval_set", "make_train_loader", "prepare"]
