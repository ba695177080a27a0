"""What the one training loop optimises: an :class:`Objective` owns the examples, their batches and the loss.

The loop in :mod:`lit_adapter.train.run` (setup -> main -> fit -> validate -> save) is the same for every entry point;
what differs between instruction tuning, a classification head and preference optimisation is only

* which examples there are and how they are cut to the context (:meth:`Objective.load_examples`,
  :meth:`Objective.truncate`); every example is a dict with at least a 1-D ``input_ids`` tensor, which the loop's
  vocabulary check reads;
* how a list of examples becomes a batch (:meth:`Objective.collate`);
* the loss of a batch (:meth:`Objective.forward_loss`: the mean and how many items it averages over, which weights
  it in the validation mean; :meth:`Objective.count` counts those items before the forward, for the trainer's
  step-level normalisation) and what else is worth logging (:meth:`Objective.metrics`);
* whether its batches pack (``packing_refusal``, :meth:`Objective.collate_packed`).

The default objective (this base class) is next-token cross-entropy on prepared instruction data, exactly what the
loop did before objectives existed. :class:`MetricSums` is the bookkeeping the others share: sums of tensors kept
separately for training and validation (``model.training`` tells them apart), reduced over the ranks when read.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from lit_adapter.data.instructions import collate_instructions, load_prepared, truncate_examples
from lit_adapter.data.packing import collate_packed
from lit_adapter.data.truncation import IGNORE_INDEX
from lit_adapter.train.losses import forward_loss, target_rows

Example = Dict[str, Any]
Batch = Dict[str, torch.Tensor]


class MetricSums:
    """Running sums of named tensors per phase (``"train"``, ``"val"``), turned into metrics when read."""

    def __init__(self) -> None:
        self._sums: Dict[str, Dict[str, torch.Tensor]] = {"train": {}, "val": {}}

    def add(self, phase: str, **values: torch.Tensor) -> None:
        sums = self._sums[phase]
        for name, value in values.items():
            value = value.detach().double()
            sums[name] = sums[name] + value if name in sums else value

    def pop(self, phase: str, fabric=None) -> Dict[str, torch.Tensor]:
        """The sums of ``phase`` since the last pop (summed over the ranks with ``fabric``), then cleared.

        A collective when ``fabric`` is given: every rank must call it at the same point.
        """
        sums, self._sums[phase] = self._sums[phase], {}
        if fabric is not None and getattr(fabric, "world_size", 1) > 1 and sums:
            sums = {name: fabric.all_reduce(value, reduce_op="sum") for name, value in sorted(sums.items())}
        return sums


def phase(model) -> str:
    """``"train"`` or ``"val"``: the loop validates with ``model.eval()``."""
    return "train" if model.training else "val"


class Objective:
    """Next-token cross-entropy on prepared instruction data (``scripts/prepare_*.py``): the loop's default."""

    name = "next_token"

    def load_examples(self, data_dir) -> Tuple[List[Example], List[Example], Dict[str, Any]]:
        """``(train, val, metadata)``; ``metadata["tokenizer"]["vocab_size"]`` is checked against the model."""
        return load_prepared(data_dir)

    def truncate(self, examples: List[Example], max_len: int) -> Tuple[List[Example], int]:
        """The examples cut to ``max_len`` tokens, and how many were cut; ``self.emptied`` counts those of them left
        without any target token (the loop warns about those)."""
        examples, cut, self.emptied = truncate_examples(examples, max_len)
        return examples, cut

    def collate(self, batch: Sequence[Example], pad_id: int) -> Batch:
        collated = collate_instructions(batch, pad_id=pad_id)
        # made on the host, so it reaches the device with the batch: the head runs on these rows only
        collated["target_rows"] = target_rows(collated["labels"])
        if all("category" in ex for ex in batch):  # the rows' tasks, for validation's per-category losses
            collated["category"] = [ex["category"] for ex in batch]
        return collated

    packing_refusal: Optional[str] = None
    """Why this objective's batches cannot be packed (``--data.packing``), or None: it packs."""

    def collate_packed(self, batch: Sequence[Example]) -> Batch:
        """The examples end to end in one row (``lit_adapter.data.packing``)."""
        collated = collate_packed(batch)
        collated["target_rows"] = target_rows(collated["labels"])
        return collated

    def count(self, batch: Batch) -> torch.Tensor:
        """The items :meth:`forward_loss` averages over (target tokens here), counted before the forward: the
        trainer divides a step's summed loss by their total over every micro-batch and rank."""
        return (batch["labels"][:, 1:] != IGNORE_INDEX).sum()

    def attach(self, model, spec, loss: str) -> None:
        """Called once the model is built (before Fabric wraps it): check that the objective fits it, keep what it
        needs (a reference policy's frozen tensors, ...)."""

    def forward_loss(self, model, batch: Batch, loss: str = "cross_entropy",
                     autocast: Callable = contextlib.nullcontext) -> Tuple[torch.Tensor, int]:
        """The batch's mean loss and the number of items it averages (target tokens here)."""
        return forward_loss(model, batch["input_ids"], batch["labels"], loss, autocast, batch.get("cu_seqlens"),
                            lengths=batch.get("lengths"), rows=batch.get("target_rows"))

    def metrics(self, fabric, phase: str) -> Dict[str, float]:
        """What to log besides the loss for ``phase`` (``"train"`` since the last log, ``"val"`` over the last
        validation); a collective under several devices, so every rank calls it."""
        return {}

    def describe(self) -> Dict[str, Any]:
        """What ``hparams.json`` records of the objective."""
        return {"name": self.name}


NEXT_TOKEN = Objective()


def resolve(objective: Optional[Objective]) -> Objective:
    return NEXT_TOKEN if objective is None else objective
