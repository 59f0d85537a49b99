"""Tracking with MLflow: runs (a parent per pipeline run, nested per stage), the pyfunc model, the registry.

The training engine never imports this: the launcher opens a run and rank 0 logs into it through a
callback (`live.py`).
"""

from .registry import Decision, champion_uri, decide, register_and_promote, registered_name
from .runs import RECORD, TrackingRecord, log_run
from .store import TrackingUnavailableError, connect, tracking_uri

__all__ = ["RECORD", "Decision", "TrackingRecord", "TrackingUnavailableError", "champion_uri", "connect", "decide",
           "log_run", "register_and_promote", "registered_name", "tracking_uri"]
