"""Entry point of each pre-training process (what `torchrun` / `deepspeed` start): `pretrain(params)`."""

from __future__ import annotations

import sys

from ..train.worker import run_worker
from .engine import pretrain

if __name__ == "__main__":
    sys.exit(run_worker(pretrain, "pretrain"))
