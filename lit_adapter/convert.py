"""Checkpoint conversion between lit-adapter and other LLaMA layouts."""

from __future__ import annotations

import re
from typing import Dict

import torch

# lit-adapter name pattern -> HF transformers LlamaForCausalLM name pattern ("{}" is the layer index)
_LIT_TO_HF = {
    "transformer.wte.weight": "model.embed_tokens.weight",
    "transformer.h.{}.norm_1.weight": "model.layers.{}.input_layernorm.weight",
    "transformer.h.{}.attn.q_proj.weight": "model.layers.{}.self_attn.q_proj.weight",
    "transformer.h.{}.attn.k_proj.weight": "model.layers.{}.self_attn.k_proj.weight",
    "transformer.h.{}.attn.v_proj.weight": "model.layers.{}.self_attn.v_proj.weight",
    "transformer.h.{}.attn.o_proj.weight": "model.layers.{}.self_attn.o_proj.weight",
    "transformer.h.{}.norm_2.weight": "model.layers.{}.post_attention_layernorm.weight",
    "transformer.h.{}.mlp.gate_proj.weight": "model.layers.{}.mlp.gate_proj.weight",
    "transformer.h.{}.mlp.up_proj.weight": "model.layers.{}.mlp.up_proj.weight",
    "transformer.h.{}.mlp.down_proj.weight": "model.layers.{}.mlp.down_proj.weight",
    "transformer.ln_f.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
_HF_TO_LIT = {v: k for k, v in _LIT_TO_HF.items()}


def _rename(name: str, table: Dict[str, str]) -> str:
    layer = re.search(r"\.(\d+)\.", name)
    key = name.replace(f".{layer.group(1)}.", ".{}.", 1) if layer else name
    if key not in table:
        raise KeyError(name)
    return table[key].format(layer.group(1)) if layer else table[key]


def lit_to_hf_name(name: str) -> str:
    return _rename(name, _LIT_TO_HF)


def hf_to_lit_name(name: str) -> str:
    return _rename(name, _HF_TO_LIT)


def lit_to_hf_state_dict(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Our base-model state dict under HF ``LlamaForCausalLM`` names (same tensors, same rotary layout)."""
    return {lit_to_hf_name(k): v for k, v in state_dict.items()}


def hf_to_lit_state_dict(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """An HF ``LlamaForCausalLM`` state dict under our names; rotary buffers HF may store are dropped."""
    return {hf_to_lit_name(k): v for k, v in state_dict.items() if not k.endswith("rotary_emb.inv_freq")}
