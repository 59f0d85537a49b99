"""LAMB with a trust ratio per parameter tensor, also under DeepSpeed ZeRO-1.

LAMB (You et al. 2019, "Large Batch Optimization for Deep Learning") scales each parameter
tensor's Adam update by ||w|| / ||update|| of *that tensor*. Under ZeRO-1, DeepSpeed hands the
optimizer one flat fp32 partition per parameter group and rank, so a stock LAMB computes one trust
ratio per rank's slice of many tensors: a different optimizer (the EVA-CLIP reference code has this
deviation). `attach_zero_partitions` gives this optimizer the layout DeepSpeed recorded (each
tensor's offset and size in the group's flat buffer, the partition size); `step` then sums squares
per tensor segment, all-reduces those per-tensor sums over the data-parallel group (a tensor can be
split across ranks), and applies each tensor's own ratio to its segment.

The update rule is timm's `Lamb` (bias correction, grad averaging, adaptation only where weight
decay applies unless `always_adapt`), without its internal gradient clipping: DeepSpeed clips.
A test checks that this optimizer equals timm's on plain tensors, and that ZeRO-0 and ZeRO-1 give
the same parameters. DeepSpeed's own `Lamb` (FusedLamb) is CUDA-only and not ZeRO-aware, so this
one runs everywhere, GPUs included.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class _Layout:
    """How one flat ZeRO partition splits into parameter tensors."""

    lengths: torch.Tensor      # elements of each segment in the partition (sums to its size)
    tensor_ids: torch.Tensor   # the group's tensor index of each segment; -1 for alignment padding
    num_tensors: int           # tensors in the group (the size of the all-reduced vectors)
    process_group: object = None


class Lamb(torch.optim.Optimizer):
    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-6,
        weight_decay: float = 0.05,
        bias_correction: bool = True,
        always_adapt: bool = False,
    ):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        bias_correction=bias_correction, always_adapt=always_adapt)
        super().__init__(params, defaults)
        self._layouts: dict[int, _Layout] = {}  # id(flat partition tensor) -> layout

    def attach_zero_partitions(self, zero_optimizer) -> None:
        """Learn each flat partition's tensor layout from a DeepSpeed ZeRO stage 1/2 optimizer."""
        for group_index, group in enumerate(self.param_groups):
            (flat,) = group["params"]
            offsets = zero_optimizer.round_robin_bit16_offsets[group_index]
            numels = [meta.numel() for meta in zero_optimizer.round_robin_bit16_meta[group_index]]
            size = int(zero_optimizer.partition_size[group_index])
            process_group = zero_optimizer.real_dp_process_group[group_index]
            rank = dist.get_rank(group=process_group)
            assert flat.numel() == size, "ZeRO partition size mismatch"
            self._layouts[id(flat)] = _segments(offsets, numels, rank * size, size, process_group)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            group["step"] = group.get("step", 0) + 1
            step = group["step"]
            correction1 = 1 - beta1**step if group["bias_correction"] else 1.0
            correction2 = 1 - beta2**step if group["bias_correction"] else 1.0
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.float() if p.grad.dtype != p.dtype else p.grad
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (exp_avg_sq.sqrt() / correction2**0.5).add_(group["eps"])
                update = (exp_avg / correction1).div_(denom)
                if group["weight_decay"] != 0:
                    update.add_(p, alpha=group["weight_decay"])
                if group["weight_decay"] != 0 or group["always_adapt"]:
                    update.mul_(self._trust_ratio(p, update))
                p.add_(update, alpha=-group["lr"])
        return loss

    def _trust_ratio(self, p: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        layout = self._layouts.get(id(p))
        if layout is None:  # a whole tensor: its own ratio
            return _ratio(p.norm(2.0), update.norm(2.0))
        # Per-tensor sums of squares over this rank's segments, summed over the ranks holding parts.
        sums = torch.zeros(2, layout.num_tensors + 1, dtype=torch.float32, device=p.device)
        target = torch.where(layout.tensor_ids < 0, layout.num_tensors, layout.tensor_ids).to(p.device)
        lengths = layout.lengths.to(p.device)
        for row, values in enumerate((p, update)):
            per_segment = torch.segment_reduce(values.float().pow(2), "sum", lengths=lengths)
            sums[row].index_add_(0, target, per_segment)
        if dist.is_initialized():
            dist.all_reduce(sums, group=layout.process_group)
        ratios = _ratio(sums[0].sqrt(), sums[1].sqrt())
        ratios[layout.num_tensors] = 1.0  # padding
        return ratios[target].repeat_interleave(lengths).to(update.dtype)


def _ratio(weight_norm: torch.Tensor, update_norm: torch.Tensor) -> torch.Tensor:
    # timm / You et al.: 1 where either norm is zero (fresh zero-initialized tensors, zero updates).
    one = torch.ones_like(weight_norm)
    return torch.where(weight_norm > 0, torch.where(update_norm > 0, weight_norm / update_norm, one), one)


def _segments(offsets: list[int], numels: list[int], start: int, size: int, process_group) -> _Layout:
    """Cut [start, start + size) of a flat buffer into the tensors (and padding) it holds."""
    end = start + size
    lengths, tensor_ids = [], []
    position = start
    for index, (offset, numel) in enumerate(zip(offsets, numels, strict=True)):
        lo, hi = max(offset, start), min(offset + numel, end)
        if hi <= lo:
            continue
        if lo > position:  # alignment padding before this tensor
            lengths.append(lo - position)
            tensor_ids.append(-1)
        lengths.append(hi - lo)
        tensor_ids.append(index)
        position = hi
    if position < end:  # padding at the end of the buffer
        lengths.append(end - position)
        tensor_ids.append(-1)
    return _Layout(torch.tensor(lengths), torch.tensor(tensor_ids), len(numels), process_group)
