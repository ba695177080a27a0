"""LoRA+: Efficient Low Rank Adaptation of Large Models (Hayou et al. 2024, https://arxiv.org/abs/2402.12354).

The model is LoRA's; only the optimizer differs. The paper shows that with one learning rate for ``A`` and ``B``
feature learning is inefficient at large width, and that ``B`` should learn ``lambda`` times faster than ``A``
(``lambda = 16`` in their experiments, up to 2x faster convergence). The method declares it through
:meth:`LoRAPlus.param_groups`, so the training loop builds the optimizer as for any method.

The groups are PEFT's ``create_loraplus_optimizer`` (``peft/optimizers/loraplus.py``), which the tests compare
with, group for group and step for step: every ``lora_B`` and every 1-D trained tensor (the norms, with
``train_norms``) learn at ``lr * lr_ratio``; everything else (``lora_A``; the embedding, with
``train_embeddings``: PEFT's separate embedding rate is for LoRA *on* an embedding layer, which ours never is) at
``lr``. The run's weight decay is PEFT's ``loraplus_weight_decay``, except for biases and LayerNorm tensors in the
fast group (PEFT's no-decay group). ``final/`` is LoRA's, and so are the fold and the PEFT export (plain LoRA).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List

import torch.nn as nn

from lit_adapter.errors import UserError
from lit_adapter.tuners.lora import LoRA, LoRAConfig


@dataclass
class LoRAPlusConfig(LoRAConfig):
    """LoRA+'s settings: LoRA's, and how much faster B learns than A."""

    lr_ratio: float = 16.0
    """B's learning rate over A's (the paper's lambda; PEFT's loraplus_lr_ratio): B learns at
    --train.learning_rate times this."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.lr_ratio > 0:
            raise UserError(f"loraplus lr_ratio must be > 0, got {self.lr_ratio!r}")


def no_decay_names(model: nn.Module) -> set:
    """Parameters PEFT's LoRA+ (through transformers' ``get_parameter_names``) exempts from weight decay: biases and
    the tensors of LayerNorm modules (LLaMA's RMSNorm is not one of them)."""
    names = {f"{m}.{p}" if m else p for m, module in model.named_modules() if isinstance(module, nn.LayerNorm)
             for p, _ in module.named_parameters(recurse=False)}
    return names | {n for n, _ in model.named_parameters() if "bias" in n}


class LoRAPlus(LoRA):
    name = "loraplus"
    summary = ("Fine-tune a frozen LLaMA with LoRA+ (Hayou et al. 2024): LoRA whose B learns lr_ratio times "
               "faster than A.")
    settings_cls = LoRAPlusConfig
    settings_group = "loraplus"

    def param_groups(self, model: nn.Module, settings: LoRAPlusConfig, learning_rate: float,
                     weight_decay: float) -> List[Dict[str, Any]]:
        """``A`` (and whatever else trains, not 1-D) at ``learning_rate``; ``B`` and 1-D tensors at
        ``learning_rate * lr_ratio``, biases and LayerNorm tensors among them without weight decay. Empty groups
        are left out."""
        exempt = no_decay_names(model)
        slow, fast, fast_no_decay = [], [], []
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            if "lora_B" in name or param.ndim == 1:
                (fast_no_decay if name in exempt else fast).append(param)
            else:
                slow.append(param)
        fast_lr = learning_rate * settings.lr_ratio
        groups = [{"params": slow, "lr": learning_rate, "weight_decay": weight_decay},
                  {"params": fast, "lr": fast_lr, "weight_decay": weight_decay},
                  {"params": fast_no_decay, "lr": fast_lr, "weight_decay": 0.0}]
        return [group for group in groups if group["params"]]


METHOD = LoRAPlus()
