"""Tracking with MLflow: runs (a parent per pipeline run, nested per stage), the pyfunc model, the registry.

The training engine never imports this: it writes metrics.jsonl through a callback, which
`log_run` reads.
"""

from .registry import Decision, champion_uri, decide, register_and_promote, registered_name
from .runs import RECORD, TrackingRecord, log_ablation_table, log_pretrain_run, log_run
from .store import TrackingUnavailableError, connect, tracking_uri

__all__ = ["RECORD", "Decision", "TrackingRecord", "TrackingUnavailableError", "champion_uri", "connect", "decide",
           "log_ablation_table", "log_pretrain_run", "log_run", "register_and_promote", "registered_name", "tracking_uri"]
