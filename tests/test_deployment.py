"""prefect.yaml: the deployments it declares. tests/test_stack.py deploys it on a real `prefect server` and
runs it with `prefect deployment run --watch`."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from .conftest import REPO

BIN = Path(sys.executable).parent


def test_prefect_yaml_declares_a_weekly_schedule_on_a_process_pool():
    config = yaml.safe_load((REPO / "prefect.yaml").read_text())
    (deployment,) = config["deployments"]
    assert deployment["entrypoint"] == "flows/pipeline.py:pipeline"
    assert deployment["schedules"][0]["cron"] == "0 3 * * 1"
    assert deployment["work_pool"]["name"] == "evaclip"
