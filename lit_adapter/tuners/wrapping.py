"""What the methods that wrap a frozen linear by composition share (LoRA, IA³, BitFit, Adapter v2's scales).

Wrapping is one of the two ways a method attaches (the other is a module in one of the model's hook slots,
:mod:`lit_adapter.model.gpt`). A :class:`LinearWrapper` holds the base layer as ``linear`` and only *calls* it, so the
base may be a plain ``nn.Linear`` or a frozen bitsandbytes ``Linear8bitLt`` / ``Linear4bit``; its own tensors are
small. It is a :class:`~lit_adapter.tuners.base.TunerLayer` whose base layer is the wrapped linear. It answers
``in_features``, ``out_features`` and ``weight`` like the layer it wraps (a tied output head is re-tied through it
after loading), and it accepts a base checkpoint's names (``...k_proj.weight``) for the wrapped
``...k_proj.linear.weight``. :func:`wrap_linears` puts a wrapper around every linear of a model whose attribute
name is targeted and records which of them share their weight with another layer (the output head tied to the
embedding), where folding a method into the weight would change that other layer too.

Each wrapper also says how it folds into the base (:meth:`LinearWrapper.fold_weights`): the ``(W', b')`` of the
plain linear that computes what the wrapper around ``(W, b)`` computes, in float32, or (:meth:`fold_refusal`)
the one-line reason it has none. That one piece of arithmetic serves both the in-place folding for inference
(:meth:`LinearWrapper.fold_into_base`: ``LoRALinear.merge``, ``IA3Linear.fold``) and the export into plain
LLaMA weights (:mod:`lit_adapter.export.merge`), which reads the base weights from the checkpoint instead.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Collection, Dict, Optional, Tuple

import torch
import torch.nn as nn

from lit_adapter.tuners.base import TunerLayer
from lit_adapter.checkpoint import model_key
from lit_adapter.errors import UserError

Folded = Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]
"""A plain linear's ``(weight, bias)``; the bias None when it has none."""


def is_quantized(weight: torch.Tensor) -> bool:
    """Whether ``weight`` is a bitsandbytes (or any non-floating-point) weight, which cannot be scaled in place."""
    return type(weight).__module__.startswith("bitsandbytes") or not weight.is_floating_point()


class LinearWrapper(TunerLayer):
    """A frozen ``linear`` (only called) plus the method's own tensors, named in :attr:`own_names`.

    ``peft_enabled`` False (``tuners.base.switched_off``): the subclass's forward returns ``linear(x)`` alone.
    """

    own_names: ClassVar[Tuple[str, ...]] = ()
    """The wrapper's own parameters and modules; every other key under its prefix belongs to the wrapped layer."""

    def __init__(self, linear: nn.Module) -> None:
        super().__init__()
        self.linear = linear
        # set by wrap_linears when the base weight is also another layer's (a tied output head)
        self.weight_is_shared = False

    def base_layer(self) -> nn.Module:
        return self.linear

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    def __setattr__(self, name: str, value: Any) -> None:
        # keeps ``model.lm_head.weight = model.transformer.wte.weight`` (re-tying after loading) working
        if name == "weight":
            setattr(self.linear, name, value)
        else:
            super().__setattr__(name, value)

    def new_vector(self, size: int, fill: float) -> nn.Parameter:
        """A parameter of ``size`` values ``fill`` beside the base weight: its dtype, or for a quantized base the
        layer's compute dtype (float32 if it has none)."""
        weight = self.linear.weight
        dtype = weight.dtype if weight.is_floating_point() else getattr(self.linear, "compute_dtype", None)
        return nn.Parameter(torch.full((size,), fill, device=weight.device, dtype=dtype or torch.float32))

    def weight_refusal(self) -> Optional[str]:
        """Why the base weight cannot be changed in place (to fold a method into it), or None if it can."""
        if is_quantized(self.linear.weight):
            return (f"its base is a quantized {type(self.linear).__name__}: dequantize-scale-requantize would change "
                    "the base weights; keep it unfolded (its output is the same) or load the base without --quantize")
        if self.weight_is_shared:
            return ("its weight is shared with another layer (the output head tied to the embedding): changing it "
                    "would change that layer too; keep it unfolded")
        return None

    def fold_refusal(self) -> Optional[str]:
        """Why the wrapper has no exact plain-linear form, or None when :meth:`fold_weights` gives it. Unlike
        :meth:`weight_refusal` this is about the arithmetic, not about this base: an export folds into the
        checkpoint's full-precision weights even where the model's own base is quantized or tied."""
        if type(self).fold_weights is LinearWrapper.fold_weights:
            return f"its {type(self).__name__} layers declare no fold into a plain linear"
        return None

    def base_weight_from_checkpoint(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight this layer's base holds, given the base checkpoint's ``weight`` (float32): that weight itself,
        unless the method replaced the base when it attached (PiSSA's and OLoRA's residual ``W - s B0 A0``). The
        export, which reads the base from the checkpoint, folds what this returns."""
        return weight

    def fold_weights(self, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> Folded:
        """``(W', b')`` in float32 of the plain linear equal to this wrapper around a linear ``(W, b)`` (float32;
        ``bias`` None where the base has none, and then ``b'`` None unless the wrapper adds one). ``weight`` None
        asks for the bias alone (an export checks the head's bias before it reads any base weight): a fold's bias
        never depends on the base weight."""
        raise NotImplementedError(f"{type(self).__name__} declares no fold")

    @torch.no_grad()
    def fold_into_base(self, what: str, verb: str = "fold") -> None:
        """Writes :meth:`fold_weights` into the base layer in place, so the wrapper's own arithmetic can be
        skipped at inference; refused (``"cannot <verb> <what> into this layer: <why>"``) where the fold has no
        exact form, the base cannot be changed in place, or the fold adds a bias the base has no place for."""
        refusal = self.fold_refusal() or self.weight_refusal()
        if refusal is not None:
            raise UserError(f"cannot {verb} {what} into this layer: {refusal}")
        weight, bias = self.linear.weight, getattr(self.linear, "bias", None)
        new_weight, new_bias = self.fold_weights(weight.float(), None if bias is None else bias.float())
        if bias is None and new_bias is not None:
            raise UserError(f"cannot {verb} {what} into this layer: it adds a bias and the base layer has none to "
                            "hold it; keep it unfolded")
        weight.copy_(new_weight)
        if bias is not None:
            bias.copy_(new_bias)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # A base checkpoint names the layer's tensors ``<prefix>weight``; here they are ``<prefix>linear.weight``.
        # ``state_dict`` holds the keys under this module; its children are loaded from it afterwards.
        own = {prefix + key for key in self.state_dict(keep_vars=True)}
        for key in [k for k in state_dict if k.startswith(prefix) and k not in own]:
            renamed = model_key(key, own)
            if renamed != key and renamed not in state_dict:
                state_dict[renamed] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def wrapped_layers(model: nn.Module, kind: type = LinearWrapper) -> Dict[str, LinearWrapper]:
    """The wrappers of type ``kind`` in ``model`` by qualified name (``"transformer.h.0.attn.k_proj"``)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, kind)}


def wrap_linears(
    model: nn.Module, names: Collection[str], make: Callable[[str, nn.Module], LinearWrapper]
) -> Dict[str, LinearWrapper]:
    """Replaces, in place, every linear of ``model`` whose attribute name is in ``names`` by ``make(name, linear)``
    (``name`` the attribute name, e.g. ``"k_proj"``); returns the wrappers by qualified name.

    Works on the meta device and on already quantized linears. A tied head keeps its tie: the wrapper holds the
    same ``nn.Linear``, whose weight is the embedding's, and is marked ``weight_is_shared``.
    """
    if wrapped_layers(model):
        raise RuntimeError("the model's linears are already wrapped by a PEFT method")
    targets = [(name, module) for name, module in model.named_modules()
               if name.rpartition(".")[2] in names and hasattr(module, "in_features") and hasattr(module, "weight")]
    counts: Dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        counts[id(param)] = counts.get(id(param), 0) + 1
    wrappers = {}
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        wrapper = make(child, linear)
        wrapper.weight_is_shared = counts.get(id(linear.weight), 0) > 1
        setattr(model.get_submodule(parent_name) if parent_name else model, child, wrapper)
        wrappers[name] = wrapper
    return wrappers
