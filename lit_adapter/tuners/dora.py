"""DoRA: Weight-Decomposed Low-Rank Adaptation (Liu et al. 2024, https://arxiv.org/abs/2402.09353).

DoRA splits each adapted weight into a magnitude and a direction and fine-tunes both: the direction with LoRA, the
magnitude as its own vector ``m`` (one value per output row), which the paper finds closer to full fine-tuning's
learning pattern than LoRA at the same rank. With ``W' = W + s B A`` (LoRA's update, ``s = alpha / r``)::

    h = m / ||W'||_c * (W x + s B A x)

``||.||_c`` is the norm of each output row (the paper's column-wise norm of ``W^T``), and it is *detached*: treated
as a constant in backward, which the paper (Sec. 4.3) shows barely changes the gradient and saves the memory of
differentiating through it. ``m`` starts as ``||W||_c``, so with ``B = 0`` the adapted model starts as the base.
``A``, ``B`` and ``m`` train and are saved (PEFT's ``lora_magnitude_vector``). On a quantized base (QDoRA) the norm
is taken of the dequantized weight the layer computes with: the magnitude is computed again once the base is
quantized (:meth:`DoRA.initialize_after_quantization`), as PEFT does on a bitsandbytes layer. For inference DoRA
folds into the weight as ``m * W' / ||W'||_c``.

The arithmetic is PEFT's (``peft/tuners/lora/dora.py``), including its dropout rule: with dropout active the base
term of the update is ``W`` applied to the dropped-out input. The tests compare logits, gradients and the merged
weights with ``peft.get_peft_model(..., LoraConfig(use_dora=True))``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Set, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_adapter.model.quantize import dequantized_weight
from lit_adapter.memory.ops import Dims, LinearSite, Saved
from lit_adapter.tuners.base import PeftLayout, PeftTarget, Refused
from lit_adapter.tuners.lora import LoRA, LoRAConfig, LoRALinear, LoRAMemoryTerms
from lit_adapter.tuners.wrapping import Folded


@dataclass
class DoRAConfig(LoRAConfig):
    """DoRA's settings: LoRA's (rank, alpha, dropout, targets); the magnitude vector needs none."""


class DoRALinear(LoRALinear):
    """LoRA's branch rescaled per output row: ``linear(x) + (m / n - 1) * W x + (m / n) * s B A x`` where ``n`` is
    the detached row norm of ``W + s B A`` (the same as ``m / n * (W x + s B A x)``, computed around the base
    layer's own output as PEFT does)."""

    own_names = LoRALinear.own_names + ("lora_magnitude_vector",)

    def __init__(self, linear: nn.Module, r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__(linear, r, alpha, dropout)
        self.lora_magnitude_vector = nn.Parameter(torch.empty(self.out_features, device=self.lora_A.device,
                                                              dtype=self.lora_A.dtype))
        self.merge_factor: Optional[torch.Tensor] = None  # m / n of the merged weight, to unmerge exactly as PEFT
        self.reset_magnitude()

    def reset_peft_parameters(self) -> None:
        """LoRA's ``A`` and ``B``, then ``m = ||W||_c`` (``B = 0``) on the base weight's device."""
        super().reset_peft_parameters()
        if hasattr(self, "lora_magnitude_vector"):  # LoRALinear's constructor calls this before m exists
            self.reset_magnitude()

    @torch.no_grad()
    def reset_magnitude(self) -> None:
        """``m = ||W + s B A||_c`` of the weight the layer computes with (dequantized on a quantized base)."""
        m = self.lora_magnitude_vector
        if m.is_meta and not self.linear.weight.is_meta:
            m = self.lora_magnitude_vector = nn.Parameter(
                torch.empty(m.shape, device=self.lora_A.device, dtype=self.lora_A.dtype), requires_grad=m.requires_grad)
        if not m.is_meta:
            m.copy_(self.weight_norm())

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """``||W + s B A||_c`` (out,), without gradient (the paper's and PEFT's detached norm)."""
        weight = dequantized_weight(self.linear).to(self.lora_A.dtype)
        return torch.linalg.norm(weight + self.scaling * (self.lora_B @ self.lora_A), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.peft_enabled or self.merged:
            return super().forward(x)  # LoRA's pass-through and merged-state checks
        out = self.linear(x)  # (..., out)
        h = self.lora_dropout(x.to(self.lora_A.dtype))
        lora = F.linear(F.linear(h, self.lora_A), self.lora_B)  # (..., out), unscaled as PEFT
        # The base term of the update: W x, or with dropout active W applied to the dropped-out input (PEFT's rule)
        base = out if isinstance(self.lora_dropout, nn.Identity) or not self.training else self.linear(h.to(x.dtype))
        bias = getattr(self.linear, "bias", None)
        if bias is not None:
            base = base - bias
        scale = self.lora_magnitude_vector / self.weight_norm()  # (out,): m / ||W + s B A||_c, detached norm
        update = (scale - 1) * base.to(scale.dtype) + scale * lora * self.scaling
        return out + update.to(out.dtype)

    def fold_weights(self, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> Folded:
        """``m * (W + s B A) / ||W + s B A||_c`` in float32 (PEFT's merge); the bias is the base's, unscaled."""
        if weight is None:
            return None, bias
        adapted = weight + self.delta_weight()
        norm = torch.linalg.norm(adapted, dim=1)
        return (self.lora_magnitude_vector.float() / norm)[:, None] * adapted, bias

    @torch.no_grad()
    def merge(self) -> None:
        """Replaces ``W`` by the folded weight; remembers ``m / n`` so :meth:`unmerge` can divide it out."""
        if self.merged:
            return
        self._check_mergeable()
        weight = self.linear.weight
        self.merge_factor = (self.lora_magnitude_vector.float() / torch.linalg.norm(
            weight.float() + self.delta_weight().float(), dim=1))[:, None]
        self.fold_into_base("DoRA", verb="merge")
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """``W = W' / (m / n) - s B A`` (PEFT's unmerge), up to float rounding."""
        if not self.merged:
            return
        weight = self.linear.weight
        weight.copy_((weight.float() / self.merge_factor - self.delta_weight().float()).to(weight.dtype))
        self.merge_factor = None
        self.merged = False


class DoRA(LoRA):
    name = "dora"
    summary = ("Fine-tune a frozen LLaMA with DoRA (Liu et al. 2024): LoRA's low-rank update sets each adapted "
               "weight's direction and a trained vector its row norms, m * (W + s B A) / ||W + s B A||. With "
               "--quantize bnb.nf4 this is QDoRA.")
    settings_cls = DoRAConfig
    settings_group = "dora"
    added_names = LoRA.added_names + ("lora_magnitude_vector",)
    trained_names = added_names

    def make_layer(self, linear: nn.Module, settings: LoRAConfig) -> DoRALinear:
        return DoRALinear(linear, settings.r, settings.alpha, settings.dropout)

    def initialize_after_quantization(self, model: nn.Module, settings: DoRAConfig) -> None:
        """QDoRA: the magnitude starts as the row norms of the *dequantized* weights, so that the model starts as
        the quantized base (PEFT computes it on the bitsandbytes layer's dequantized weight)."""
        for module in model.modules():
            if isinstance(module, DoRALinear):
                module.reset_magnitude()

    def peft_options(self, settings: DoRAConfig) -> Dict[str, Any]:
        return {"use_rslora": False, "use_dora": True}

    def peft_target_tensors(self, target: PeftTarget, layers: Mapping[str, LoRALinear], layout: PeftLayout
                            ) -> Tuple[Dict[str, torch.Tensor], Set[str]]:
        """LoRA's tensors plus the magnitude, which PEFT saves as ``lora_magnitude_vector`` (no ``.weight``). A
        magnitude is per row of one weight's norm: layers fused in one HF module (GPT-2's ``c_attn``) are refused,
        their joint norm being another function."""
        if target.n_slots > 1:
            raise Refused(f"DoRA's magnitude is one weight's row norms, and {target.name} fuses {target.n_slots} of "
                          "our layers; fold the run into the base instead (scripts/convert_to_hf.py --merge true)")
        tensors, carried = super().peft_target_tensors(target, layers, layout)
        (name,) = target.members
        tensors["lora_magnitude_vector"] = layers[name].lora_magnitude_vector.detach()
        return tensors, carried | {f"{name}.lora_magnitude_vector"}

    def memory_terms(self, settings: DoRAConfig) -> "DoRAMemoryTerms":
        return DoRAMemoryTerms(targets=tuple(settings.target_names()), r=settings.r, dropout=settings.dropout,
                               embedding=settings.train_embeddings, norms=settings.train_norms)


@dataclass(frozen=True)
class DoRAMemoryTerms(LoRAMemoryTerms):
    """LoRA's set, plus what the magnitude's gradient needs: ``(m / n - 1) * W x`` keeps the base term ``W x`` and
    ``(m / n) * B A x`` the branch's ``B A x``, two (..., out) tensors per adapted linear. Three (out,) vectors:
    ``m / n`` keeps the detached norm ``n``, the branch's product keeps ``m / n``, and ``m / n - 1`` is kept only
    where ``W x`` needs a gradient (the layer's input does)."""

    def linear(self, saved: Saved, site: LinearSite, dims: Dims) -> bool:
        out_rg = super().linear(saved, site, dims)
        if site.attr in self.targets:
            saved.add(f"{site.name}.dora_base", site.output_bytes(dims))
            saved.add(f"{site.name}.dora_branch", site.output_bytes(dims))
            saved.add(f"{site.name}.dora_norm", site.fan_out * dims.d)
            saved.add(f"{site.name}.dora_scale", site.fan_out * dims.d)
            if site.x_rg:
                saved.add(f"{site.name}.dora_scale_minus_one", site.fan_out * dims.d)
        return out_rg


METHOD = DoRA()
