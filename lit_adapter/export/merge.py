"""Folding a fine-tuned run into plain LLaMA weights (and biases) that ``LlamaForCausalLM`` holds exactly.

Every base linear of the run is folded, from the inside out, into one ``(W, b)`` with the same output for every
input. The arithmetic is done in float32 (one rounding into the output dtype at the end):

* LoRA: ``W + (alpha / r) B A``;
* IA³: an output scale ``l * (W x + b)`` is ``(diag(l) W) x + l b``; an input scale ``W (l * x)`` is
  ``(W diag(l)) x``;
* BitFit: ``W x + b`` (LLaMA's linears have no bias: the HF config gets ``attention_bias`` / ``mlp_bias``);
* Adapter v2: ``s * (W x + b)`` is ``(diag(s) W) x + s b`` for every linear; its trained RMSNorm weights are
  simply the new norm weights.

What has no exact form in ``LlamaForCausalLM`` is refused with one line saying why, never approximated:
LLaMA-Adapter's adaption prompts (v1 and v2) unless every gate is zero (then they add exactly nothing and are
dropped), a bias on the output head (HF's ``lm_head`` has none: Adapter v2's head bias, ``--bitfit.head``) unless
it is zero, bottleneck adapters, sparse attention and any module this exporter does not know
(:func:`lit_adapter.export.source.inspect_structure`). A head changed by the method on a tied model (LoRA on
``lm_head``, v2's head scale) is exported untied: the embedding keeps the base's matrix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, Tuple

import torch
import torch.nn as nn

from lit_adapter.errors import UserError
from lit_adapter.export.source import Source, StateDict, inspect_structure
from lit_adapter.tuners.adapter_v2 import AdapterV2Linear
from lit_adapter.tuners.bitfit import BitFitLinear
from lit_adapter.tuners.ia3 import IA3Linear
from lit_adapter.tuners.lora import LoRALinear

_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
Folded = Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]


@dataclass
class Merged:
    state_dict: StateDict
    """Our names (``...q_proj.weight``, ``...q_proj.bias`` where there is one), in the output dtype."""
    tie_word_embeddings: bool
    dtype: torch.dtype
    notes: List[str] = field(default_factory=list)


def layer_span(names: List[str]) -> str:
    """``"layers 2-4"`` for ``["transformer.h.2.attn", ..., "transformer.h.4.attn"]``."""
    layers = sorted(int(n.split(".")[2]) for n in names)
    return f"layer {layers[0]}" if len(layers) == 1 else f"layers {layers[0]}-{layers[-1]}"


class _Reader:
    """The tensors of a source by model name (trained first, else the base's), remembering what was read."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self.read: Set[str] = set()
        self.base_read: Set[str] = set()

    def tensor(self, key: str) -> torch.Tensor:
        """``key`` (a model name such as ``...q_proj.linear.weight``) in float32."""
        self.read.add(key)
        base_key = key
        while ".linear." in base_key:  # a wrapper holds the base layer as ``linear``; the checkpoint does not
            base_key = base_key.replace(".linear.", ".")
        trained = self.source.trained
        if key in trained:
            self.base_read.add(base_key)  # a trained norm weight (Adapter v2) replaces the base's
            return trained[key].float()
        base = self.source.base_weights()
        if base_key == "lm_head.weight" and base_key not in base and self.source.config.tie_embeddings:
            base_key = "transformer.wte.weight"  # a tied checkpoint stores the head once, as the embedding
        if base_key not in base:
            raise UserError(f"the checkpoint {self.source.base_dir} has no {base_key}; is it the base of this model?")
        self.base_read.add(base_key)
        return base[base_key].float()

    def skip(self, key: str) -> None:
        """Marks ``key`` as accounted for without using it (a prompt whose gate is zero)."""
        self.read.add(key)


class _Merger:
    def __init__(self, source: Source) -> None:
        self.source = source
        self.reader = _Reader(source)

    def refuse(self, why: str) -> UserError:
        return UserError(f"cannot merge {self.source.label} into LlamaForCausalLM: {why}")

    def fold(self, module: nn.Module, name: str, weights: bool = True) -> Folded:
        """``(W, b)`` of the plain linear equal to ``module`` (``W`` None without ``weights``: only the bias)."""
        read = self.reader.tensor
        kind = type(module)
        if kind is nn.Linear:
            return (read(f"{name}.weight") if weights else None,
                    read(f"{name}.bias") if module.bias is not None else None)
        if kind not in (IA3Linear, BitFitLinear, AdapterV2Linear) and not isinstance(module, LoRALinear):
            raise self.refuse(f"its {kind.__name__} at {name} is not a linear layer this exporter can fold")
        W, b = self.fold(module.linear, f"{name}.linear", weights)
        if isinstance(module, LoRALinear):  # W + (alpha/r) B A, or a variant's own fold (DoRA, PiSSA's residual)
            if weights:
                trained = {n: read(f"{name}.{n}") for n, p in module.named_parameters(recurse=False)}
                W = module.folded(W, trained).to(W.dtype)
            return W, b
        if kind is IA3Linear:
            scale = read(f"{name}.ia3_l")
            if module.feedforward:  # W (l * x) = (W diag(l)) x; the bias is added after
                return (W * scale[None, :] if weights else None), b
            return (W * scale[:, None] if weights else None), (b * scale if b is not None else None)
        if kind is BitFitLinear:
            bias = read(f"{name}.bitfit_bias")
            return W, bias if b is None else b + bias
        scale, bias = read(f"{name}.adapter_scale"), read(f"{name}.adapter_bias")  # Adapter v2: s * (W x + b + c)
        return (W * scale[:, None] if weights else None), scale * (bias if b is None else b + bias)

    def check_prompts(self, prompts: Dict[str, nn.Module]) -> List[str]:
        """Refuses prompts with any non-zero gate; those whose gates are all zero add nothing and are dropped."""
        if not prompts:
            return []
        gated = [name for name in prompts if (self.reader.tensor(f"{name}.gating_factor") != 0).any()]
        if gated:
            raise self.refuse(
                f"its adaption prompts ({layer_span(gated)}) have non-zero gates; a prompt is a second attention "
                "over learned tokens, which LlamaForCausalLM has no place for (only a run whose gates are all zero "
                "merges, its prompts adding nothing)")
        for name in prompts:
            self.reader.skip(f"{name}.adapter_wte.weight")
        return [f"the adaption prompts ({layer_span(list(prompts))}) are left out: every gate is zero, so they "
                "add nothing"]

    def merge(self, dtype: Optional[torch.dtype]) -> Merged:
        source, model, config = self.source, self.source.model, self.source.config
        structure = inspect_structure(model)
        if structure.unknown:
            raise self.refuse(structure.unknown[0][1])
        notes = self.check_prompts(structure.prompts)
        # the head's bias first: it needs no base weights, so a refusal costs no loading
        _, head_bias = self.fold(model.lm_head, "lm_head", weights=False)
        if head_bias is not None and (head_bias != 0).any():
            own = sorted(k for k in source.trained if k.startswith("lm_head.") and "bias" in k.rsplit(".", 1)[-1])
            raise self.refuse(f"its output head has a trained bias ({', '.join(own) or 'lm_head'}), and "
                              "LlamaForCausalLM's lm_head has none")

        dtype = dtype or stored_dtype(source.base_weights())

        def read(key: str) -> torch.Tensor:  # each tensor in the output dtype at once: one float32 copy at a time
            return self.reader.tensor(key).to(dtype)

        def read_norm(name: str, norm: nn.Module) -> None:  # RMSNorm (weight) or LayerNorm (weight, bias)
            for kind in ("weight", "bias"):
                if getattr(norm, kind, None) is not None:
                    out[f"{name}.{kind}"] = read(f"{name}.{kind}")

        out: StateDict = {"transformer.wte.weight": read("transformer.wte.weight")}
        if "wpe" in model.transformer:  # GPT-2's learned positions
            out["transformer.wpe.weight"] = read("transformer.wpe.weight")
        for i, block in enumerate(model.transformer.h):
            prefix = f"transformer.h.{i}"
            read_norm(f"{prefix}.norm_1", block.norm_1)
            for parent, leaves in (("attn", _ATTENTION), ("mlp", _MLP)):
                if parent == "mlp":
                    read_norm(f"{prefix}.norm_2", block.norm_2)
                for leaf in leaves:
                    if not hasattr(getattr(block, parent), leaf):
                        continue  # GPT-2's MLP has no gate_proj
                    name = f"{prefix}.{parent}.{leaf}"
                    W, b = self.fold(getattr(getattr(block, parent), leaf), name)
                    out[f"{name}.weight"] = W.to(dtype)
                    if b is not None:
                        out[f"{name}.bias"] = b.to(dtype)
        read_norm("transformer.ln_f", model.transformer.ln_f)
        head, _ = self.fold(model.lm_head, "lm_head")
        tie = config.tie_embeddings
        if tie and not torch.equal(head, self.reader.tensor("transformer.wte.weight")):
            tie = False
            notes.append(f"the output head is exported untied from the embedding: {source.label} changed the head "
                         "but not the embedding they shared")
        out["lm_head.weight"] = head.to(dtype)

        self._check_everything_read()
        return Merged(out, tie, dtype, notes)

    def _check_everything_read(self) -> None:
        # every tensor of the model must have gone into the output: one that did not is a part LLaMA lacks
        left = sorted(set(self.source.model.state_dict(keep_vars=True)) - self.reader.read)
        if left:
            raise self.refuse(f"its tensors {', '.join(left[:3])}{' ...' if len(left) > 3 else ''} have no place in "
                              "LlamaForCausalLM")
        base = self.source.base_weights()
        extra = sorted(set(base) - self.reader.base_read
                       - ({"lm_head.weight"} if self.source.config.tie_embeddings else set()))
        if extra:
            raise UserError(f"the checkpoint {self.source.base_dir} has tensors the model does not: "
                            f"{', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''}")
        if self.source.config.tie_embeddings and "lm_head.weight" in base and not torch.equal(
                base["lm_head.weight"], base["transformer.wte.weight"]):
            raise UserError(f"the checkpoint {self.source.base_dir} ties lm_head.weight to transformer.wte.weight "
                            "(tie_embeddings=True) but holds two different matrices")


def stored_dtype(weights: StateDict) -> torch.dtype:
    """The dtype a checkpoint's weights are stored in (its embedding's): the default of an export."""
    wte = weights.get("transformer.wte.weight")
    dtype = wte.dtype if wte is not None else next(iter(weights.values())).dtype
    return dtype if dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32


def merge(source: Source, dtype: Optional[torch.dtype] = None) -> Merged:
    """The plain LLaMA state dict (our names) equal to ``source``'s model, in ``dtype`` (default: the base's
    stored dtype); see the module docstring."""
    return _Merger(source).merge(dtype)
