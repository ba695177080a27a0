"""The training data's order: a pure function of ``(seed, step)``, which is what makes ``--resume`` exact.

:class:`StepBatchSampler` visits every example once per epoch; :class:`CategoryWeightedSampler` draws a multi-task
mix with chosen weights per category (``--data.category_weights``), still as a pure function of ``(seed, step)``.
"""

from __future__ import annotations

from typing import Dict, Iterator, List, Mapping, Sequence

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
                    perm, perm_epoch = self.epoch_order(epoch), epoch
                yield perm[within * self.mbs : (within + 1) * self.mbs]

    def step_indices(self, step: int) -> List[int]:
        """Every rank's examples of ``step``, in the order the ranks' micro-batches take them from the epoch's
        permutation (what the packed sampler spreads by tokens)."""
        per_epoch = self.steps_per_epoch * self.accum * self.world
        epoch, within = divmod(step * self.accum * self.world, per_epoch)
        perm = self.epoch_order(epoch)
        size = self.accum * self.world * self.mbs
        return perm[within * self.mbs : within * self.mbs + size]

    def epoch_order(self, epoch: int) -> List[int]:
        """The example indices epoch ``epoch`` visits, in order (a function of the seed and the epoch only)."""
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()


def category_mix(categories: Sequence[str], weights: Mapping[str, float]) -> Dict[str, float]:
    """The share of each category in the sampled mix: each example of category ``c`` is drawn with weight
    ``weights.get(c, 1.0)``, so the share is ``n_c * w_c / sum_k n_k * w_k``; all weights 1 is the data's natural mix."""
    counts: Dict[str, int] = {}
    for name in categories:
        counts[name] = counts.get(name, 0) + 1
    mass = {name: n * float(weights.get(name, 1.0)) for name, n in counts.items()}
    total = sum(mass.values())
    return {name: m / total for name, m in sorted(mass.items(), key=lambda item: (-item[1], item[0]))}


class CategoryWeightedSampler(StepBatchSampler):
    """A :class:`StepBatchSampler` whose epochs are ``n`` draws with replacement, each example of category ``c``
    drawn with probability proportional to ``weights[c]`` (default 1: the natural mix; 0 leaves the category out).

    Why with replacement: up-weighting a small task (Dolly's 709 creative-writing records against 3,742 open-QA
    ones) has to repeat its examples within an epoch. Epoch ``e``'s draws come from a generator seeded with
    ``seed + e`` alone, so the order stays a pure function of ``(seed, step)`` and ``--resume`` stays exact.
    """

    def __init__(self, categories: Sequence[str], weights: Mapping[str, float], micro_batch_size: int, accum: int,
                 world_size: int, rank: int, seed: int, start_step: int, total_steps: int) -> None:
        super().__init__(len(categories), micro_batch_size, accum, world_size, rank, seed, start_step, total_steps)
        per_example = torch.tensor([float(weights.get(name, 1.0)) for name in categories], dtype=torch.float64)
        if not bool((per_example > 0).any()):
            raise ValueError("every category has weight 0: nothing to sample")
        self.probabilities = per_example / per_example.sum()

    def epoch_order(self, epoch: int) -> List[int]:
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.multinomial(self.probabilities, self.n, replacement=True, generator=g).tolist()
