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
from lit_adapter.checkpoint import check_keys
from lit_adapter.config import Config
from lit_adapter.errors import UserError
from lit_adapter.tuners.base import EMBEDDING_NAMES, Method, PeftAdapter, PeftLayout, Refused, TrainedParts, \
    has_name_part, one_value

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

    fold_label = "adaption prompts"
    """An export into plain LLaMA weights asks :meth:`fold_refusal` (``tuners.base.FoldAnswer``)."""

    def fold_refusal(self) -> Optional[str]:
        """None where the prompt adds nothing (none here, or every gate zero), so plain LLaMA computes the same."""
        if not self.has_prompt or not (self.gating_factor != 0).any():
            return None
        return ("have non-zero gates; a prompt is a second attention over learned tokens, which LlamaForCausalLM "
                "has no place for (only a run whose gates are all zero merges, its prompts adding nothing)")

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
    check_keys(expected, state_dict, f"the {method_name} weights do not fit this model",
               f"Were they trained with another base model or other {method_name} settings?")
    assign = any(t.is_meta for t in expected.values())
    model.load_state_dict(dict(state_dict), strict=False, assign=assign)


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

    def memory_terms(self, settings: AdapterConfig) -> TrainedParts:
        return TrainedParts(prompt_from_layer=settings.start_layer, prompt_length=settings.prompt_length,
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
        prompts = {n: m for n, m in model.named_modules() if isinstance(m, CausalSelfAttention) and m.has_prompt}
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
            carried |= {f"{name}.gating_factor", f"{name}.adapter_wte.weight"}
        config = {"peft_type": "ADAPTION_PROMPT", "target_modules": "self_attn", "adapter_len": prompt_length,
                  "adapter_layers": len(layers)}
        return PeftAdapter(config, tensors, carried)


METHOD = Adapter()
