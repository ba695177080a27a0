"""LoRA: Low-Rank Adaptation of Large Language Models (Hu et al. 2021, https://arxiv.org/abs/2106.09685).

A frozen weight ``W`` (out, in) is adapted by a trainable low-rank update: ``h = W x + (alpha / r) * B A x`` with
``A`` (r, in) and ``B`` (out, r), ``r << min(in, out)``. ``A`` starts Kaiming-uniform and ``B`` at zero, so the
adapted model starts exactly as the base model. Only ``A`` and ``B`` train and are saved (kilobytes to megabytes).

:class:`LoRALinear` wraps the base layer by composition and only *calls* it, so the base may be a plain
``nn.Linear`` or a frozen bitsandbytes ``Linear8bitLt`` / ``Linear4bit`` (QLoRA, Dettmers et al. 2023). Training
runs unmerged; for inference the update can be folded into ``W`` once (:meth:`LoRALinear.merge`, which the
method's ``prepare_for_inference`` calls on every layer), which removes the extra matmuls, and folded out again
(:meth:`LoRALinear.unmerge`); the fold, ``W + (alpha / r) B A``, is :meth:`LoRALinear.fold_weights`, which the
export into plain LLaMA weights uses too. Merging needs a plain floating-point ``W`` that no other layer shares: a quantized or tied base stays unmerged (its output is the same, only a little slower).

Naming follows HF PEFT (``lora_A``, ``lora_B``, ``alpha``, ``r``) and so does the arithmetic, which the tests check
against ``peft.get_peft_model`` number for number.

``train_embeddings`` and ``train_norms`` also unfreeze the token embedding and every RMSNorm weight: LongLoRA's
"LoRA+" (Chen et al. 2023, https://arxiv.org/abs/2309.12307, Sec. 3.3), which found plain LoRA unable to close the
gap to full fine-tuning when extending the context and these few tensors enough to. They are saved with ``A`` and
``B`` (the embedding is ``vocab x n_embd``: megabytes, not kilobytes). With a tied head the head trains too: it is
the embedding's weight. The LongLoRA recipe in full: ``configs/long_context_stories260k.yaml`` and
``docs/long_context.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Set, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_adapter.errors import UserError
from lit_adapter.memory.ops import Dims, LinearSite, Saved, dropout
from lit_adapter.memory.terms import MemoryTerms
from lit_adapter.model.gpt import GPT
from lit_adapter.tuners.base import EMBEDDING_NAMES, NORM_NAMES, Method, PeftAdapter, PeftLayout, PeftTarget, Refused, \
    json_number, one_value
from lit_adapter.tuners.wrapping import Folded, LinearWrapper, wrap_linears, wrapped_layers


@dataclass
class LoRAConfig:
    r: int = 8
    """Rank of the low-rank update B @ A."""
    alpha: float = 16.0
    """Scale of the update: it is multiplied by alpha / r."""
    dropout: float = 0.05
    """Dropout on the input of the LoRA branch (training only)."""
    query: bool = True
    """Adapt the attention query projection (q_proj)."""
    key: bool = False
    """Adapt the attention key projection (k_proj)."""
    value: bool = True
    """Adapt the attention value projection (v_proj)."""
    projection: bool = False
    """Adapt the attention output projection (o_proj)."""
    mlp: bool = False
    """Adapt the MLP projections (gate_proj, up_proj, down_proj)."""
    head: bool = False
    """Adapt the output head (lm_head)."""
    train_embeddings: bool = False
    """Also train the token embedding (LongLoRA's LoRA+; with a tied head, the head too)."""
    train_norms: bool = False
    """Also train every RMSNorm weight (LongLoRA's LoRA+)."""

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise UserError(f"lora r must be an integer >= 1, got {self.r!r}")
        if not self.alpha > 0:
            raise UserError(f"lora alpha must be > 0, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise UserError(f"lora dropout must be in [0, 1), got {self.dropout!r}")
        if not self.target_names():
            raise UserError("lora targets nothing: enable at least one of query, key, value, projection, mlp, head")

    def target_names(self) -> List[str]:
        """The attribute names of the linear layers to adapt, e.g. ``["q_proj", "v_proj"]``."""
        names = []
        for flag, layers in (
            (self.query, ("q_proj",)),
            (self.key, ("k_proj",)),
            (self.value, ("v_proj",)),
            (self.projection, ("o_proj",)),
            (self.mlp, ("gate_proj", "up_proj", "down_proj")),
            (self.head, ("lm_head",)),
        ):
            if flag:
                names.extend(layers)
        return names


class LoRALinear(LinearWrapper):
    """``linear(x) + dropout(x) @ A^T @ B^T * (alpha / r)`` around a frozen base ``linear``.

    ``linear`` is only called and asked for ``in_features`` / ``out_features``, so it may be quantized; the wrapper
    (:class:`~lit_adapter.tuners.wrapping.LinearWrapper`) passes ``weight`` through, so a tied head stays tied.
    """

    own_names = ("lora_A", "lora_B", "lora_dropout")

    def __init__(self, linear: nn.Module, r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__(linear)
        self.r = r
        self.alpha = alpha
        self.scaling = alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        weight = linear.weight
        # A quantized base stores integers; the LoRA matrices then take the layer's compute dtype.
        dtype = weight.dtype if weight.is_floating_point() else getattr(linear, "compute_dtype", None) or torch.float32
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=weight.device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, device=weight.device, dtype=dtype))
        self.merged = False
        self.reset_peft_parameters()

    def reset_peft_parameters(self) -> None:
        """Initial values as in the paper and PEFT: A ~ Kaiming-uniform(a=sqrt(5)), B = 0 (so B A = 0).

        LoRA tensors left on the meta device (a model built on meta, base weights loaded with ``assign=True``)
        are first allocated on the base weight's device; on meta they stay on meta.
        """
        self.unmerge()  # the merged-in update is the old one
        self.materialize()
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        """The update ``(alpha / r) * B @ A`` (out, in) in float32."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def fold_weights(self, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> Folded:
        """``W + (alpha / r) B A``; the bias is the base's."""
        return (None if weight is None else weight + self.delta_weight()), bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)  # (..., out)
        if not self.peft_enabled:
            if self.merged:  # the update is inside W: switching the branch off would not remove it
                raise UserError("cannot switch off a merged LoRA layer: unmerge() it first")
            return out
        if self.merged:
            if self.training and torch.is_grad_enabled() and self.lora_A.requires_grad:
                # The merged branch is not computed, so A and B would silently get no gradient.
                raise RuntimeError("training a merged LoRA layer: unmerge() it before training")
            return out
        h = self.lora_dropout(x.to(self.lora_A.dtype))
        # Same order as PEFT (A first, scale last): (..., in) -> (..., r) -> (..., out)
        update = F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scaling
        return out + update.to(out.dtype)

    def _check_mergeable(self) -> None:
        refusal = self.fold_refusal() or self.weight_refusal()
        if refusal is not None:
            raise UserError(f"cannot merge LoRA into this layer: {refusal}")

    @property
    def mergeable(self) -> bool:
        return self.fold_refusal() is None and self.weight_refusal() is None

    @torch.no_grad()
    def merge(self) -> None:
        """Folds the update into the base weight (:meth:`fold_weights`); does nothing if already merged."""
        if self.merged:
            return
        self.fold_into_base("LoRA", verb="merge")
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Takes the update out of the base weight again (``W -= delta``); does nothing if not merged.

        The round trip restores ``W`` up to float rounding (about one ulp), not bit for bit.
        """
        if not self.merged:
            return
        weight = self.linear.weight
        weight.copy_(weight.float() - self.delta_weight())
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, merged={self.merged}"


@dataclass(frozen=True)
class LoRAMemoryTerms(MemoryTerms):
    """What :class:`LoRALinear` keeps for backward beside its base layer's set: the branch's input for ``A``'s
    gradient (after dropout, with the dropout's mask) and ``A x`` for ``B``'s."""

    targets: Tuple[str, ...] = ()
    """Attribute names of the linears with a low-rank branch (``q_proj``, ...)."""
    r: int = 0
    dropout: float = 0.0

    def linear(self, saved: Saved, site: LinearSite, dims: Dims) -> bool:
        out_rg = super().linear(saved, site, dims)
        if site.attr not in self.targets:
            return out_rg
        if self.dropout > 0:
            dropout(saved, site.name, site.x_rg, dims.N * site.fan_in, dims)
            saved.add(f"{site.name}.dropped", site.input_bytes(dims))
        else:
            saved.add(site.x, site.input_bytes(dims))
        saved.add(f"{site.name}.lora_a_out", dims.N * self.r * dims.d)
        return True


class LoRA(Method):
    name = "lora"
    summary = ("Fine-tune a frozen LLaMA with LoRA (Hu et al. 2021): low-rank updates B @ A, scaled by alpha / r, on "
               "the chosen projections. With --quantize bnb.nf4 this is QLoRA (Dettmers et al. 2023).")
    settings_cls = LoRAConfig
    settings_group = "lora"
    train_defaults = {"learning_rate": 3e-4}
    added_names = ("lora_A", "lora_B")
    trained_names = added_names

    def make_layer(self, linear: nn.Module, settings: LoRAConfig) -> LoRALinear:
        """The wrapper of one targeted ``linear``: a variant returns its :class:`LoRALinear` subclass."""
        return LoRALinear(linear, settings.r, settings.alpha, settings.dropout)

    def attach(self, model: GPT, settings: LoRAConfig) -> None:
        if not wrap_linears(model, settings.target_names(), lambda _, linear: self.make_layer(linear, settings)):
            raise UserError(f"no layer of the model matches the {self.name} targets {settings.target_names()}")

    def trained_names_for(self, settings: Optional[LoRAConfig]) -> Tuple[str, ...]:
        settings = settings or LoRAConfig()
        return (self.added_names + (EMBEDDING_NAMES if settings.train_embeddings else ())
                + (NORM_NAMES if settings.train_norms else ()))

    def memory_terms(self, settings: LoRAConfig) -> LoRAMemoryTerms:
        return LoRAMemoryTerms(targets=tuple(settings.target_names()), r=settings.r, dropout=settings.dropout,
                               embedding=settings.train_embeddings, norms=settings.train_norms)

    def prepare_for_inference(self, model: nn.Module) -> None:
        for layer in wrapped_layers(model, LoRALinear).values():
            if layer.mergeable:  # folded into the weights; a quantized or tied base stays unmerged (the same output)
                layer.merge()

    def peft_options(self, settings: LoRAConfig) -> Dict[str, Any]:
        """The switches of PEFT's ``LoraConfig`` this variant sets; plain LoRA scales by ``alpha / r`` and has no
        magnitude (a variant such as rsLoRA or DoRA returns its own)."""
        return {"use_rslora": False, "use_dora": False}

    def peft_target_tensors(self, target: PeftTarget, layers: Mapping[str, LoRALinear], layout: PeftLayout
                            ) -> Tuple[Dict[str, torch.Tensor], Set[str]]:
        """PEFT's tensors of one adapted HF module (by name under its key) and our names of those they hold.

        ``lora_A`` (r, in) and ``lora_B`` (out, r) are PEFT's as they are. Several of our layers fused in one HF
        module (GPT-2's q/k/v in ``c_attn``) are exactly one LoRA of rank ``k r`` on it: ``A`` theirs stacked
        (k r, in), ``B`` block-diagonal (n_slots out, k r), zero rows for a slot not adapted.
        """
        members = [layers[n] for n in target.members]
        As = [m.lora_A.detach() for m in members]
        Bs = [m.lora_B.detach() for m in members]
        if target.n_slots == 1:
            A, B = As[0], Bs[0]
        else:
            A = torch.cat(As, dim=0)  # (k r, in)
            out = members[0].out_features
            B = torch.zeros(target.n_slots * out, A.shape[0], dtype=Bs[0].dtype)
            for j, (slot, b) in enumerate(zip(target.slots, Bs)):
                B[slot * out:(slot + 1) * out, j * b.shape[1]:(j + 1) * b.shape[1]] = b
        carried = {f"{n}.{own}" for n in target.members for own in ("lora_A", "lora_B")}
        return {"lora_A.weight": A, "lora_B.weight": B}, carried

    def peft_adapter(self, model: nn.Module, settings: LoRAConfig, layout: PeftLayout) -> PeftAdapter:
        """PEFT's ``LoraConfig`` (``target_modules`` by HF module name; PEFT scales by ``lora_alpha / r`` as we
        do). A fused module's rank ``k r`` is written as ``rank_pattern``, with ``alpha_pattern`` ``k alpha`` so
        its scale stays ``alpha / r``."""
        layers = wrapped_layers(model, LoRALinear)
        r = one_value({n: m.r for n, m in layers.items()}, "ranks")
        alpha = one_value({n: float(m.alpha) for n, m in layers.items()}, "alphas")
        dropout = one_value({n: float(getattr(m.lora_dropout, "p", 0.0)) for n, m in layers.items()}, "dropouts")
        targets = layout.targets(layers)
        tensors, carried, fused = {}, set(), {}
        for target in targets:
            own, used = self.peft_target_tensors(target, layers, layout)
            tensors.update({f"{target.key}.{k}": v for k, v in own.items()})
            carried |= used
            if target.n_slots > 1:
                fused.setdefault(target.name.rpartition(".")[2], set()).add(len(target.members) * r)
        if any(len(ranks) > 1 for ranks in fused.values()):
            ranks = sorted(set().union(*fused.values()))
            raise Refused(f"its layers adapt different numbers of fused projections ({ranks} ranks on "
                          f"{', '.join(fused)}); this exporter writes one rank per module")
        rank_pattern = {name: rank for name, (rank,) in fused.items() if rank != r}
        config = {
            "peft_type": "LORA", "r": r, "lora_alpha": json_number(alpha), "lora_dropout": dropout,
            "target_modules": list(dict.fromkeys(t.name for t in targets)), "bias": "none",
            "fan_in_fan_out": layout.fan_in_fan_out, **self.peft_options(settings), "init_lora_weights": True,
            "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
            "rank_pattern": rank_pattern,
            "alpha_pattern": {k: json_number(alpha * v / r) for k, v in rank_pattern.items()},  # keeps alpha / r
        }
        return PeftAdapter(config, tensors, carried)


METHOD = LoRA()
