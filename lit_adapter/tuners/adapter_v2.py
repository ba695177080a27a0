"""LLaMA-Adapter V2: Gao et al. 2023, "LLaMA-Adapter V2: Parameter-Efficient Visual Instruction Model",
https://arxiv.org/abs/2304.15010. Semantics follow lit-llama's ``lit_llama/adapter_v2.py``.

V2 keeps v1's gated adaption prompts (:mod:`lit_adapter.tuners.adapter`) and "unlocks" more of the frozen model with
cheap per-channel parameters: every linear layer (q/k/v/o, the MLP's gate/up/down and the output head) gets a
learnable bias (initialised to 0) and scale (initialised to 1) on its output, ``y = scale * (linear(x) + bias)``,
and the RMSNorm weights (``norm_1``, ``norm_2``, ``ln_f``) train too. At initialisation the model is exactly the
pretrained one.

The bias and scale live in :class:`AdapterV2Linear`, a wrapper that only calls the linear it holds, so the frozen
linear may be a quantized bitsandbytes layer. The prompt's keys and values go through the wrapped ``k_proj`` and
``v_proj`` and so see their bias and scale, as in lit-llama.

``--adapter.train_embeddings true`` also trains the token embedding: with v2's trainable norms, LongLoRA's
"LoRA+" unfreezing (Chen et al. 2023) for context extension (``docs/long_context.md``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from lit_adapter.config import Config
from lit_adapter.memory.ops import Dims, LinearSite, Saved
from lit_adapter.memory.terms import HeadEpilogue, MemoryTerms
from lit_adapter.tuners import adapter
from lit_adapter.tuners.adapter import (
    AdapterConfig,
    AdapterMemoryTerms,
    load_adapter_state_dict,
    mark_only_as_trainable,
    materialize,
)
from lit_adapter.tuners.base import EMBEDDING_NAMES, has_name_part
from lit_adapter.tuners.scale_bias import fusable, scale_bias_linear
from lit_adapter.tuners.wrapping import LinearWrapper

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

    @torch.no_grad()
    def reset_peft_parameters(self, device=None, dtype=None) -> None:
        self.adapter_bias = materialize(self.adapter_bias, device, dtype)
        self.adapter_scale = materialize(self.adapter_scale, device, dtype)
        nn.init.zeros_(self.adapter_bias)
        nn.init.ones_(self.adapter_scale)


class GPT(adapter.GPT):
    def __init__(self, config: Config, adapter_config: Optional[AdapterConfig] = None) -> None:
        super().__init__(config, adapter_config)
        for block in self.transformer.h:
            for name in WRAPPED_LINEARS:
                setattr(block.attn, name, AdapterV2Linear(getattr(block.attn, name)))
            for name in WRAPPED_MLP_LINEARS:
                if hasattr(block.mlp, name):  # GPT-2's MLP has no gate_proj
                    setattr(block.mlp, name, AdapterV2Linear(getattr(block.mlp, name)))
        # the wrapped head still holds wte's Parameter, so tied configs stay tied
        self.lm_head = AdapterV2Linear(self.lm_head)

    def base_state_dict_to_v2(self, state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Renames a base checkpoint's keys to this model's (``...q_proj.weight`` -> ``...q_proj.linear.weight``).

        ``load_state_dict`` does this by itself; the renamed dict is for loaders that compare keys first.
        """
        wrapped = {name + "." for name, m in self.named_modules() if isinstance(m, AdapterV2Linear)}
        out = {}
        for key, value in state_dict.items():
            # the wrapper's prefix is everything up to the linear's own tensor name (weight, bias, quant stats)
            owner = next((p for p in wrapped if key.startswith(p)), None)
            if owner is not None and not key[len(owner):].startswith(("linear.", "adapter_")):
                key = owner + "linear." + key[len(owner):]
            out[key] = value
        return out


def adapter_v2_filter(name: str, param: Any = None) -> bool:
    """Whether ``name`` belongs to LLaMA-Adapter V2's trainable set (usable as Fabric's save filter)."""
    return has_name_part(name, ADAPTER_V2_NAMES)


def mark_only_adapter_v2_as_trainable(model: nn.Module) -> None:
    """Freezes everything but prompts, gates, v2 biases and scales, and the RMSNorm weights."""
    mark_only_as_trainable(model, adapter_v2_filter)


def adapter_v2_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {name: t for name, t in model.state_dict().items() if adapter_v2_filter(name)}


def load_adapter_v2_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    load_adapter_state_dict(model, state_dict, method_name="adapter v2", key_filter=adapter_v2_filter)


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

    def build(self, config: Config, settings: AdapterConfig) -> GPT:
        return GPT(config, settings)

    def trained_names_for(self, settings: Optional[AdapterConfig]) -> Tuple[str, ...]:
        return self.trained_names + (EMBEDDING_NAMES if settings is not None and settings.train_embeddings else ())

    def memory_terms(self, settings: AdapterConfig) -> MemoryTerms:
        return AdapterV2MemoryTerms(norms=True, start_layer=settings.start_layer, length=settings.prompt_length,
                                    embedding=settings.train_embeddings, fused=AdapterV2Linear.fused_epilogue)


METHOD = AdapterV2()
