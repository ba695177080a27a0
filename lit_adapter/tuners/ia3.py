"""IA³: Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning", https://arxiv.org/abs/2205.05638 ("Infused Adapter by Inhibiting and Amplifying Inner Activations").

Learned vectors rescale inner activations elementwise: the attention keys and values, ``l_k * k_proj(x)`` and
``l_v * v_proj(x)``, and the feed-forward network's intermediate activation, which in LLaMA's SwiGLU is the input of
``down_proj``: ``down_proj(l_ff * (silu(gate_proj(x)) * up_proj(x)))``. The vectors start at one, so the adapted
model starts exactly as the base model, and only they train: for LLaMA 7B, 32 x (4096 + 4096 + 11008) = 614,400
values. As in HF PEFT (whose ``IA3Config`` the tests use as the oracle) the keys are rescaled at ``k_proj``'s
output, before the rotary embedding, and the targets are configurable (``targets``, and ``feedforward`` for
those whose *input* is rescaled).

:class:`IA3Linear` wraps the base layer by composition and only calls it, so the base may be quantized. For
inference the vectors can be folded into the frozen weights once (``W <- diag(l) W`` for an output scale,
``W <- W diag(l)`` for an input scale; :meth:`IA3Linear.fold_weights`, which the export into plain LLaMA weights
uses too; :meth:`IA3Linear.fold`), which removes the extra multiplication; that needs a
plain floating-point weight that no other layer shares, so a quantized base stays unfolded (same output).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Tuple

import torch
import torch.nn as nn

from lit_adapter.errors import UserError
from lit_adapter.memory.ops import Dims, LinearSite, Saved
from lit_adapter.memory.terms import MemoryTerms
from lit_adapter.model.gpt import GPT
from lit_adapter.tuners.base import Method, PeftAdapter, PeftLayout, Refused
from lit_adapter.tuners.wrapping import Folded, LinearWrapper, wrap_linears, wrapped_layers

IA3_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The block linears IA³ may rescale, in model order."""


def _linear_names(value, what: str) -> Tuple[str, ...]:
    names = value.split(",") if isinstance(value, str) else list(value)
    names = [n.strip() for n in names if n.strip()]
    unknown = sorted(set(names) - set(IA3_LINEARS))
    if unknown:
        raise UserError(f"ia3 {what} {', '.join(unknown)} unknown; choose from {', '.join(IA3_LINEARS)}")
    return tuple(n for n in IA3_LINEARS if n in names)


@dataclass
class IA3Config:
    targets: Tuple[str, ...] = ("k_proj", "v_proj", "down_proj")
    """The block linears to rescale (PEFT's target_modules), from q_proj, k_proj, v_proj, o_proj, gate_proj,
    up_proj, down_proj. The default is the paper's and PEFT's for LLaMA: keys, values and the FFN activation."""
    feedforward: Tuple[str, ...] = ("down_proj",)
    """Those targets whose input is rescaled instead of their output (PEFT's feedforward_modules); down_proj's
    input is the FFN's intermediate activation. A name that is not among the targets has no effect."""

    def __post_init__(self) -> None:
        self.targets = _linear_names(self.targets, "targets")
        if not self.targets:
            raise UserError(f"ia3 targets nothing: name at least one of {', '.join(IA3_LINEARS)}")
        # kept to the targets, so that narrowing the targets does not need the default feedforward changed too
        self.feedforward = tuple(n for n in _linear_names(self.feedforward, "feedforward") if n in self.targets)

    def outputs_scaled(self) -> Tuple[str, ...]:
        return tuple(n for n in self.targets if n not in self.feedforward)


class IA3Linear(LinearWrapper):
    """``linear(x) * l`` (an output scale) or, with ``feedforward``, ``linear(x * l)`` (an input scale)."""

    own_names = ("ia3_l",)

    def __init__(self, linear: nn.Module, feedforward: bool = False) -> None:
        super().__init__(linear)
        self.feedforward = feedforward
        self.ia3_l = self.new_vector(linear.in_features if feedforward else linear.out_features, 1.0)
        self.folded = False

    def reset_peft_parameters(self) -> None:
        """Ones (the identity), allocated beside the base weight if still on meta; a folded vector is unfolded."""
        self.unfold()
        self.materialize()
        with torch.no_grad():
            nn.init.ones_(self.ia3_l)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.peft_enabled:
            if self.folded:  # the vector is inside W: switching it off would not remove it
                raise UserError("cannot switch off a folded IA³ layer: unfold() it first")
            return self.linear(x)
        if self.folded:
            if self.training and torch.is_grad_enabled() and self.ia3_l.requires_grad:
                # the vector is in the weight, so it would silently get no gradient
                raise RuntimeError("training a folded IA³ layer: unfold() it before training")
            return self.linear(x)
        if self.feedforward:
            return self.linear(x * self.ia3_l.to(x.dtype))  # (..., in) scaled, then (..., out)
        y = self.linear(x)  # (..., out)
        return y * self.ia3_l.to(y.dtype)

    def _scaled(self, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], scale: torch.Tensor) -> Folded:
        if self.feedforward:  # W (l * x) + b = (W diag(l)) x + b
            return (None if weight is None else weight * scale[None, :]), bias
        # l * (W x + b) = (diag(l) W) x + l b
        return (None if weight is None else weight * scale[:, None]), (None if bias is None else bias * scale)

    def fold_weights(self, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> Folded:
        """``W diag(l)`` for an input scale; ``diag(l) W`` and ``l b`` for an output scale."""
        return self._scaled(weight, bias, self.ia3_l.float())

    @torch.no_grad()
    def fold(self) -> None:
        """Folds the vector into the base weight (:meth:`fold_weights`); does nothing if already folded."""
        if self.folded:
            return
        self.fold_into_base("IA³")
        self.folded = True

    @torch.no_grad()
    def unfold(self) -> None:
        """Divides the vector out of the base weight again (exact up to float rounding); no-op if not folded."""
        if not self.folded:
            return
        if (self.ia3_l == 0).any():
            raise UserError("cannot unfold IA³: a scale of 0 erased its rows or columns of the base weight")
        weight, bias = self.linear.weight, getattr(self.linear, "bias", None)
        new_weight, new_bias = self._scaled(weight.float(), None if bias is None else bias.float(),
                                            1.0 / self.ia3_l.float())
        weight.copy_(new_weight)
        if bias is not None:
            bias.copy_(new_bias)
        self.folded = False

    def extra_repr(self) -> str:
        return f"scales={'input' if self.feedforward else 'output'}, folded={self.folded}"


@dataclass(frozen=True)
class IA3MemoryTerms(MemoryTerms):
    """What :class:`IA3Linear` keeps for its vector's gradient: the input it rescales, or the output."""

    outputs: Tuple[str, ...] = ()
    """Attribute names of the linears whose output is rescaled, ``linear(x) * l``: ``l``'s gradient needs
    ``linear(x)``."""
    inputs: Tuple[str, ...] = ()
    """Attribute names of the linears whose input is rescaled, ``linear(x * l)``: ``l``'s gradient needs ``x``, and
    the base layer gets the new tensor ``x * l``, which requires a gradient."""

    def linear(self, saved: Saved, site: LinearSite, dims: Dims) -> bool:
        if site.attr in self.inputs:
            saved.add(site.x, site.input_bytes(dims))
            site = replace(site, x=f"{site.name}.ia3_scaled", x_rg=True)
        out_rg = super().linear(saved, site, dims)
        if site.attr in self.outputs:
            saved.add(f"{site.name}.out", site.output_bytes(dims))
            return True
        return out_rg


class IA3(Method):
    name = "ia3"
    summary = ("Fine-tune a frozen LLaMA with IA³ (Liu et al. 2022): learned vectors, initialised to ones, rescale "
               "the attention keys and values (k_proj, v_proj outputs) and the FFN's intermediate activation "
               "(down_proj's input). Only the vectors train (614,400 values for LLaMA 7B).")
    settings_cls = IA3Config
    settings_group = "ia3"
    # the paper's rate (with Adafactor); no weight decay, which would pull the scales from 1 towards 0
    train_defaults = {"learning_rate": 3e-3, "weight_decay": 0.0}
    trained_names = added_names = IA3Linear.own_names

    def attach(self, model: GPT, settings: IA3Config) -> None:
        feedforward = set(settings.feedforward)
        wrap_linears(model, settings.targets, lambda name, linear: IA3Linear(linear, feedforward=name in feedforward))

    def memory_terms(self, settings: IA3Config) -> IA3MemoryTerms:
        return IA3MemoryTerms(outputs=settings.outputs_scaled(), inputs=tuple(settings.feedforward))

    def prepare_for_inference(self, model: nn.Module) -> None:
        for layer in wrapped_layers(model, IA3Linear).values():
            if layer.weight_refusal() is None:  # a quantized or shared base stays unfolded (the same output)
                layer.fold()

    def peft_adapter(self, model: nn.Module, settings: IA3Config, layout: PeftLayout) -> PeftAdapter:
        """PEFT's ``IA3Config`` (``target_modules``, and ``feedforward_modules`` for the input scales). PEFT
        broadcasts an output scale stored (out, 1), an input scale stored (1, in). Output scales of layers fused
        in one HF module (GPT-2's q/k/v in ``c_attn``) become one scale over its output, ones where not adapted;
        an input scale there is refused: the fused layers share one input."""
        layers = wrapped_layers(model, IA3Linear)
        targets = layout.targets(layers)
        tensors, feedforward = {}, []
        for target in targets:
            members = [layers[n] for n in target.members]
            if target.n_slots == 1:
                (layer,) = members
                scale = layer.ia3_l.detach()
                tensors[f"{target.key}.ia3_l"] = scale[None, :] if layer.feedforward else scale[:, None]
                if layer.feedforward:
                    feedforward.append(target.name)
                continue
            inputs = [n for n, m in zip(target.members, members) if m.feedforward]
            if inputs:
                raise Refused(f"it scales the input of {inputs[0].rpartition('.')[2]}, and the layers fused there "
                              f"share one input in {target.name.rpartition('.')[2]}, where PEFT has one input scale "
                              "for all of them")
            out = members[0].out_features
            scale = torch.ones(target.n_slots * out, dtype=members[0].ia3_l.dtype)
            for slot, layer in zip(target.slots, members):
                scale[slot * out:(slot + 1) * out] = layer.ia3_l.detach()
            tensors[f"{target.key}.ia3_l"] = scale[:, None]
        config = {"peft_type": "IA3", "target_modules": list(dict.fromkeys(t.name for t in targets)),
                  "feedforward_modules": list(dict.fromkeys(feedforward)), "fan_in_fan_out": layout.fan_in_fan_out,
                  "init_ia3_weights": True, "modules_to_save": None}
        return PeftAdapter(config, tensors, {f"{n}.ia3_l" for n in layers})


METHOD = IA3()
