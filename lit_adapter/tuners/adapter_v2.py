"""LLaMA-Adapter V2: Gao et al. 2023, "LLaMA-Adapter V2: Parameter-Efficient Visual Instruction Model",
https://arxiv.org/abs/2304.15010. Semantics follow lit-llama's ``lit_llama/adapter_v2.py``.

V2 keeps v1's gated adaption prompts (:mod:`lit_adapter.tuners.adapter`) and "unlocks" more of the frozen model with
cheap per-channel parameters: every linear layer (q/k/v/o, the MLP's gate/up/down and the output head) gets a
learnable bias (initialised to 0) and scale (initialised to 1) on its output, ``y = scale * (linear(x) + bias)``,
and the RMSNorm weights (``norm_1``, ``norm_2``, ``ln_f``) train too. At initialisation the model is exactly the
pretrained one.

The bias and scale live in :class:`AdapterV2Linear`, a wrapper that only calls the linear it holds, so the frozen
linear may be a quantized bitsandbytes layer; the prompts are v1's, in each layer's attention hook slot. The
prompt's keys and values go through the wrapped ``k_proj`` and ``v_proj`` and so see their bias and scale, as in
lit-llama.

``--adapter.train_embeddings true`` also trains the token embedding: with v2's trainable norms, LongLoRA's
"LoRA+" unfreezing (Chen et al. 2023) for context extension (``docs/long_context.md``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn as nn

from lit_adapter.memory.ops import Dims, LinearSite, Saved
from lit_adapter.memory.terms import HeadEpilogue, MemoryTerms
from lit_adapter.model.gpt import GPT
from lit_adapter.tuners import adapter
from lit_adapter.tuners.adapter import AdapterConfig, AdapterMemoryTerms
from lit_adapter.tuners.base import EMBEDDING_NAMES, PeftAdapter, PeftLayout, Refused
from lit_adapter.tuners.scale_bias import fusable, scale_bias_linear
from lit_adapter.tuners.wrapping import Folded, LinearWrapper, wrap_linears

# lit-llama trains "adapter_wte", "gating_factor", "adapter_bias", "adapter_scale", "rms_1", "rms_2", "ln_f";
# our RMSNorms are named norm_1 / norm_2
ADAPTER_V2_NAMES = adapter.ADAPTER_NAMES + ("adapter_bias", "adapter_scale", "norm_1", "norm_2", "ln_f")
WRAPPED_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
WRAPPED_MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")


class AdapterV2Linear(LinearWrapper):
    """``scale * (linear(x) + bias)`` around any linear-like module (``nn.Linear``, bitsandbytes layers)."""

    own_names = ("adapter_bias", "adapter_scale")
    fused_epilogue = True
    """Whether to use the one-node epilogue (lit_adapter.tuners.scale_bias) where it applies (a plain linear, no
    autocast): 1.16x faster with a lower allocator peak (benchmarks/epilogue_ab.py, docs/throughput.md). False
    restores autograd's unfused form; :class:`AdapterV2MemoryTerms` describes whichever is set."""

    def __init__(self, linear: nn.Module) -> None:
        super().__init__(linear)
        self.adapter_bias = self.new_vector(linear.out_features, 0.0)
        self.adapter_scale = self.new_vector(linear.out_features, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_epilogue and self.peft_enabled and fusable(self.linear, x, self.adapter_bias, self.adapter_scale):
            # one autograd node, fewer passes over the output (lit_adapter.tuners.scale_bias)
            return scale_bias_linear(x, self.linear.weight, self.adapter_bias, self.adapter_scale)
        y = self.linear(x)  # (..., out_features)
        if not self.peft_enabled:
            return y
        return self.adapter_scale.to(y.dtype) * (y + self.adapter_bias.to(y.dtype))

    def fold_weights(self, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> Folded:
        """``s * (W x + b + c) = (diag(s) W) x + s (b + c)``."""
        scale, added = self.adapter_scale.float(), self.adapter_bias.float()
        return (None if weight is None else weight * scale[:, None]), scale * (added if bias is None else bias + added)

    @torch.no_grad()
    def reset_peft_parameters(self) -> None:
        """Bias 0 and scale 1 (the identity), allocated beside the base weight if still on meta."""
        self.materialize()
        nn.init.zeros_(self.adapter_bias)
        nn.init.ones_(self.adapter_scale)


def add_scale_bias(model: nn.Module) -> None:
    """Wraps every block linear and the output head in :class:`AdapterV2Linear`, in place (the wrapped head still
    holds the embedding's weight, so a tied model stays tied)."""
    wrap_linears(model, WRAPPED_LINEARS + WRAPPED_MLP_LINEARS + ("lm_head",), lambda _, linear: AdapterV2Linear(linear))


@dataclass(frozen=True)
class AdapterV2MemoryTerms(AdapterMemoryTerms):
    """v1's terms, with ``scale * (linear(x) + bias)`` on every linear and the head.

    The scale's gradient needs ``linear(x) + bias``, so every wrapped linear keeps an output-sized tensor: unfused,
    autograd's ``mul`` saves it; fused (:class:`~lit_adapter.tuners.scale_bias.ScaleBiasLinear`, used on a plain
    ``nn.Linear`` only, so not on a quantized base) the function saves it as ``z`` and also its input (a view of
    the layer's input) for the input's gradient. The prompt's projections keep their outputs the same way; their
    input is the prompt parameter itself, which costs nothing. At the head, the unfused backward forms
    ``grad * scale`` and ``grad * z`` beside the logits' gradient; the fused one forms ``grad * scale`` and
    multiplies the saved ``z`` in place. The estimate models the ``-true`` precisions: under autocast (``*-mixed``)
    the epilogue stays unfused.
    """

    fused: bool = True

    def linear(self, saved: Saved, site: LinearSite, dims: Dims) -> bool:
        super().linear(saved, site, dims)  # the frozen base layer (bitsandbytes' int8 keeps its input)
        saved.add(f"{site.name}.biased", site.output_bytes(dims))
        if self.fused and site.quantize is None:
            saved.add(site.x, site.input_bytes(dims))
        return True

    def prompt_projections(self, saved: Saved, dims: Dims) -> None:
        for name in ("prompt.k", "prompt.v"):
            saved.add(f"{name}.biased", self.length * dims.kv * dims.d)

    def head_epilogue(self) -> HeadEpilogue:
        return HeadEpilogue(kept=1, backward=1 if self.fused else 2)


class AdapterV2(adapter.Adapter):
    name = "adapter_v2"
    summary = ("Fine-tune a frozen LLaMA with LLaMA-Adapter v2 (Gao et al. 2023): v1's gated adaption prompts plus a "
               "learnable bias and scale on every linear layer's output and trainable RMSNorm weights.")
    trained_names = ADAPTER_V2_NAMES
    added_names = adapter.ADAPTER_NAMES + ("adapter_bias", "adapter_scale")

    def attach(self, model: GPT, settings: AdapterConfig) -> None:
        add_scale_bias(model)  # first, so that the prompts' keys and values go through the wrapped k_proj, v_proj
        super().attach(model, settings)

    def trained_names_for(self, settings: Optional[AdapterConfig]) -> Tuple[str, ...]:
        return self.trained_names + (EMBEDDING_NAMES if settings is not None and settings.train_embeddings else ())

    no_peft = "PEFT has no per-linear bias and scale (LLaMA-Adapter v2's), nor trained norms beside a prompt"

    def peft_adapter(self, model: nn.Module, settings: AdapterConfig, layout: PeftLayout) -> PeftAdapter:
        raise Refused(self.no_peft)

    def memory_terms(self, settings: AdapterConfig) -> MemoryTerms:
        return AdapterV2MemoryTerms(norms=True, start_layer=settings.start_layer, length=settings.prompt_length,
                                    embedding=settings.train_embeddings, fused=AdapterV2Linear.fused_epilogue)


METHOD = AdapterV2()
