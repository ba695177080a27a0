"""Prefix tuning: Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation",
https://arxiv.org/abs/2101.00190.

Every layer's attention gets ``num_virtual_tokens`` trained keys and values in front of its own: each query
attends to ``[P_K; K]`` and ``[P_V; V]`` in one softmax, so between two real tokens the attention weights keep their
ratio (only the share left for the content changes). The model stays frozen. As in HF PEFT's
``PrefixTuningConfig``, which the tests match number for number, the prefixes are what HF calls
``past_key_values``: they get no RoPE, and the real tokens sit at positions ``P, P + 1, ...``. With grouped-query
attention a prefix has one key and value per key/value head (``kv = n_query_groups * head_size`` wide).

The paper found optimizing the prefixes directly unstable and reparameterised them through an MLP. With
``prefix_projection`` (the default) a learned (P, kv) input goes through ``Linear(kv, H) -> Tanh ->
Linear(H, n_layer * 2 * kv)``, giving every layer's keys and values at once (PEFT's ``prefix_projection=True``);
without it the (P, n_layer * 2 * kv) prefixes are the parameters. Both start at PyTorch's default initialisation
(inputs N(0, 1)); there is no identity at initialisation, as in the reference. The MLP only helps training:
``final/`` stores the prefixes it computes (with ``prefix_projection: false``), so inference runs no MLP; the
resumable training checkpoint keeps the MLP.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn

import lit_adapter.model.gpt as base
from lit_adapter.model.gpt import GPT
from lit_adapter.model.config import Config
from lit_adapter.memory.terms import MemoryTerms
from lit_adapter.tuners.virtual_tokens import (
    VirtualTokenMethod,
    VirtualTokens,
    add_virtual_tokens,
    attend_with_prefix,
    check_hidden_size,
    check_num_virtual_tokens,
    folded,
)


@dataclass
class PrefixTuningConfig:
    num_virtual_tokens: int = 20
    """Number of trained keys and values in front of every layer's attention."""
    prefix_projection: bool = True
    """Reparameterise the prefixes through an MLP while training (the paper's method); final/ stores the result."""
    encoder_hidden_size: Optional[int] = 512
    """prefix_projection: hidden size H of the MLP; None means the key/value width (PEFT's default)."""

    def __post_init__(self) -> None:
        check_num_virtual_tokens("prefix_tuning", self.num_virtual_tokens)
        check_hidden_size("prefix_tuning", self.encoder_hidden_size)


class SharedPrefixes:
    """The prefixes of the current forward, ``kv`` (n_layer, 2, ng, P, hs): written by :class:`PrefixEncoder`
    once per model forward and read by every :class:`PrefixAttention` (also when a checkpointed block is
    recomputed in the backward). A copy of the model starts with none."""

    def __init__(self) -> None:
        self.kv: Optional[torch.Tensor] = None

    def __deepcopy__(self, memo) -> "SharedPrefixes":
        return SharedPrefixes()

    def __getstate__(self) -> dict:
        return {"kv": None}


class PrefixEncoder(VirtualTokens):
    """``embedding`` (P, kv), through ``transform`` with ``prefix_projection``, to every layer's prefixes."""

    def __init__(self, settings: PrefixTuningConfig, config: Config, shared: SharedPrefixes) -> None:
        super().__init__(settings.num_virtual_tokens)
        self.shape = (config.n_layer, 2, config.n_query_groups, config.head_size)
        kv = config.n_query_groups * config.head_size
        width = config.n_layer * 2 * kv
        self.transform: Optional[nn.Sequential] = None
        if settings.prefix_projection:
            hidden = settings.encoder_hidden_size or kv
            self.embedding = nn.Parameter(torch.empty(settings.num_virtual_tokens, kv))
            self.transform = nn.Sequential(nn.Linear(kv, hidden), nn.Tanh(), nn.Linear(hidden, width))
        else:
            self.embedding = nn.Parameter(torch.empty(settings.num_virtual_tokens, width))
        self.shared = shared
        self.reset_peft_parameters()

    def flat_prefixes(self) -> torch.Tensor:
        """(P, n_layer * 2 * kv): per virtual token, layer by layer, the key then the value of every kv head."""
        return self.embedding if self.transform is None else self.transform(self.embedding)

    def prefixes(self) -> torch.Tensor:
        """(n_layer, 2, ng, P, hs): each layer's prefix keys ([:, 0]) and values ([:, 1])."""
        flat = self.flat_prefixes()
        return flat.view(flat.shape[0], *self.shape).permute(1, 2, 3, 0, 4)

    def forward(self, x: torch.Tensor, input_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.entering(input_pos):  # each training forward; once per decoding session, then reused
            self.shared.kv = self.prefixes()
        return x  # no rows enter: the prefixes are keys and values only

    @torch.no_grad()
    def reset_peft_parameters(self) -> None:
        nn.init.normal_(self.embedding)  # an nn.Embedding's default, as PEFT's
        for module in self.modules():
            if isinstance(module, nn.Linear):
                module.reset_parameters()


class PrefixAttention(nn.Module):
    """The attention hook of prefix tuning: a layer's prefix and the causal (or sparse) keys of the real tokens,
    in one softmax. It holds no tensors: the prefixes are the encoder's (``GPT.virtual_tokens``)."""

    def __init__(self, shared: SharedPrefixes) -> None:
        super().__init__()
        self.shared_prefixes = shared

    def forward(
        self, attn: base.CausalSelfAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        input_pos: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        B = q.shape[0]
        kv = self.shared_prefixes.kv[attn.block_idx].to(q.dtype)  # (2, ng, P, hs)
        pk, pv = (t.unsqueeze(0).expand(B, -1, -1, -1) for t in kv)  # (B, ng, P, hs), grouped like k and v
        if input_pos is not None:  # the KV cache's first P slots are the prefix's positions, never written
            P = pk.shape[-2]
            k, v, input_pos = k[:, :, P:], v[:, :, P:], input_pos - P
        return attend_with_prefix(attn, q, k, v, input_pos, (pk, pv))


@dataclass(frozen=True)
class PrefixMemoryTerms(MemoryTerms):
    """Trained keys and values in front of every layer's attention: each SDPA attends over ``length + T`` keys
    under a boolean mask, and its output requires a gradient in every layer."""

    length: int = 0

    def extra_keys(self) -> int:
        return self.length


class PrefixTuning(VirtualTokenMethod):
    name = "prefix_tuning"
    summary = ("Fine-tune a frozen LLaMA with prefix tuning (Li & Liang 2021): prefix_tuning.num_virtual_tokens "
               "trained keys and values in front of every layer's attention, reparameterised through an MLP while "
               "training and stored as computed prefixes in final/. Only the prefixes (and the MLP) train.")
    settings_cls = PrefixTuningConfig
    settings_group = "prefix_tuning"
    train_defaults = {"learning_rate": 1e-2}

    def attach(self, model: GPT, settings: PrefixTuningConfig) -> None:
        shared = SharedPrefixes()
        add_virtual_tokens(model, PrefixEncoder(settings, model.config, shared), partial(PrefixAttention, shared))

    def memory_terms(self, settings: PrefixTuningConfig) -> MemoryTerms:
        return PrefixMemoryTerms(length=settings.num_virtual_tokens)

    def final_tensors(self, model: GPT, settings: PrefixTuningConfig) -> Tuple[Dict[str, torch.Tensor], Any]:
        if not settings.prefix_projection:
            return super().final_tensors(model, settings)
        with torch.no_grad():
            values = model.virtual_tokens.flat_prefixes()  # (P, n_layer * 2 * kv)
        return folded(values), replace(settings, prefix_projection=False)


METHOD = PrefixTuning()
