"""Folding a fine-tuned run into plain LLaMA weights (and biases) that ``LlamaForCausalLM`` holds exactly.

Every base linear of the run is folded, from the inside out, into one ``(W, b)`` with the same output for every
input. Each wrapper of a base linear says how (``tuners.wrapping.LinearWrapper.fold_weights``: LoRA's
``W + (alpha / r) B A``, IA³'s scales, BitFit's and Adapter v2's biases), in float32, with one rounding into the
output dtype at the end; the same arithmetic folds them in place for inference. LLaMA's linears have no bias:
where a fold gives one, the HF config gets ``attention_bias`` / ``mlp_bias``. Trained norm weights (Adapter v2)
are simply the new norm weights.

What has no exact form in ``LlamaForCausalLM`` is refused with one line saying why, never approximated. The
modules a method adds that are not wrappers answer for themselves (``tuners.base.FoldAnswer``): LLaMA-Adapter's
adaption prompts are dropped when they add nothing (every gate zero) and refused otherwise; bottleneck adapters
and sparse attention are refused. So are a bias on the output head (HF's ``lm_head`` has none) unless it is zero,
and any module nothing answers for (:func:`lit_adapter.export.source.inspect_structure`). A head changed by the
method on a tied model (LoRA on ``lm_head``, v2's head scale) is exported untied: the embedding keeps the base's
matrix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set

import torch
import torch.nn as nn

from lit_adapter.checkpoint import base_key
from lit_adapter.errors import UserError
from lit_adapter.export.source import Source, StateDict, inspect_structure
from lit_adapter.tuners.registry import is_added
from lit_adapter.tuners.base import FoldAnswer
from lit_adapter.tuners.wrapping import Folded, LinearWrapper

_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass
class Merged:
    state_dict: StateDict
    """Our names (``...q_proj.weight``, ``...q_proj.bias`` where there is one), in the output dtype."""
    tie_word_embeddings: bool
    dtype: torch.dtype
    notes: List[str] = field(default_factory=list)


def layer_span(names: List[str]) -> str:
    """``"layers 2-4"`` for ``["transformer.h.2.attn", ..., "transformer.h.4.attn"]``; the names themselves for
    modules outside the blocks."""
    if not all(n.startswith("transformer.h.") for n in names):
        return ", ".join(names)
    layers = sorted({int(n.split(".")[2]) for n in names})
    return f"layer {layers[0]}" if len(layers) == 1 else f"layers {layers[0]}-{layers[-1]}"


class _Reader:
    """The tensors of a source by model name (trained first, else the base's), remembering what was read."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self.read: Set[str] = set()

    def tensor(self, key: str) -> torch.Tensor:
        """``key`` (a model name such as ``...q_proj.linear.weight``) in float32."""
        self.read.add(key)
        base_name = base_key(key)  # a wrapper holds the base layer as ``linear``; the checkpoint does not
        trained = self.source.trained
        if key in trained:  # a trained norm weight (Adapter v2) replaces the base's
            return trained[key].float()
        base = self.source.base_weights()
        if base_name == "lm_head.weight" and base_name not in base and self.source.config.tie_embeddings:
            base_name = "transformer.wte.weight"  # a tied checkpoint stores the head once, as the embedding
        return base[base_name].float()  # Source.base_weights checked that the base has every key

    def skip(self, key: str) -> None:
        """Marks ``key`` as accounted for without using it (a wrapper's own tensor, which it reads itself; a
        prompt whose gates are zero)."""
        self.read.add(key)


class _Merger:
    def __init__(self, source: Source) -> None:
        self.source = source
        self.reader = _Reader(source)
        self.wrappers: Dict[str, LinearWrapper] = {}

    def refuse(self, why: str) -> UserError:
        return UserError(f"cannot merge {self.source.label} into LlamaForCausalLM: {why}")

    def fold(self, module: nn.Module, name: str, weights: bool = True) -> Folded:
        """``(W, b)`` of the plain linear equal to ``module`` (``W`` None without ``weights``: only the bias)."""
        read = self.reader.tensor
        if type(module) is nn.Linear:
            return (read(f"{name}.weight") if weights else None,
                    read(f"{name}.bias") if module.bias is not None else None)
        if not isinstance(module, LinearWrapper):
            raise self.refuse(f"its {type(module).__name__} at {name} is not a linear layer this exporter can fold")
        refusal = module.fold_refusal()
        if refusal is not None:
            raise self.refuse(f"{name}: {refusal}")
        W, b = self.fold(module.linear, f"{name}.linear", weights)
        for key in module.state_dict(keep_vars=True):  # its own tensors (in the model: the trained values)
            if not key.startswith("linear."):
                self.reader.skip(f"{name}.{key}")
        return module.fold_weights(None if W is None else module.base_weight_from_checkpoint(W), b)

    def check_answers(self, answering: Dict[str, FoldAnswer]) -> List[str]:
        """Refuses the modules that say LLaMA cannot hold them, one line naming the layers of the first reason;
        those that add nothing are dropped with a note, the tensors the method added in them left out."""
        refused: Dict[tuple, List[str]] = {}
        dropped: Dict[str, List[str]] = {}
        for name, module in answering.items():
            refusal = module.fold_refusal()
            if refusal is not None:
                refused.setdefault((module.fold_label, refusal), []).append(name)
                continue
            added = [f"{name}.{k}" for k in module.state_dict(keep_vars=True) if self.is_added_here(f"{name}.{k}")]
            for key in added:
                self.reader.skip(key)
            if added:
                dropped.setdefault(module.fold_label, []).append(name)
        if refused:
            (label, why), names = next(iter(refused.items()))
            raise self.refuse(f"its {label} ({layer_span(names)}) {why}")
        return [f"the {label} ({layer_span(names)}) are left out: at their trained values they add nothing"
                for label, names in dropped.items()]

    def is_added_here(self, key: str) -> bool:
        """Whether ``key`` is a tensor the method added outside a wrapper (a wrapper accounts for its own)."""
        spec = self.source.spec
        owner = key.rpartition(".")[0]
        inside = any(owner == w or owner.startswith(w + ".") for w in self.wrappers)
        return spec is not None and is_added(spec)(key) and not inside

    def merge(self, dtype: Optional[torch.dtype]) -> Merged:
        source, model, config = self.source, self.source.model, self.source.config
        structure = inspect_structure(model)
        self.wrappers = structure.wrappers
        notes = self.check_answers(structure.answering)  # a module's own reason says more than "unknown"
        if structure.unknown:
            raise self.refuse(structure.unknown[0][1])
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
        base = self.source.base_weights()  # its keys and shapes were checked against the model's when read
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
