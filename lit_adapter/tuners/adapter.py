"""LLaMA-Adapter (v1): Zhang et al. 2023, "LLaMA-Adapter: Efficient Fine-tuning of Language Models with
Zero-init Attention", https://arxiv.org/abs/2303.16199. Semantics follow lit-llama's ``lit_llama/adapter.py``.

Every layer from ``start_layer`` on gets a learnable adaption prompt of ``prompt_length`` vectors
(``adapter_wte``, an ``nn.Embedding``). The prompt is projected by the layer's own frozen ``k_proj`` and
``v_proj`` (no norm, no RoPE: the prompt has no position) and the layer's RoPE'd queries attend to it in a
second, non-causal attention with its own softmax. That output is added to the usual causal attention through a
zero-initialised gate per head (``gating_factor``, shape (1, nh, 1, 1)), so at initialisation the model is
exactly the pretrained one and the prompt's influence grows only as the gate learns. Only prompts and gates train.

The prompt attention is added on top of whatever the base attention hook computes, so it composes with sparse
attention kernels (the prompt part stays dense), with quantized projections (they are only called) and with the
KV cache (the prompt's keys and values are cached for the duration of a decoding session).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import lit_adapter.model as base
from lit_adapter.config import Config
from lit_adapter.errors import UserError
from lit_adapter.memory.ops import Dims, Saved, query, sdpa
from lit_adapter.memory.terms import AttentionSite, MemoryTerms
from lit_adapter.tuners.base import EMBEDDING_NAMES, Method, has_name_part

ADAPTER_NAMES = ("adapter_wte", "gating_factor")


@dataclass
class AdapterConfig:
    """LLaMA-Adapter settings (shared by v1 and v2)."""

    prompt_length: int = 10
    """Number of learnable adaption-prompt vectors per adapted layer."""
    start_layer: int = 2
    """Index of the first layer that gets a prompt; layers below it are left as they are."""
    train_embeddings: bool = False
    """Also train the token embedding (LongLoRA's unfreezing for long context; with a tied head, the head too)."""

    def __post_init__(self) -> None:
        if self.prompt_length < 1:
            raise UserError(f"adapter prompt_length must be at least 1, got {self.prompt_length}")
        if self.start_layer < 0:
            raise UserError(f"adapter start_layer must be >= 0, got {self.start_layer}")

    def validate(self, config: Config) -> None:
        """Checks this adapter against the model it is meant for."""
        if self.start_layer >= config.n_layer:
            raise UserError(
                f"adapter start_layer={self.start_layer} leaves no layer with an adaption prompt in a model with "
                f"n_layer={config.n_layer}; choose start_layer < {config.n_layer}"
            )


class CausalSelfAttention(base.CausalSelfAttention):
    peft_enabled = True
    """False (``tuners.base.switched_off``): the prompt attention is skipped, leaving the base attention."""

    def __init__(self, config: Config, block_idx: int, adapter_config: AdapterConfig) -> None:
        super().__init__(config, block_idx)
        self.has_prompt = block_idx >= adapter_config.start_layer
        if self.has_prompt:
            # nn.Embedding's own N(0, 1) initialisation, as in lit-llama and the reference implementation
            self.adapter_wte = nn.Embedding(adapter_config.prompt_length, config.n_embd)
            # zero gate: the prompt adds nothing until training opens it
            self.gating_factor = nn.Parameter(torch.zeros(1, config.n_head, 1, 1))
        # (key of the KV cache session and parameter versions, prompt keys, prompt values) while decoding
        self._prompt_kv_cache: Optional[tuple] = None

    def scaled_dot_product_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, input_pos: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        y = super().scaled_dot_product_attention(q, k, v, input_pos)  # (B, nh, T, hs)
        if not self.has_prompt or not self.peft_enabled:
            return y
        B = q.shape[0]
        ak, av = self.prompt_keys_values(q.dtype, use_cache=input_pos is not None)  # (1, nh, aT, hs)
        ak, av = ak.expand(B, -1, -1, -1), av.expand(B, -1, -1, -1)  # (B, nh, aT, hs)
        # every token sees the whole prompt: no causal mask
        ay = F.scaled_dot_product_attention(q, ak, av)  # (B, nh, T, hs)
        return y + self.gating_factor.to(ay.dtype) * ay

    def prompt_keys_values(self, dtype: torch.dtype, use_cache: bool = False):
        """The prompt's keys and values ``(1, nh, aT, hs)`` from this layer's frozen projections, without RoPE."""
        if use_cache and not torch.is_grad_enabled():
            # While decoding with the KV cache the prompt projections would otherwise be recomputed for every
            # token (costlier than the token's own q/k/v). The cache is tied to the KV cache session and to the
            # versions of the tensors involved, so an in-place update of the prompt invalidates it.
            key = (id(self.kv_cache), dtype, self._prompt_versions())
            if self._prompt_kv_cache is None or self._prompt_kv_cache[0] != key:
                self._prompt_kv_cache = (key, *self._project_prompt(dtype))
            return self._prompt_kv_cache[1:]
        self._prompt_kv_cache = None
        return self._project_prompt(dtype)

    def _prompt_versions(self) -> tuple:
        tensors = [self.adapter_wte.weight, *self.k_proj.parameters(), *self.v_proj.parameters()]
        return tuple((id(t), t.device, t.data_ptr(), t._version) for t in tensors)

    def _project_prompt(self, dtype: torch.dtype):
        ng, hs = self.config.n_query_groups, self.config.head_size
        prompt = self.adapter_wte.weight.to(dtype).unsqueeze(0)  # (1, aT, n_embd)
        aT = prompt.shape[1]
        ak = self.k_proj(prompt).view(1, aT, ng, hs).transpose(1, 2)  # (1, ng, aT, hs)
        av = self.v_proj(prompt).view(1, aT, ng, hs).transpose(1, 2)  # (1, ng, aT, hs)
        return self.expand_kv_groups(ak), self.expand_kv_groups(av)  # (1, nh, aT, hs)

    @torch.no_grad()
    def reset_peft_parameters(self, device=None, dtype=None) -> None:
        """(Re)initialises prompt and gate, first materializing them on ``device`` if they are on the meta device."""
        self._prompt_kv_cache = None
        if not self.has_prompt:
            return
        self.adapter_wte.weight = materialize(self.adapter_wte.weight, device, dtype)
        self.gating_factor = materialize(self.gating_factor, device, dtype)
        nn.init.normal_(self.adapter_wte.weight)
        nn.init.zeros_(self.gating_factor)


def materialize(param: nn.Parameter, device=None, dtype=None) -> nn.Parameter:
    """``param`` itself, or a new uninitialised parameter where it must leave the meta device or change type."""
    device = param.device if device is None else torch.device(device)
    dtype = param.dtype if dtype is None else dtype
    if param.is_meta or param.device != device or param.dtype != dtype:
        return nn.Parameter(torch.empty(param.shape, device=device, dtype=dtype), requires_grad=param.requires_grad)
    return param


class GPT(base.GPT):
    def __init__(self, config: Config, adapter_config: Optional[AdapterConfig] = None) -> None:
        adapter_config = adapter_config if adapter_config is not None else AdapterConfig()
        adapter_config.validate(config)
        # set before nn.Module.__init__ runs build_block (a plain attribute, so this is allowed)
        self.adapter_config = adapter_config
        super().__init__(config)

    def build_block(self, block_idx: int) -> base.Block:
        attn = CausalSelfAttention(self.config, block_idx, self.adapter_config)
        return base.Block(self.config, block_idx, attn=attn)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        super().init_weights(std)
        # the base initialiser treats the prompt as a token embedding; restore the adapter's own initialisation
        self.init_adapter_parameters()

    def init_adapter_parameters(self, device=None, dtype=None) -> None:
        """Initialises every adapter parameter; materializes them if the model was built on the meta device.

        ``device`` and ``dtype`` default to those of the token embedding (load the base weights first).
        """
        reference = self.transformer.wte.weight
        device = reference.device if device is None else device
        if dtype is None:
            dtype = reference.dtype if reference.is_floating_point() else torch.float32
        for module in self.modules():
            if module is not self and hasattr(module, "reset_peft_parameters"):
                module.reset_peft_parameters(device=device, dtype=dtype)


def adapter_filter(name: str, param: Any = None) -> bool:
    """Whether the parameter or state-dict entry ``name`` belongs to LLaMA-Adapter (usable as Fabric's filter)."""
    return has_name_part(name, ADAPTER_NAMES)


def mark_only_adapter_as_trainable(model: nn.Module) -> None:
    """Freezes everything but the adaption prompts and gates."""
    mark_only_as_trainable(model, adapter_filter)


def mark_only_as_trainable(model: nn.Module, key_filter: Callable[[str], bool]) -> None:
    for name, param in model.named_parameters():
        trainable = key_filter(name)
        if param.requires_grad != trainable:
            param.requires_grad = trainable


def adapter_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Only the adapter's tensors: what a fine-tuning run needs to save."""
    return {name: t for name, t in model.state_dict().items() if adapter_filter(name)}


def load_adapter_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    method_name: str = "adapter",
    key_filter: Callable[[str], bool] = adapter_filter,
) -> None:
    """Loads a PEFT-only state dict (adapter, adapter v2, LoRA, ...) after checking that it fits ``model``.

    The model's entries selected by ``key_filter`` must be exactly the checkpoint's keys, with the same shapes;
    otherwise a :class:`UserError` names the offending keys. Parameters still on the meta device are replaced by
    the checkpoint's tensors.
    """
    expected = {name: t for name, t in model.state_dict().items() if key_filter(name)}
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    for label, keys in (("shape mismatch", mismatched), ("missing", missing), ("unexpected", unexpected)):
        if keys:
            shown = ", ".join(keys[:4]) + (f" (and {len(keys) - 4} more)" if len(keys) > 4 else "")
            problems.append(f"{label} ({len(keys)}): {shown}")
    if problems:
        raise UserError(
            f"the {method_name} weights do not fit this model: " + "; ".join(problems)
            + f". Were they trained with another base model or other {method_name} settings?"
        )
    assign = any(t.is_meta for t in expected.values())
    model.load_state_dict(dict(state_dict), strict=False, assign=assign)


@dataclass(frozen=True)
class AdapterMemoryTerms(MemoryTerms):
    """From ``start_layer`` on, a second, non-causal SDPA of the queries over the (1, nh, length, hs) prompt keys and
    values, whose gated output is added to the attention's: below it nothing requires a gradient (nothing is kept),
    from it on the attention output does."""

    start_layer: int = 0
    length: int = 0

    def prompt_projections(self, saved: Saved, dims: Dims) -> None:
        """What the prompt's ``k_proj`` and ``v_proj`` keep: nothing here (their weights are frozen, and their input
        is the prompt parameter itself)."""

    def attention_output(self, saved: Saved, site: AttentionSite, dims: Dims) -> bool:
        if site.layer < self.start_layer:
            return False
        self.prompt_projections(saved, dims)
        kv = self.length * (dims.C if site.expanded else dims.kv) * dims.d
        sdpa(saved, "prompt", query(dims), ("prompt.k", kv), ("prompt.v", kv), self.length, dims, site.backend,
             site.q_rg, True)
        saved.add("prompt.out", dims.N * dims.C * dims.d)  # the gate's product keeps the prompt attention's output
        return True

    def backward_working_bytes(self, dims: Dims) -> int:
        return dims.N * dims.C * dims.d  # the gated prompt output's gradient


class Adapter(Method):
    name = "adapter"
    summary = ("Fine-tune a frozen LLaMA with LLaMA-Adapter v1 (Zhang et al. 2023): learnable prompts attended through a "
               "zero-initialised gate in every layer from adapter.start_layer on. Only prompts and gates train.")
    settings_cls = AdapterConfig
    settings_group = "adapter"
    train_defaults = {"learning_rate": 9e-3}
    trained_names = ADAPTER_NAMES
    added_names = ADAPTER_NAMES

    def validate(self, settings: AdapterConfig, config: Config) -> None:
        settings.validate(config)

    def build(self, config: Config, settings: AdapterConfig) -> base.GPT:
        return GPT(config, settings)  # the prompts enter through GPT.build_block and the attention hook

    def trained_names_for(self, settings: Optional[AdapterConfig]) -> Tuple[str, ...]:
        return self.trained_names + (EMBEDDING_NAMES if settings is not None and settings.train_embeddings else ())

    def memory_terms(self, settings: AdapterConfig) -> MemoryTerms:
        return AdapterMemoryTerms(start_layer=settings.start_layer, length=settings.prompt_length,
                                  embedding=settings.train_embeddings)


METHOD = Adapter()
