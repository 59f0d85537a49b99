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
    if dist.get_backend() == "gloo":
        gather_by_broadcasts(deepspeed.comm.comm.cdb)
    _share_launcher_env()
    return dist.get_rank(), dist.get_world_size()


def gather_by_broadcasts(backend) -> None:
    """Run a DeepSpeed comm backend's `all_gather_into_tensor` on gloo as one broadcast from each rank.

    ZeRO-1 gathers every updated parameter partition with it after each step. gloo's own all-gather took
    106 ms for the demo's 14M fp32 parameters on 2 CPU ranks, where one broadcast from each owner took
    25 ms, moving the same bytes (measured side by side on the demo's machine; `benchmarks/bench_peer.py`
    measures the whole step). NCCL keeps DeepSpeed's call.
    """
    gather = backend.all_gather_into_tensor

    def all_gather_into_tensor(output_tensor, input_tensor, group=None, async_op=False):
        if async_op or dist.get_backend(group) != "gloo" or not output_tensor.is_contiguous() \
                or output_tensor.numel() != input_tensor.numel() * dist.get_world_size(group):
            return gather(output_tensor, input_tensor, group=group, async_op=async_op)
        chunks = output_tensor.view(dist.get_world_size(group), -1)
        mine = chunks[dist.get_rank(group)]
        if mine.data_ptr() != input_tensor.data_ptr():  # ZeRO's partition is already a view of the output
            mine.copy_(input_tensor.reshape(-1))
        works = [dist.broadcast(chunk, src=dist.get_global_rank(group, rank) if group is not None else rank,
                                group=group, async_op=True) for rank, chunk in enumerate(chunks)]
        for work in works:
            work.wait()

    backend.all_gather_into_tensor = all_gather_into_tensor


def _share_launcher_env() -> None:
    mine = {key: os.environ[key] for key in SHARED_ENV if os.environ.get(key)}
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    for env in everyone:
        if env.get(RUN_ID_ENV):  # the launcher that opened the run: its id and its tracking URI
            os.environ.update(env)
            return
