"""The Lightning Fabric a run trains in, built one way for the training loop, the throughput benchmark and the
memory measurement, so that all three run the same step.

Why not plain ``Fabric(precision=...)``: under ``bf16-true`` / ``16-true`` Fabric casts every floating output of
the model to float32 (``HalfPrecision.convert_output``). For our model that output is the ``(B, T, vocab)`` logits,
so each step held a float32 copy of them that the losses are written to avoid (``--train.loss chunked`` upcasts
256 positions at a time), and under ``chunked_head`` the float32 hidden states then met the bf16 head outside the
forward and the step failed (``expected m1 and m2 to have the same dtype``). Every consumer of the outputs upcasts
what it needs itself (the losses, DPO's ``sequence_logps``, the classification loss), and a bf16 -> float32 cast
is exact, so keeping the model's dtype changes no number, only the memory. FSDP keeps Fabric's own precision
plugin (it must be an ``FSDPPrecision``); ``fsdp`` is FSDP2 through ``ModelParallelStrategy``
(:mod:`lit_adapter.train.sharding`), which takes the same precision plugins as one device. This module imports Lightning, so callers import it where they build the
Fabric, not at the top of modules the command line's ``--help`` loads.
"""

from __future__ import annotations

from typing import Any, Sequence, Union

import torch
from lightning.fabric import Fabric
from lightning.fabric.plugins.precision import HalfPrecision

HALF_TRUE = ("bf16-true", "16-true")


class HalfPrecisionKeepingOutputs(HalfPrecision):
    """Fabric's ``*-true`` half precision, except that the model's outputs stay in the model's dtype."""

    def convert_output(self, data: Any) -> Any:
        return data


def is_first_process() -> bool:
    """Whether this process is the run's first (global rank 0), asked before Fabric is built, from the environment
    the launchers set: torchrun's ``RANK``, SLURM's ``SLURM_PROCID``, or, for processes Lightning starts itself
    (its launcher runs the script again with ``LOCAL_RANK`` set) on each of ``--fabric.num_nodes`` nodes, local rank
    0 of ``NODE_RANK`` 0. Only it claims ``out_dir``: with several nodes every node's first process starts the
    script, and on the shared ``out_dir`` the second one found the folder claimed and refused to start."""
    import os

    for name in ("RANK", "SLURM_PROCID"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name]) == 0
    local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    node = int(os.environ.get("NODE_RANK") or os.environ.get("GROUP_RANK") or 0)
    return local == 0 and node == 0


def make_fabric(accelerator: str = "auto", devices: Union[int, Sequence[int]] = 1, strategy: str = "auto",
                precision: str = "32-true", loggers: Sequence[Any] = (), num_nodes: int = 1) -> Fabric:
    """``Fabric(accelerator, devices, strategy, precision, loggers, num_nodes)``, half ``*-true`` precisions keeping
    the model's outputs in their dtype (see the module's docstring); ``strategy="fsdp"`` is FSDP2
    (:func:`lit_adapter.train.sharding.fsdp_strategy`) on CPU (gloo) and CUDA (nccl) alike."""
    if strategy == "fsdp":
        from lit_adapter.train.sharding import fsdp_strategy

        count = devices if isinstance(devices, int) else len(devices)
        on_gpu = accelerator in ("cuda", "gpu") or (accelerator == "auto" and torch.cuda.is_available())
        strategy = fsdp_strategy(count * num_nodes, reduce_in_float32=on_gpu)
    if precision in HALF_TRUE:
        return Fabric(accelerator=accelerator, devices=devices, strategy=strategy, num_nodes=num_nodes,
                      plugins=[HalfPrecisionKeepingOutputs(precision)], loggers=list(loggers))
    return Fabric(accelerator=accelerator, devices=devices, strategy=strategy, precision=precision,
                  loggers=list(loggers), num_nodes=num_nodes)
