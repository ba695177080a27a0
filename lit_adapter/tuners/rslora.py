"""rsLoRA: rank-stabilized LoRA (Kalajdzievski 2023, https://arxiv.org/abs/2312.03732).

LoRA scales its update by ``alpha / r``, which the paper shows makes the update's learning collapse as the rank
grows (gradients shrink like ``1 / r``), so higher ranks buy nothing. Scaling by ``alpha / sqrt(r)`` instead keeps
the activations and gradients of order one at every rank, and then a larger ``r`` does learn more. Everything else
is LoRA's: ``A`` Kaiming-uniform, ``B = 0``, only ``A`` and ``B`` train and are saved, the same fold
``W + s B A`` with the other ``s``. PEFT's ``LoraConfig(use_rslora=True)`` computes the same, which the tests check
and the PEFT export writes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict

import torch.nn as nn

from lit_adapter.tuners.base import PeftAdapter, PeftLayout, Refused
from lit_adapter.tuners.lora import LoRA, LoRAConfig, LoRALinear
from lit_adapter.tuners.wrapping import wrapped_layers


@dataclass
class RsLoRAConfig(LoRAConfig):
    """rsLoRA's settings: LoRA's, with the update scaled by alpha / sqrt(r) instead of alpha / r."""


class RsLoRALinear(LoRALinear):
    """A :class:`LoRALinear` whose update is scaled by ``alpha / sqrt(r)``."""

    def __init__(self, linear: nn.Module, r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__(linear, r, alpha, dropout)
        self.scaling = alpha / math.sqrt(r)  # B = 0 at init, so LoRA's scale was never applied to anything


class RsLoRA(LoRA):
    name = "rslora"
    summary = ("Fine-tune a frozen LLaMA with rsLoRA (Kalajdzievski 2023): LoRA with its update scaled by "
               "alpha / sqrt(r) instead of alpha / r, so that higher ranks keep learning.")
    settings_cls = RsLoRAConfig
    settings_group = "rslora"

    def peft_options(self, settings: RsLoRAConfig) -> Dict[str, Any]:
        return {"use_rslora": True, "use_dora": False}

    def peft_adapter(self, model: nn.Module, settings: RsLoRAConfig, layout: PeftLayout) -> PeftAdapter:
        """LoRA's mapping with ``use_rslora``; refused where our layers fuse into one HF module (GPT-2's
        ``c_attn``): PEFT would scale that module's rank ``k r`` by ``alpha / sqrt(k r)``, which no
        ``alpha_pattern`` written as LoRA's keeps equal to ours."""
        if any(target.n_slots > 1 for target in layout.targets(wrapped_layers(model, LoRALinear))):
            raise Refused("rsLoRA's alpha / sqrt(r) scale does not survive fusing layers into one PEFT module "
                          "(GPT-2's c_attn); fold the run into the base instead (scripts/convert_to_hf.py --merge true)")
        return super().peft_adapter(model, settings, layout)

    def make_layer(self, linear: nn.Module, settings: LoRAConfig) -> RsLoRALinear:
        return RsLoRALinear(linear, settings.r, settings.alpha, settings.dropout)


METHOD = RsLoRA()
