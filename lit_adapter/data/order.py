"""The training data's order: a pure function of ``(seed, step)``, which is what makes ``--resume`` exact."""

from __future__ import annotations

from typing import Iterator, List

import torch


class StepBatchSampler:
    """Yields index lists of micro-batches, starting at a given optimizer step.

    Epoch ``e`` visits the training set in ``randperm(n, seed + e)`` order; a step consumes
    ``accum * world_size`` consecutive micro-batches of it (this rank takes every ``world_size``-th one). The
    remainder of an epoch that does not fill a whole step is dropped, as a fixed-size comparison requires.
    """

    def __init__(self, n: int, micro_batch_size: int, accum: int, world_size: int, rank: int, seed: int,
                 start_step: int, total_steps: int) -> None:
        self.n, self.mbs, self.accum, self.world, self.rank = n, micro_batch_size, accum, world_size, rank
        self.seed, self.start_step, self.total_steps = seed, start_step, total_steps
        self.steps_per_epoch = n // (micro_batch_size * accum * world_size)

    def __len__(self) -> int:
        return (self.total_steps - self.start_step) * self.accum

    def __iter__(self) -> Iterator[List[int]]:
        per_epoch = self.steps_per_epoch * self.accum * self.world
        perm, perm_epoch = None, -1
        for step in range(self.start_step, self.total_steps):
            for micro in range(self.accum):
                global_micro = (step * self.accum + micro) * self.world + self.rank
                epoch, within = divmod(global_micro, per_epoch)
                if epoch != perm_epoch:
                    g = torch.Generator().manual_seed(self.seed + epoch)
                    perm, perm_epoch = torch.randperm(self.n, generator=g).tolist(), epoch
                yield perm[within * self.mbs : (within + 1) * self.mbs]

    def step_indices(self, step: int) -> List[int]:
        """Every rank's examples of ``step``, in the order the ranks' micro-batches take them from the epoch's
        permutation (what the packed sampler spreads by tokens)."""
        per_epoch = self.steps_per_epoch * self.accum * self.world
        epoch, within = divmod(step * self.accum * self.world, per_epoch)
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        size = self.accum * self.world * self.mbs
        return perm[within * self.mbs : within * self.mbs + size]
