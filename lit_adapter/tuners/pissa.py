"""PiSSA: Principal Singular values and Singular vectors Adaptation (Meng et al. 2024,
https://arxiv.org/abs/2404.02948).

LoRA starts its update at zero, with ``A`` random: the first steps train noise. PiSSA starts ``A`` and ``B`` at
the weight's principal components and freezes the rest. With ``W = U S V^T`` (full SVD, singular values
descending) and ``s = alpha / r``::

    A = sqrt(S_r / s) V_r^T      (r, in)
    B = U_r sqrt(S_r / s)        (out, r)
    W_res = W - s B A            the frozen base: W minus its best rank-r approximation

so ``W_res + s B A = W`` and the model starts as the base, while the trained update moves the directions that
matter most. This is PEFT's ``init_lora_weights="pissa"`` (``LoraLayer.pissa_init``), which the tests compare
with. Only ``A`` and ``B`` train; the forward and the fold are LoRA's, on the residual base.

**The residual and ``final/``.** The trained ``A``, ``B`` apply to ``W_res``, not to the checkpoint's ``W``. We
keep ``final/`` as small as LoRA's (``A`` and ``B`` only) and recompute ``W_res`` from the base checkpoint when it
is loaded: :meth:`ResidualLoRA.initialize_from_base`, which the loader calls after loading the base and before
loading the trained tensors, is the same computation in the same place as at the start of training (on CPU, in
float32, before any dtype cast or quantization), so the reloaded model is the trained one bit for bit. The residual
is also well defined beyond one machine: it is ``W`` minus its projection on the top-r singular subspace, which
does not depend on the signs or basis LAPACK picks for the singular vectors. (The other choice, PEFT's
``convert_pissa_to_lora``, saves a rank-2r LoRA of the original base instead: twice the size, and exact only up to
rounding.) Switched off (DPO's reference policy) the layer adds the initial ``s B0 A0 x``
back, kept as unsaved buffers, so it computes the original base, not the residual. A PEFT export writes what PEFT's ``convert_pissa_to_lora`` writes: a plain LoRA of rank ``2 r`` on the
original base, ``[B, B0] [A; -A0]`` (:meth:`ResidualLoRA.peft_adapter`); the fold into a plain checkpoint
(``scripts/convert_to_hf.py --merge true``) recomputes the residual from the checkpoint's weight
(:meth:`ResidualLoRALinear.base_weight_from_checkpoint`).

On a quantized base (QPiSSA) the factorisation runs on the full-precision weight, before the base is quantized,
and the *residual* is what gets quantized, as the paper does and PEFT asks (its ``pissa_init`` refuses a quantized
weight: "initialize PiSSA under float32 ... re-quantize the residual model"). A head tied to the embedding cannot
take a residual (it would change the embedding) and is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Set, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_adapter.errors import UserError
from lit_adapter.tuners.base import PeftAdapter, PeftLayout, PeftTarget, Refused, json_number
from lit_adapter.tuners.lora import LoRA, LoRAConfig, LoRALinear
from lit_adapter.tuners.wrapping import is_quantized


@dataclass
class PiSSAConfig(LoRAConfig):
    """PiSSA's settings: LoRA's; A and B start at the top-r singular vectors of each adapted weight, and the base
    becomes the residual. alpha / r only splits the singular values between the scale and A, B."""


class ResidualLoRALinear(LoRALinear):
    """A :class:`LoRALinear` whose ``A``, ``B`` start as a rank-r factorisation of ``W`` (:meth:`factors`) and
    whose base becomes the residual ``W - s B A``: PiSSA's SVD here, OLoRA's QR in ``tuners/olora.py``."""

    def __init__(self, linear: nn.Module, r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__(linear, r, alpha, dropout)
        # The initial A0, B0 (not saved: recomputed from the base): switched off, the layer adds s B0 A0 x back to
        # the residual, so it computes the *original* base (DPO's reference policy), not the residual.
        self.register_buffer("initial_A", None, persistent=False)
        self.register_buffer("initial_B", None, persistent=False)
        self.base_is_residual = False

    def factors(self, weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` of the float32 ``weight`` (out, in): PiSSA's top-r singular vectors, PEFT's arithmetic."""
        U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
        root = torch.sqrt(S[: self.r] / self.scaling)  # (r,)
        return root[:, None] * Vh[: self.r], U[:, : self.r] * root[None, :]

    def residual(self, weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(W - s B A, A, B)`` of the checkpoint's ``weight``, in float32."""
        weight = weight.float()
        A, B = self.factors(weight)
        return weight - self.scaling * (B @ A), A, B

    @torch.no_grad()
    def initialize_from_weight(self) -> None:
        """Sets ``A``, ``B`` from the base weight and replaces the weight by the residual (once: a second call
        would factor the residual)."""
        weight = self.linear.weight
        if self.base_is_residual:
            raise RuntimeError("this layer's base is already the residual")
        if is_quantized(weight):
            raise UserError(f"{type(self).__name__} factors a full-precision weight: load the base unquantized, "
                            "initialise, then quantize the residual (prepare_model does it in that order)")
        if self.r > min(weight.shape):
            raise UserError(f"{type(self).__name__}: rank {self.r} exceeds the rank of a {tuple(weight.shape)} weight")
        if self.weight_is_shared:
            raise UserError("cannot make the residual of a weight shared with another layer (a head tied to the "
                            "embedding): it would change the embedding too; do not adapt the head")
        residual, A, B = self.residual(weight)
        self.lora_A.copy_(A)
        self.lora_B.copy_(B)
        self.initial_A, self.initial_B = A.to(self.lora_A.dtype), B.to(self.lora_B.dtype)
        weight.copy_(residual.to(weight.dtype))
        self.base_is_residual = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)  # LoRA's (switched off: the residual alone; merged: refused when switched off)
        if self.peft_enabled or self.initial_A is None:
            return out
        initial = F.linear(F.linear(x.to(self.initial_A.dtype), self.initial_A), self.initial_B) * self.scaling
        return out + initial.to(out.dtype)  # W_res x + s B0 A0 x = W x: the original base

    def base_weight_from_checkpoint(self, weight: torch.Tensor) -> torch.Tensor:
        """The residual ``W - s B0 A0`` of the checkpoint's ``weight``, as :meth:`initialize_from_weight` made it."""
        return self.residual(weight)[0].to(weight.dtype)


class ResidualLoRA(LoRA):
    """A LoRA variant whose initial ``A``, ``B`` and residual base come from the base weights (PiSSA, OLoRA)."""

    layer_cls: type = ResidualLoRALinear

    def make_layer(self, linear: nn.Module, settings: LoRAConfig) -> ResidualLoRALinear:
        return self.layer_cls(linear, settings.r, settings.alpha, settings.dropout)

    def peft_adapter(self, model: nn.Module, settings: Any, layout: PeftLayout) -> PeftAdapter:
        """A plain PEFT LoRA of rank ``2 r`` on the *original* base, as PEFT's ``convert_pissa_to_lora`` writes
        one: ``W_res + s B A = W + s (B A - B0 A0) = W + s [B, B0] [A; -A0]``, with ``lora_alpha`` doubled so the
        scale stays ``alpha / r``. ``A0``, ``B0`` are recomputed from the base checkpoint, as on loading."""
        adapter = super().peft_adapter(model, settings, layout)
        config = adapter.config
        if config["rank_pattern"]:
            raise Refused("its layers fuse into one PEFT module (GPT-2's c_attn), which this rank-2r conversion "
                          "does not write; fold the run into the base instead (scripts/convert_to_hf.py --merge true)")
        config.update(r=2 * config["r"], lora_alpha=json_number(2 * config["lora_alpha"]))
        return adapter

    def peft_target_tensors(self, target: PeftTarget, layers: Mapping[str, LoRALinear], layout: PeftLayout
                            ) -> Tuple[Dict[str, torch.Tensor], Set[str]]:
        tensors, carried = super().peft_target_tensors(target, layers, layout)
        if target.n_slots > 1:
            return tensors, carried  # refused by peft_adapter
        (name,) = target.members
        layer = layers[name]
        _, A0, B0 = layer.residual(layout.base_weight(name))
        tensors["lora_A.weight"] = torch.cat([tensors["lora_A.weight"].float(), -A0]).to(layer.lora_A.dtype)
        tensors["lora_B.weight"] = torch.cat([tensors["lora_B.weight"].float(), B0], dim=1).to(layer.lora_B.dtype)
        return tensors, carried

    def initialize_from_base(self, model: nn.Module, settings: Any, checkpoint_dir: Optional[Path]) -> None:
        """Factors every adapted weight into ``A``, ``B`` and the residual base: at the start of training and, the
        same computation, when ``final/`` is loaded (before its trained ``A``, ``B`` replace the initial ones)."""
        for module in model.modules():
            if isinstance(module, ResidualLoRALinear):
                module.initialize_from_weight()


class PiSSA(ResidualLoRA):
    name = "pissa"
    summary = ("Fine-tune a frozen LLaMA with PiSSA (Meng et al. 2024): LoRA whose A and B start at the top-r "
               "singular vectors of each adapted weight, the base becoming the residual W - s B A.")
    settings_cls = PiSSAConfig
    settings_group = "pissa"
    layer_cls = ResidualLoRALinear


METHOD = PiSSA()
