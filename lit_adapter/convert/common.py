"""Tensor names, the rotary-layout permutation and the small file helpers every converter shares."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from lit_adapter.errors import UserError

StateDict = Dict[str, torch.Tensor]
PathLike = Union[str, Path]

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


def rename(name: str, table: Dict[str, str]) -> str:
    layer = re.search(r"\.(\d+)\.", name)
    key = name.replace(f".{layer.group(1)}.", ".{}.", 1) if layer else name
    if key not in table:
        raise KeyError(name)
    return table[key].format(layer.group(1)) if layer else table[key]


def lit_to_hf_name(name: str) -> str:
    return rename(name, _LIT_TO_HF)


def hf_to_lit_name(name: str) -> str:
    return rename(name, _HF_TO_LIT)


def lit_to_hf_state_dict(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Our base-model state dict under HF ``LlamaForCausalLM`` names (same tensors, same rotary layout)."""
    return {lit_to_hf_name(k): v for k, v in state_dict.items()}


def hf_to_lit_state_dict(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """An HF ``LlamaForCausalLM`` state dict under our names; rotary buffers HF may store are dropped."""
    return {hf_to_lit_name(k): v for k, v in state_dict.items() if not k.endswith("rotary_emb.inv_freq")}


# ----------------------------------------------------------------------------------------------------------------------
# Rotary layout
#
# Meta's reference code and llama2.c rotate interleaved pairs (2i, 2i+1) of each head; our model (like HF) rotates
# the pairs (i, i + hs/2). Reordering the output rows of wq and wk the same way within each head turns one into the
# other: q.k is a sum over the rows, so the attention scores do not change.


def interleaved_to_half(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q/k projection ``(n_heads * hs, in)`` from interleaved-pair to rotate-half order, per head."""
    rows, cols = weight.shape
    hs = rows // n_heads
    # (heads, hs/2 pairs, 2 members) -> (heads, 2 members, hs/2 pairs): the even members first, then the odd ones
    return weight.reshape(n_heads, hs // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def half_to_interleaved(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of :func:`interleaved_to_half`."""
    rows, cols = weight.shape
    hs = rows // n_heads
    return weight.reshape(n_heads, 2, hs // 2, cols).transpose(1, 2).reshape(rows, cols)


# ----------------------------------------------------------------------------------------------------------------------
# helpers


def find_tokenizer(given: Optional[PathLike], candidates: List[Path], flag: str) -> Path:
    if given is not None:
        if not Path(given).is_file():
            raise UserError(f"tokenizer not found: {given}")
        return Path(given)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise UserError(f"no tokenizer found (looked for {', '.join(map(str, candidates))}); pass {flag}")


def first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


def existing_dir(path: PathLike) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"checkpoint directory not found: {path}")
    return path


def read_json(path: Path) -> Dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} does not hold a JSON object")
    return data


def numel(shape: Tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
