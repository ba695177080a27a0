"""LLaMA-Adapter (v1): Zhang et al. 2023, "LLaMA-Adapter: Efficient Fine-tuning of Language Models with
Zero-init Attention", https://arxiv.org/abs/2303.16199. Semantics follow lit-llama's ``lit_llama/adapter.py``.

Every layer from ``start_layer`` on gets a learnable adaption prompt of ``prompt_length`` vectors
(``adapter_wte``, an ``nn.Embedding``). The prompt is projected by the layer's own frozen ``k_proj`` and
``v_proj`` (no norm, no RoPE: the prompt has no position) and the layer's RoPE'd queries attend to it in a
second, non-causal attention with its own softmax. That output is added to the usual causal attention through a
zero-initialised gate per head (``gating_factor``, shape (1, nh, 1, 1)), so at initialisation the model is
exactly the pretrained one and the prompt's influence grows only as the gate learns. Only prompts and gates train.

Each layer's prompt and gate live in an :class:`AdaptionPrompt`, set into the layer's attention hook slot
(``attn.adapter``, :mod:`lit_adapter.model.gpt`) of a plain ``GPT``: the tensors are
``transformer.h.<i>.attn.adapter.adapter_wte.weight`` and ``...attn.adapter.gating_factor`` (lit-llama has them one
level up, without ``adapter.``). The prompt attention is added on top of whatever the base attention computes, so
it composes with sparse attention kernels (the prompt part stays dense), with quantized projections (they are only
called) and with the KV cache (the prompt's keys and values are cached for the duration of a decoding session).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn as nn

import lit_adapter.model.gpt as base
from lit_adapter.model.config import Config
from lit_adapter.errors import UserError
from lit_adapter.memory.ops import Dims, Saved, query, sdpa
from lit_adapter.memory.terms import AttentionSite, MemoryTerms
from lit_adapter.tuners.base import EMBEDDING_NAMES, Method, PeftAdapter, PeftLayout, Refused, TunerLayer, one_value

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


class AdaptionPrompt(TunerLayer):
    """One layer's gated prompt attention, set into that layer's attention hook slot (``attn.adapter``).

    It is called with the attention layer it serves and the RoPE'd queries and cached keys and values of the
    tokens: the base attention (dense or sparse) runs as always, and the prompt attention is added through the gate.
    The prompt's keys and values come from the layer's own ``k_proj`` and ``v_proj`` (wrapped ones too: Adapter v2).
    """

    def __init__(self, config: Config, prompt_length: int) -> None:
        super().__init__()
        # nn.Embedding's own N(0, 1) initialisation, as in lit-llama and the reference implementation
        self.adapter_wte = nn.Embedding(prompt_length, config.n_embd)
        # zero gate: the prompt adds nothing until training opens it
        self.gating_factor = nn.Parameter(torch.zeros(1, config.n_head, 1, 1))
        # (key of the KV cache session and parameter versions, prompt keys, prompt values) while decoding
        self._prompt_kv_cache: Optional[tuple] = None

    fold_label = "adaption prompts"
    """An export into plain LLaMA weights asks :meth:`fold_refusal` (``tuners.base.FoldAnswer``)."""

    def fold_refusal(self) -> Optional[str]:
        """None where the prompt adds nothing (every gate zero), so plain LLaMA computes the same."""
        if not (self.gating_factor != 0).any():
            return None
        return ("have non-zero gates; a prompt is a second attention over learned tokens, which LlamaForCausalLM "
                "has no place for (only a run whose gates are all zero merges, its prompts adding nothing)")

    def forward(
        self, attn: base.CausalSelfAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        input_pos: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        y = attn.scaled_dot_product_attention(q, k, v, input_pos)  # (B, nh, T, hs)
        if not self.peft_enabled:
            return y
        B = q.shape[0]
        ak, av = self.prompt_keys_values(attn, q.dtype, use_cache=input_pos is not None)  # (1, ng, aT, hs)
        ak, av = ak.expand(B, -1, -1, -1), av.expand(B, -1, -1, -1)  # (B, ng, aT, hs), views
        # every token sees the whole prompt: no causal mask
        ay = base.attend(q, ak, av)  # (B, nh, T, hs)
        return y + self.gating_factor.to(ay.dtype) * ay

    def prompt_keys_values(self, attn: base.CausalSelfAttention, dtype: torch.dtype, use_cache: bool = False):
        """The prompt's keys and values ``(1, ng, aT, hs)`` (grouped, like the layer's) from ``attn``'s frozen projections, without RoPE."""
        if use_cache and not torch.is_grad_enabled():
            # While decoding with the KV cache the prompt projections would otherwise be recomputed for every
            # token (costlier than the token's own q/k/v). The cache is tied to the KV cache session and to the
            # versions of the tensors involved, so an in-place update of the prompt invalidates it.
            key = (id(attn.kv_cache), dtype, self._prompt_versions(attn))
            if self._prompt_kv_cache is None or self._prompt_kv_cache[0] != key:
                self._prompt_kv_cache = (key, *self._project_prompt(attn, dtype))
            return self._prompt_kv_cache[1:]
        self._prompt_kv_cache = None
        return self._project_prompt(attn, dtype)

    def _prompt_versions(self, attn: base.CausalSelfAttention) -> tuple:
        tensors = [self.adapter_wte.weight, *attn.k_proj.parameters(), *attn.v_proj.parameters()]
        return tuple((id(t), t.device, t.data_ptr(), t._version) for t in tensors)

    def _project_prompt(self, attn: base.CausalSelfAttention, dtype: torch.dtype):
        ng, hs = attn.config.n_query_groups, attn.config.head_size
        prompt = self.adapter_wte.weight.to(dtype).unsqueeze(0)  # (1, aT, n_embd)
        aT = prompt.shape[1]
        ak = attn.k_proj(prompt).view(1, aT, ng, hs).transpose(1, 2)  # (1, ng, aT, hs)
        av = attn.v_proj(prompt).view(1, aT, ng, hs).transpose(1, 2)  # (1, ng, aT, hs)
        return ak, av

    @torch.no_grad()
    def reset_peft_parameters(self) -> None:
        """The prompt N(0, 1) and the gate zero (allocated first where :meth:`materialize` can)."""
        self._prompt_kv_cache = None
        self.materialize()
        nn.init.normal_(self.adapter_wte.weight)
        nn.init.zeros_(self.gating_factor)

    def extra_repr(self) -> str:
        return f"prompt_length={self.adapter_wte.num_embeddings}"


def add_adaption_prompts(model: base.GPT, settings: AdapterConfig) -> None:
    """Sets an :class:`AdaptionPrompt` into the attention hook slot of every layer from ``start_layer`` on (on the
    current default device: meta while the model is built)."""
    settings.validate(model.config)
    for block in model.transformer.h[settings.start_layer:]:
        if block.attn.adapter is not None:
            raise RuntimeError("the model's attention hook is already taken by a PEFT method")
        block.attn.adapter = AdaptionPrompt(model.config, settings.prompt_length)


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
        kv = self.length * dims.kv * dims.d  # grouped, and one copy for the batch (an expand view)
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
    decoder_only = ("it is decoder-only: LLaMA-Adapter's gated prompts are attended by a decoder's tokens as they "
                    "generate (Zhang et al. 2023; v2 also trains LLaMA's RMSNorms); on an encoder use lora, "
                    "p_tuning, prompt_tuning, prefix_tuning, ia3, bitfit, houlsby, pfeiffer or full")

    def validate(self, settings: AdapterConfig, config: Config) -> None:
        settings.validate(config)

    def current_name(self, name: str) -> str:
        """Runs before the prompts moved into the attention's hook slot saved ``...attn.adapter_wte.weight`` and
        ``...attn.gating_factor``; they are ``...attn.adapter.*`` now."""
        for old in (".attn.adapter_wte.", ".attn.gating_factor"):
            if old in name:
                return name.replace(".attn.", ".attn.adapter.", 1)
        return name

    def attach(self, model: base.GPT, settings: AdapterConfig) -> None:
        add_adaption_prompts(model, settings)

    def trained_names_for(self, settings: Optional[AdapterConfig]) -> Tuple[str, ...]:
        return self.trained_names + (EMBEDDING_NAMES if settings is not None and settings.train_embeddings else ())

    def memory_terms(self, settings: AdapterConfig) -> MemoryTerms:
        return AdapterMemoryTerms(start_layer=settings.start_layer, length=settings.prompt_length,
                                  embedding=settings.train_embeddings)

    def peft_adapter(self, model: nn.Module, settings: AdapterConfig, layout: PeftLayout) -> PeftAdapter:
        """PEFT's ``AdaptionPromptConfig``. Its ``AdaptedAttention`` (peft/tuners/adaption_prompt/layer.py, read in
        peft 0.21) computes what ours does on the layers it adapts: the prompt's keys and values through the
        layer's own ``k_proj``/``v_proj`` with no RoPE and no norm, queries with RoPE, a softmax over the prompt
        alone scaled by 1/sqrt(head_dim) with no mask, grouped keys repeated per query head, the gated result
        through ``o_proj`` added to the attention output. It adapts the *top* ``adapter_layers`` layers, ours
        from ``start_layer`` on. The one difference is the gate: ours has one per head, PEFT's one per layer, so
        a run exports only if every layer's heads share one gate value exactly."""
        if layout.family != "llama":
            raise Refused("this exporter writes LLaMA-Adapter prompts for LlamaForCausalLM only; PEFT's GPT-2 "
                          "adaption prompt adds its own c_proj bias and query path, not checked to equal ours")
        # by the attention layer whose hook slot holds them (transformer.h.N.attn)
        prompts = {n.rpartition(".")[0]: m for n, m in model.named_modules() if isinstance(m, AdaptionPrompt)}
        n_layer = model.config.n_layer
        layers = sorted(int(name.split(".")[2]) for name in prompts)  # transformer.h.N.attn
        if layers != list(range(n_layer - len(layers), n_layer)):
            raise Refused(f"its prompts are in layers {layers}, PEFT's adaption prompts in the top layers only")
        prompt_length = one_value({n: m.adapter_wte.num_embeddings for n, m in prompts.items()}, "prompt lengths")
        tensors, carried = {}, set()
        for name, module in prompts.items():
            gates = module.gating_factor.detach().flatten()  # (n_head,)
            if not torch.all(gates == gates[0]):
                raise Refused(f"layer {name.split('.')[2]} has one gate per head ({gates.numel()} values from "
                              f"{gates.min().item():.4g} to {gates.max().item():.4g}) and PEFT's "
                              "AdaptionPromptConfig one gate per layer; only equal gates in every layer export")
            prefix = layout.key(f"{name}.q_proj").rpartition(".")[0]  # ...layers.N.self_attn
            tensors[f"{prefix}.adaption_prompt"] = module.adapter_wte.weight.detach()[None]  # (1, aT, n_embd)
            tensors[f"{prefix}.adaption_gate"] = gates[:1].clone()  # (1,)
            carried |= {f"{name}.adapter.gating_factor", f"{name}.adapter.adapter_wte.weight"}
        config = {"peft_type": "ADAPTION_PROMPT", "target_modules": "self_attn", "adapter_len": prompt_length,
                  "adapter_layers": len(layers)}
        return PeftAdapter(config, tensors, carried)


METHOD = Adapter()
