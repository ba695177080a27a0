"""Padding-free packing of instruction examples (``--data.packing``): the batch format and the step's micro-batches.

Why: padded micro-batches at Dolly lengths compute about twice the positions they train on (issue 23). A packed
micro-batch lays its examples end to end with no padding at all:

* ``input_ids``, ``labels``: ``(1, L)``, the examples' tokens concatenated (L = their total length). Each
  example's first label is set to the ignore index: the position before it (the previous example's last token)
  must not predict it, and an example alone never has that target either, so the next-token loss is unchanged;
* ``position_ids``: ``(1, L)``, each example's positions from 0 (what HF-style consumers read);
* ``cu_seqlens``: ``(N + 1,)`` int32 offsets, example ``i`` is ``[cu_seqlens[i], cu_seqlens[i + 1])``; the model
  takes it (``GPT.forward(idx, cu_seqlens=...)``) and keeps each example's positions and attention to itself;
* ``lengths``: the same as N Python ints. Fabric's loader moves tensors to the device and leaves a list on the
  host, so the training forward builds its layout from these (``forward_loss(..., lengths=...)``): reading
  ``cu_seqlens`` back from a GPU would make the host wait for the device on every micro-batch.

Which examples share a micro-batch: a step trains on the same examples as padded training (the sampler's step,
:class:`~lit_adapter.data.order.StepBatchSampler`); they are spread over the step's ``accum x world_size``
micro-batches longest first, each to the least-filled one (LPT), so every micro-batch and every rank gets about the
same number of tokens, none above ``--train.micro_batch_tokens``. It stays a pure function of ``(seed, step)``, so
``--resume`` is exact, and with the step-level loss normalisation a step's gradient does not depend on how its
examples were split.
"""

from __future__ import annotations

import itertools

from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch

from lit_adapter.data.order import StepBatchSampler
from lit_adapter.data.truncation import IGNORE_INDEX
from lit_adapter.errors import UserError


def collate_packed(batch: Sequence[Dict[str, torch.Tensor]], ignore_index: int = IGNORE_INDEX) -> Dict[str, Any]:
    """One packed micro-batch of ``batch`` (the format in the module docstring)."""
    if not batch:
        raise ValueError("cannot pack an empty batch")
    labels = []
    for ex in batch:
        target = ex["labels"].clone()
        target[0] = ignore_index  # nothing before an example predicts its first token
        labels.append(target)
    lengths = [len(ex["input_ids"]) for ex in batch]  # host ints, from the shapes: nothing is read back
    cu_seqlens = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    positions = torch.cat([torch.arange(n) for n in lengths])
    return {"input_ids": torch.cat([ex["input_ids"] for ex in batch])[None],  # (1, L)
            "labels": torch.cat(labels)[None],  # (1, L)
            "position_ids": positions[None],  # (1, L)
            "cu_seqlens": cu_seqlens,  # (N + 1,)
            "lengths": lengths}  # N ints, stays on the host


def example_lengths(examples: Sequence[Dict[str, torch.Tensor]]) -> List[int]:
    """Each example's token count; one line naming the first example that has none."""
    lengths = []
    for i, ex in enumerate(examples):
        ids = ex.get("input_ids") if isinstance(ex, dict) else None
        if not isinstance(ids, torch.Tensor) or ids.ndim != 1:
            raise UserError(f"data.packing needs each example's length (a 1-D input_ids), and example {i} has none; "
                            "re-run scripts/prepare_*.py or set --data.packing false")
        lengths.append(len(ids))
    return lengths


def check_budget(lengths: Sequence[int], budget: int) -> None:
    """A micro-batch holds at least its longest example: one line naming it, its length and the fix."""
    if budget < 1:
        raise UserError(f"train.micro_batch_tokens must be >= 1, got {budget}")
    longest = max(range(len(lengths)), key=lambda i: lengths[i], default=None)
    if longest is not None and lengths[longest] > budget:
        raise UserError(f"train.micro_batch_tokens={budget} is smaller than training example {longest} "
                        f"({lengths[longest]} tokens); raise it to at least {lengths[longest]} or cut the examples "
                        f"with --data.max_seq_length {budget}")


def spread(indices: Sequence[int], lengths: Sequence[int], bins: int, budget: int, step: int) -> List[List[int]]:
    """``indices`` over ``bins`` micro-batches, longest first to the least-filled (ties: the lower bin, the earlier
    example), each kept in the order it was drawn: deterministic, balanced in tokens, at most ``budget`` each."""
    order = sorted(range(len(indices)), key=lambda j: (-lengths[indices[j]], j))
    loads, members = [0] * bins, [[] for _ in range(bins)]
    for j in order:
        b = min(range(bins), key=lambda i: (loads[i], i))
        n = lengths[indices[j]]
        if loads[b] + n > budget:
            raise UserError(f"step {step + 1}: its examples do not fit {bins} micro-batches of "
                            f"train.micro_batch_tokens={budget} (one would need {loads[b] + n}); raise "
                            "train.micro_batch_tokens or train.micro_batch_size")
        loads[b] += n
        members[b].append(j)
    return [[indices[j] for j in sorted(m)] for m in members]


class PackedStepBatchSampler:
    """Yields this rank's packed micro-batches (index lists), ``accum`` per step, from ``start_step`` on.

    A step's examples are :class:`StepBatchSampler`'s (the same as padded training); :func:`spread` deals them
    into ``accum x world_size`` micro-batches, and rank ``r`` takes micro-batches ``r, r + world_size, ...``.
    """

    def __init__(self, lengths: Sequence[int], micro_batch_size: int, accum: int, world_size: int, rank: int,
                 seed: int, start_step: int, total_steps: int, budget: int,
                 order: Optional[StepBatchSampler] = None) -> None:
        check_budget(lengths, budget)
        self.lengths, self.budget, self.rank = list(lengths), budget, rank
        # which examples each step trains on: the epochs' permutations, or another order built for rank 0 with the
        # same shape (the category-weighted draws, data.order.CategoryWeightedSampler)
        self.order = order or StepBatchSampler(len(lengths), micro_batch_size, accum, world_size, 0, seed,
                                               start_step, total_steps)
        self.steps_per_epoch = self.order.steps_per_epoch

    def __len__(self) -> int:
        return len(self.order)

    def step_micro_batches(self, step: int) -> List[List[int]]:
        """Every rank's micro-batches of ``step``, in the order the ranks take them."""
        o = self.order
        return spread(o.step_indices(step), self.lengths, o.accum * o.world, self.budget, step)

    def __iter__(self) -> Iterator[List[int]]:
        o = self.order
        for step in range(o.start_step, o.total_steps):
            yield from self.step_micro_batches(step)[self.rank :: o.world]


def padding_share(lengths: Sequence[int], micro_batch_size: int) -> float:
    """The share of padded positions when consecutive groups of ``micro_batch_size`` examples are padded to their
    longest (what padded training computes and packing does not): an estimate for ``--dry_run``."""
    real, computed = 0, 0
    for i in range(0, len(lengths), micro_batch_size):
        group = lengths[i : i + micro_batch_size]
        real += sum(group)
        computed += max(group) * len(group)
    return 1 - real / computed if computed else 0.0
