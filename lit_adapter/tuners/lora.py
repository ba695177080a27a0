"""LoRA: Low-Rank Adaptation of Large Language Models (Hu et al. 2021, https://arxiv.org/abs/2106.09685).

A frozen weight ``W`` (out, in) is adapted by a trainable low-rank update: ``h = W x + (alpha / r) * B A x`` with
``A`` (r, in) and ``B`` (out, r), ``r << min(in, out)``. ``A`` starts Kaiming-uniform and ``B`` at zero, so the
adapted model starts exactly as the base model. Only ``A`` and ``B`` train and are saved (kilobytes to megabytes).

:class:`LoRALinear` wraps the base layer by composition and only *calls* it, so the base may be a plain
``nn.Linear`` or a frozen bitsandbytes ``Linear8bitLt`` / ``Linear4bit`` (QLoRA, Dettmers et al. 2023). Training
runs unmerged; for inference the update can be folded into ``W`` once (:func:`merge_lora`), which removes the extra
matmuls, and folded out again (:func:`unmerge_lora`). Merging needs a plain floating-point ``W`` that no other
layer shares: a quantized or tied base stays unmerged (its output is the same, only a little slower).

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
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_adapter.errors import UserError
from lit_adapter.memory.ops import Dims, LinearSite, Saved, dropout
from lit_adapter.memory.terms import MemoryTerms
from lit_adapter.model import GPT
from lit_adapter.tuners.base import EMBEDDING_NAMES, NORM_NAMES, Method, has_name_part
from lit_adapter.tuners.wrapping import LinearWrapper


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
        base = self.linear.weight
        if self.lora_A.is_meta and not base.is_meta:
            dtype = base.dtype if base.is_floating_point() else self.lora_A.dtype
            for name in ("lora_A", "lora_B"):
                old = getattr(self, name)
                setattr(self, name, nn.Parameter(
                    torch.empty(old.shape, device=base.device, dtype=dtype), requires_grad=old.requires_grad
                ))
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    def adapter_params(self) -> List[nn.Parameter]:
        return [self.lora_A, self.lora_B]

    def delta_weight(self) -> torch.Tensor:
        """The update ``(alpha / r) * B @ A`` (out, in), computed in float32 and returned in the base dtype."""
        delta = (self.lora_B.float() @ self.lora_A.float()) * self.scaling
        weight = self.linear.weight
        return delta.to(weight.dtype) if weight.is_floating_point() else delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)  # (..., out)
        if not self.peft_enabled:
            if self.merged:  # the update is inside W: switching the branch off would not remove it
                raise UserError("cannot switch off a merged LoRA layer: call unmerge_lora(model) first")
            return out
        if self.merged:
            if self.training and torch.is_grad_enabled() and self.lora_A.requires_grad:
                # The merged branch is not computed, so A and B would silently get no gradient.
                raise RuntimeError("training a merged LoRA layer: call unmerge_lora(model) before training")
            return out
        h = self.lora_dropout(x.to(self.lora_A.dtype))
        # Same order as PEFT (A first, scale last): (..., in) -> (..., r) -> (..., out)
        update = F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scaling
        return out + update.to(out.dtype)

    def _check_mergeable(self) -> None:
        refusal = self.weight_refusal()
        if refusal is not None:
            raise UserError(f"cannot merge LoRA into this layer: {refusal}")

    @property
    def mergeable(self) -> bool:
        try:
            self._check_mergeable()
        except UserError:
            return False
        return True

    @torch.no_grad()
    def merge(self) -> None:
        """Folds the update into the base weight (``W += delta``); does nothing if already merged."""
        if self.merged:
            return
        self._check_mergeable()
        self.linear.weight.add_(self.delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Takes the update out of the base weight again (``W -= delta``); does nothing if not merged.

        The round trip restores ``W`` up to float rounding (about one ulp), not bit for bit.
        """
        if not self.merged:
            return
        self.linear.weight.sub_(self.delta_weight())
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, merged={self.merged}"


def lora_layers(model: nn.Module) -> Dict[str, LoRALinear]:
    """The LoRA layers of ``model`` by qualified name (``"transformer.h.0.attn.q_proj"``)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def add_lora(model: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """Wraps the targeted linear layers of a ``lit_adapter.model.GPT`` in :class:`LoRALinear`, in place.

    Works on a model on the meta device (the LoRA tensors are then meta too; see
    :func:`reset_lora_parameters`) and on one whose base linears were already quantized. The tie between a tied
    output head and the embedding is kept: the wrapper holds the same ``nn.Linear``. ``requires_grad`` is left
    alone; call :func:`mark_only_lora_as_trainable` to freeze the base.
    """
    if lora_layers(model):
        raise RuntimeError("the model already has LoRA layers")
    targets = set(cfg.target_names())
    wrap = [
        (name, module)
        for name, module in model.named_modules()
        if name.rpartition(".")[2] in targets and hasattr(module, "in_features") and hasattr(module, "weight")
    ]
    if not wrap:
        raise UserError(f"no layer of the model matches the LoRA targets {sorted(targets)}")
    # Weights that appear under more than one name are shared (tied); merging into them is refused later.
    counts: Dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    for name, linear in wrap:
        wrapper = LoRALinear(linear, cfg.r, cfg.alpha, cfg.dropout)
        wrapper.weight_is_shared = counts.get(id(linear.weight), 0) > 1
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, wrapper)
    return model


def reset_lora_parameters(model: nn.Module) -> nn.Module:
    """Allocates (if on meta) and initialises every LoRA layer's A and B; the base weights are untouched.

    The clean way to build a LoRA model without allocating twice: build ``GPT`` + :func:`add_lora` under
    ``torch.device("meta")``, ``load_state_dict(base, strict=False, assign=True)``, then call this.
    """
    for layer in lora_layers(model).values():
        layer.reset_peft_parameters()
    return model


def lora_filter(name: str, param: Optional[torch.Tensor] = None) -> bool:
    """Whether the tensor ``name`` is LoRA's (trained and saved); ``param`` is accepted for the filter protocol."""
    return has_name_part(name, ("lora_A", "lora_B"))


def mark_only_lora_as_trainable(model: nn.Module) -> nn.Module:
    for name, param in model.named_parameters():
        param.requires_grad = lora_filter(name, param)
    return model


def lora_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Only the LoRA tensors (``...q_proj.lora_A`` / ``...q_proj.lora_B``)."""
    return {k: v for k, v in model.state_dict().items() if lora_filter(k, v)}


def merge_lora(model: nn.Module, strict: bool = True) -> List[str]:
    """Merges every LoRA layer for inference; merging twice changes nothing.

    A layer that cannot be merged (quantized or tied base) raises :class:`UserError` when ``strict``; otherwise it
    is left unmerged, which computes the same output, and its name is returned.
    """
    unmerged = []
    for name, layer in lora_layers(model).items():
        if not strict and not layer.mergeable:
            unmerged.append(name)
            continue
        layer.merge()
    return unmerged


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Takes every merged LoRA update out of its base weight (back to the training state)."""
    for layer in lora_layers(model).values():
        layer.unmerge()
    return model


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """A plain base-model checkpoint with the LoRA updates merged in, under base names (``...q_proj.weight``).

    The model is not modified; the result loads into a ``GPT`` without LoRA. Quantized or tied LoRA bases raise
    :class:`UserError` (the result would not be the model's own weights, or could not keep the tie).
    """
    layers = lora_layers(model)
    for layer in layers.values():
        layer._check_mergeable()
    merged = {}
    for key, value in model.state_dict().items():
        owner = next((name for name in layers if key.startswith(name + ".")), None)
        if owner is None:
            merged[key] = value
            continue
        layer, rest = layers[owner], key[len(owner) + 1:]
        if not rest.startswith("linear."):
            continue  # lora_A / lora_B
        rest = rest[len("linear."):]
        if rest == "weight" and not layer.merged:
            value = value + layer.delta_weight()
        merged[f"{owner}.{rest}"] = value
    return merged


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
    trained_names = added_names  # lora_filter

    def attach(self, model: GPT, settings: LoRAConfig) -> None:
        add_lora(model, settings)

    def trained_names_for(self, settings: Optional[LoRAConfig]) -> Tuple[str, ...]:
        settings = settings or LoRAConfig()
        return (self.added_names + (EMBEDDING_NAMES if settings.train_embeddings else ())
                + (NORM_NAMES if settings.train_norms else ()))

    def memory_terms(self, settings: LoRAConfig) -> LoRAMemoryTerms:
        return LoRAMemoryTerms(targets=tuple(settings.target_names()), r=settings.r, dropout=settings.dropout,
                               embedding=settings.train_embeddings, norms=settings.train_norms)

    def prepare_for_inference(self, model: nn.Module) -> None:
        merge_lora(model, strict=False)  # folded into the weights; a quantized or tied base stays unmerged


METHOD = LoRA()
