"""BitFit: Ben Zaken et al. 2021, "BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based Masked
Language-models", https://arxiv.org/abs/2106.10199.

BitFit trains only the bias terms of a pretrained model and freezes everything else. LLaMA's linears have no
biases, so here BitFit *adds* them: every linear of every block (q_proj, k_proj, v_proj, o_proj, gate_proj,
up_proj, down_proj) gets a trainable bias on its output, ``linear(x) + b``, initialised to zero, so the adapted
model starts exactly as the base model. This is the architecture of HF ``LlamaForCausalLM`` with
``attention_bias=True, mlp_bias=True`` (which the tests use as the oracle), with the pretrained weights and biases
that start at zero. ``head`` adds a bias to the output head too (off by default, as HF's LLaMA head has none).

Per layer that is ``n_head*hs + 2*n_query_groups*hs + n_embd`` attention biases plus ``2*intermediate_size +
n_embd`` MLP biases: 42,496 for LLaMA 7B, 1,359,872 (0.02% of the model) over its 32 layers.

:class:`BitFitLinear` wraps the base layer by composition and only calls it, so the base may be quantized; a tied
head keeps its tie (the bias is the wrapper's own). The bias is not folded for inference: the base linears have
no bias to fold it into, and the addition costs next to nothing. An export into HF's ``LlamaForCausalLM`` folds it
(:meth:`BitFitLinear.fold_weights`) into the biases that ``attention_bias`` / ``mlp_bias`` give its linears.

A model whose linears already have biases (``Config.bias``: GPT-2) is not wrapped: BitFit trains its existing
biases in place, those of every linear and LayerNorm (all tensors named ``bias``, as the paper does on BERT), and
``final/`` holds them under their base names. ``head`` still adds a bias to a head without one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn as nn

from lit_adapter.memory.ops import Dims, LinearSite, Saved
from lit_adapter.memory.terms import MemoryTerms
from lit_adapter.model.gpt import GPT
from lit_adapter.tuners.base import Method
from lit_adapter.tuners.wrapping import Folded, LinearWrapper, wrap_linears

BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class BitFitConfig:
    head: bool = False
    """Also give the output head (lm_head) a trainable bias, one value per vocabulary entry."""

    def target_names(self) -> tuple:
        return BLOCK_LINEARS + (("lm_head",) if self.head else ())


class BitFitLinear(LinearWrapper):
    """``linear(x) + bitfit_bias`` around any linear-like module (``nn.Linear``, bitsandbytes layers)."""

    own_names = ("bitfit_bias",)

    def __init__(self, linear: nn.Module) -> None:
        super().__init__(linear)
        self.bitfit_bias = self.new_vector(linear.out_features, 0.0)

    def reset_peft_parameters(self) -> None:
        """Zeros (the identity), allocated beside the base weight if still on meta."""
        self.materialize()
        with torch.no_grad():
            nn.init.zeros_(self.bitfit_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)  # (..., out_features)
        if not self.peft_enabled:
            return y
        return y + self.bitfit_bias.to(y.dtype)

    def fold_weights(self, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> Folded:
        """``W x + b + c``: the weight as it is, the bias ``b + c`` (``c`` alone on a base without one)."""
        added = self.bitfit_bias.float()
        return weight, added if bias is None else bias + added


@dataclass(frozen=True)
class BitFitMemoryTerms(MemoryTerms):
    """``linear(x) + b`` keeps nothing for ``b``'s gradient, but makes the layer's output require a gradient."""

    targets: Tuple[str, ...] = ()
    """Attribute names of the linears given a trainable output bias."""

    def linear(self, saved: Saved, site: LinearSite, dims: Dims) -> bool:
        return super().linear(saved, site, dims) or site.attr in self.targets


class BitFit(Method):
    name = "bitfit"
    summary = ("Fine-tune a frozen LLaMA with BitFit (Ben Zaken et al. 2021): only biases train. LLaMA's linears have "
               "none, so zero-initialised biases are added to every linear of the blocks (q/k/v/o, gate/up/down; "
               "--bitfit.head adds one to the output head), which leaves the model unchanged at the start. A model "
               "with biases (GPT-2) trains its own: every linear's and LayerNorm's.")
    settings_cls = BitFitConfig
    settings_group = "bitfit"
    # biases are conventionally trained without weight decay
    train_defaults = {"learning_rate": 1e-3, "weight_decay": 0.0}
    # a model with biases of its own (GPT-2) trains them in place: every tensor named ``bias`` (its linears' and
    # LayerNorms', as the paper does on BERT); LLaMA has no such tensor, so there only the added ones train
    trained_names = BitFitLinear.own_names + ("bias",)
    added_names = BitFitLinear.own_names
    no_peft = "PEFT has no BitFit: its bias options train the biases a model has, and LLaMA's linears have none"

    def attach(self, model: GPT, settings: BitFitConfig) -> None:
        """Wraps every block linear (and with ``head`` the output head) that has no bias of its own in
        :class:`BitFitLinear`; a model whose linears have biases (``Config.bias``: GPT-2) trains those instead."""
        config = model.config
        names = () if config.bias else BLOCK_LINEARS
        if settings.head and not config.lm_head_bias:
            names += ("lm_head",)
        if names:
            wrap_linears(model, names, lambda _, linear: BitFitLinear(linear))

    def memory_terms(self, settings: BitFitConfig) -> BitFitMemoryTerms:
        return BitFitMemoryTerms(targets=settings.target_names())


METHOD = BitFit()
