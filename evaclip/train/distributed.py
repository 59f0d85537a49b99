"""Joining the process group, for every stage's ranks (training and MIM pre-training).

On several nodes each node's launcher (`evaclip train --node-rank R`) starts its own ranks, and only
node 0's launcher owns the MLflow run (see `tracking/live.py`). torchrun's c10d rendezvous gives out
global ranks in an order of its own, so rank 0 may live on another node: the launcher's environment
(the run id and tracking URI) is shared with every rank once, at start.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

RUN_ID_ENV = "EVACLIP_MLFLOW_RUN_ID"  # tracking/live.py's: the launcher's MLflow run
SHARED_ENV = (RUN_ID_ENV, "MLFLOW_TRACKING_URI")


def init_distributed() -> tuple[int, int]:
    """Join the process group (NCCL on GPUs, gloo on CPUs); returns (rank, world size)."""
    import deepspeed

    if torch.cuda.is_available():  # before anything touches CUDA: each rank on its own GPU
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # DeepSpeed builds (JIT-compiles at first, ~60 s; then a locked cache check each start) a shared-memory
    # op that serves only its inference all-reduce, which training never calls: not built.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    _share_launcher_env()
    return dist.get_rank(), dist.get_world_size()


def _share_launcher_env() -> None:
    mine = {key: os.environ[key] for key in SHARED_ENV if os.environ.get(key)}
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    for env in everyone:
        if env.get(RUN_ID_ENV):  # the launcher that opened the run: its id and its tracking URI
            os.environ.update(env)
            return
