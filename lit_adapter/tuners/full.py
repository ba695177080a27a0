"""Full fine-tuning: every weight trains. The reference the parameter-efficient methods are measured against.

Nothing is added to the base; the optimizer holds two moments per weight (with ``--train.optimizer adamw8bit``, one
byte each), so it needs several times the memory of any adapter. ``final/`` is a complete checkpoint folder that
loads like a converted base. A quantized base cannot be trained (its integer weights have no gradient): use LoRA on
it instead (QLoRA).
"""

from __future__ import annotations

from typing import Any

from lit_adapter.memory.terms import MemoryTerms
from lit_adapter.tuners.base import Method


class Full(Method):
    name = "full"
    summary = ("Full fine-tuning: every weight of the model trains. The upper bound the PEFT methods are compared "
               "against; it needs the most memory (weights, gradients and two AdamW moments for every parameter).")
    train_defaults = {"learning_rate": 3e-5, "weight_decay": 0.1}
    final_is_checkpoint = True
    trains_quantized_base = False

    def trainable(self, name: str, param: Any = None, settings: Any = None) -> bool:
        return True

    def memory_terms(self, settings: Any) -> MemoryTerms:
        # every weight trains: the generic facts say it all (each linear keeps its input for its weight's gradient)
        return MemoryTerms(norms=True, base_linears=True, embedding=True)


METHOD = Full()
