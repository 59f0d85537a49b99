"""Block-wise masking of image patches (BEiT's, which EVA and EVA-02 use).

Rectangles of random area and aspect ratio are masked until `ratio` of the patches are, so the
student must reconstruct whole regions rather than interpolate isolated patches.
"""

from __future__ import annotations

import math

import torch


def block_mask(grid: tuple[int, int], ratio: float, generator: torch.Generator, min_patches: int = 4,
               max_aspect: float = 1 / 0.3) -> torch.Tensor:
    """A boolean [H*W] mask (True: masked) with exactly round(ratio * H*W) patches masked."""
    height, width = grid
    target = round(ratio * height * width)
    mask = torch.zeros(height, width, dtype=torch.bool)
    log_aspect = (math.log(1 / max_aspect), math.log(max_aspect))
    for _ in range(100):  # BEiT's bounded search; the fill below makes the count exact
        remaining = target - int(mask.sum())
        if remaining <= 0:
            break
        area = _uniform(generator, min(min_patches, remaining), remaining)
        aspect = math.exp(_uniform(generator, *log_aspect))
        h = int(round(math.sqrt(area * aspect)))
        w = int(round(math.sqrt(area / aspect)))
        if not (0 < h <= height and 0 < w <= width):
            continue
        top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
        left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
        block = mask[top:top + h, left:left + w]
        new = int((~block).sum())
        if 0 < new <= remaining:
            block.fill_(True)
    flat = mask.flatten()
    remaining = target - int(flat.sum())
    if remaining > 0:  # top up with single patches, at random
        free = (~flat).nonzero().flatten()
        flat[free[torch.randperm(len(free), generator=generator)[:remaining]]] = True
    return flat


def batch_block_masks(batch: int, grid: tuple[int, int], ratio: float, generator: torch.Generator,
                      min_patches: int = 4) -> torch.Tensor:
    return torch.stack([block_mask(grid, ratio, generator, min_patches) for _ in range(batch)])


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))
