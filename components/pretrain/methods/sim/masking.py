"""SIM's block-wise mask of view A (BEiT's masking generator), drawn in the loader workers with a seeded generator.

Everything draws from one ``torch.Generator`` (never Python's ``random``): a generator seeded from
``(seed, epoch, rank, worker, key, occurrence)`` redraws the same mask after a resume.
"""
from __future__ import annotations

import math

import torch

from components.pretrain.views import DrawCrops, sample_seed

__all__ = ["num_masked_patches", "default_min_block", "block_mask", "DrawCropsAndMask"]

MIN_ASPECT = 0.3  # BEiT's aspect-ratio range of a block: [0.3, 1 / 0.3]
TRIES = 10  # draws per block before the generator gives up on blocks


def num_masked_patches(grid: tuple[int, int], ratio: float) -> int:
    """``round(ratio * L)`` clamped to ``[1, L - 1]`` (at least one masked and one visible patch)."""
    total = grid[0] * grid[1]
    return min(max(int(round(ratio * total)), 1), total - 1)


def default_min_block(grid: tuple[int, int]) -> int:
    """BEiT's smallest block (16 patches of a 14 x 14 grid), scaled to the grid's area; at least 1."""
    return max(1, int(round(16 * grid[0] * grid[1] / 196)))


def _uniform(gen: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=gen, dtype=torch.float64))


def _randint(gen: torch.Generator, lo: int, hi: int) -> int:
    """Uniform integer in ``[lo, hi]`` (inclusive, as Python's ``random.randint``)."""
    return int(torch.randint(lo, hi + 1, (), generator=gen))


def _add_block(mask: torch.Tensor, budget: int, min_block: int, gen: torch.Generator) -> int:
    """Try up to :data:`TRIES` rectangles; mask the first that adds 1..budget new patches. Returns how many."""
    gh, gw = mask.shape
    lo, hi = math.log(MIN_ASPECT), math.log(1 / MIN_ASPECT)
    for _ in range(TRIES):
        area = _uniform(gen, min_block, budget)
        aspect = math.exp(_uniform(gen, lo, hi))
        h = int(round(math.sqrt(area * aspect)))
        w = int(round(math.sqrt(area / aspect)))
        if 0 < h < gh and 0 < w < gw:
            top, left = _randint(gen, 0, gh - h), _randint(gen, 0, gw - w)
            block = mask[top:top + h, left:left + w]
            new = int((~block).sum())
            if 0 < new <= budget:
                block.fill_(True)
                return new
    return 0


def block_mask(grid: tuple[int, int], num_masked: int, generator: torch.Generator | None = None, *,
               min_block: int | None = None, max_block: int | None = None) -> torch.Tensor:
    """A BEiT block-wise mask of exactly ``num_masked`` patches.

    Args:
        grid: ``(gh, gw)`` patches.
        num_masked: patches to mask, ``0 < num_masked < gh * gw``.
        generator: CPU generator (deterministic masks for a seeded one).
        min_block / max_block: block area range in patches (default :func:`default_min_block` / ``num_masked``).
    Returns:
        ``(gh, gw)`` bool, True = masked.

    BEiT (Bao et al. 2021, Alg. 1) masks rectangles of patches until a budget is reached: each block has an area drawn
    uniformly in ``[min_block, remaining budget]`` and an aspect ratio log-uniform in ``[0.3, 1/0.3]``; a block is
    accepted if it masks at least one new patch and no more than the budget (10 tries per block). SIM uses it with a
    *fixed* count (118 of 196 patches at 224 px, ~60 %): when no block fits any more, the remainder is filled with
    random single patches, so every sample has exactly the same number of visible tokens (the visible tokens of a
    batch stack into one ``(B, L_vis, D)`` tensor). BEiT's ``min_block = 16`` at 14 x 14 is scaled with the grid's
    area (:func:`default_min_block`).
    """
    gh, gw = grid
    if not 0 < num_masked < gh * gw:
        raise ValueError(f"num_masked={num_masked} must be in (0, {gh * gw})")
    min_block = default_min_block(grid) if min_block is None else min_block
    max_block = num_masked if max_block is None else max_block
    mask = torch.zeros(gh, gw, dtype=torch.bool)
    count = 0
    while count < num_masked:
        added = _add_block(mask, min(num_masked - count, max_block), min_block, generator)
        if added == 0:
            break
        count += added
    if count < num_masked:  # SIM's fixed count: the remainder as random single patches
        free = (~mask).flatten().nonzero().squeeze(1)
        pick = free[torch.randperm(free.numel(), generator=generator)[: num_masked - count]]
        mask.view(-1)[pick] = True
    return mask


class DrawCropsAndMask(DrawCrops):
    """Loader ``map_fn``: the two crop boxes and flips (:class:`~components.pretrain.views.DrawCrops`) plus view A's
    block mask as ``sample["crops"]["mask"]`` ``(L,)`` bool, so the collate stacks it into ``batch["mask"]``
    ``(B, L)``. The mask's generator is seeded like the crops' (same key and occurrence, its own stream)."""

    def __init__(self, seed: int, epoch: int, rank: int, scale: tuple[float, float], *, grid: tuple[int, int],
                 num_masked: int, min_block: int | None = None, min_overlap: float = 0.01):
        super().__init__(seed, epoch, rank, scale, min_overlap)
        self.grid, self.num_masked, self.min_block = tuple(grid), int(num_masked), min_block

    def __call__(self, sample: dict) -> dict:
        sample = super().__call__(sample)
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        key = sample["key"]
        gen = torch.Generator().manual_seed(
            sample_seed("mask", self.seed, self.epoch, self.rank, worker, key, self._seen[key]))
        sample["crops"]["mask"] = block_mask(self.grid, self.num_masked, gen, min_block=self.min_block).flatten()
        return sample
