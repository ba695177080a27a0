"""The optimizers a run can use (``--train.optimizer``), built one way for the training loop and the measurements."""

from __future__ import annotations

from typing import Any, Dict, Iterable, Tuple, Union

import torch

from lit_adapter.errors import UserError
from lit_adapter.tracking.quiet import import_bitsandbytes

OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit")

ParamsOrGroups = Union[Iterable[torch.nn.Parameter], Iterable[Dict[str, Any]]]


def build_optimizer(params: ParamsOrGroups, name: str = "adamw", lr: float = 1e-3, weight_decay: float = 0.0,
                    betas: Tuple[float, float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    """AdamW: torch's, or bitsandbytes' 8-bit (optionally paged) implementation.

    ``params`` is the tensors or parameter groups (dicts with ``params`` and their own ``lr``, ``weight_decay``:
    ``Method.param_groups``); ``lr`` and ``weight_decay`` are the defaults of groups that do not set them.

    bitsandbytes' 8-bit AdamW keeps its moments in uint8 for tensors of 4096+ values (a quarter of the state); the
    paged variant lets CUDA state spill to host memory under pressure (on CPU it runs unpaged).
    """
    kwargs = dict(lr=lr, weight_decay=weight_decay, betas=betas)
    if name == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    if name not in OPTIMIZERS:
        raise UserError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    bnb = import_bitsandbytes()

    cls = {"adamw8bit": bnb.optim.AdamW8bit, "paged_adamw8bit": bnb.optim.PagedAdamW8bit}[name]
    return cls(params, **kwargs)
