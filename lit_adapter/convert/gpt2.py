"""HF ``transformers`` ``GPT2LMHeadModel`` <-> lit-adapter: config fields and weights.

HF's GPT-2 stores its linears as ``Conv1D``: ``y = x @ W + b`` with ``W`` of shape ``(in, out)``, the transpose
of ``nn.Linear``'s ``(out, in)``. Its attention input is one fused ``c_attn`` of ``3 * n_embd`` outputs (query,
key, value in that order); our model holds ``q_proj``/``k_proj``/``v_proj`` separately (the layout every PEFT
method here uses for both families), so ``c_attn`` is transposed and split into three, and concatenated back on
export. Both directions only transpose, split and concatenate, so a round trip is bit-exact.

Name map (``{}`` the layer): ``transformer.wte``/``wpe`` (same names), ``h.{}.ln_1`` -> ``norm_1``,
``h.{}.attn.c_attn`` -> ``attn.q_proj/k_proj/v_proj``, ``h.{}.attn.c_proj`` -> ``attn.o_proj``, ``h.{}.ln_2``
-> ``norm_2``, ``h.{}.mlp.c_fc`` -> ``mlp.up_proj``, ``h.{}.mlp.c_proj`` -> ``mlp.down_proj``, ``ln_f``; the head
is tied to ``wte``.
"""

from __future__ import annotations

import re
from typing import Any, Dict

import torch

from lit_adapter.model.config import Config
from lit_adapter.convert.common import StateDict
from lit_adapter.errors import UserError

GPT2_FIELDS = dict(norm_class="LayerNorm", mlp_class="GptNeoxMLP", bias=True, position_embedding="learned",
                   gelu_approximate="tanh", lm_head_bias=False)
"""The Config fields that make our model GPT-2."""

_ACTIVATIONS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}
_SAME = {"ln_1": "norm_1", "ln_2": "norm_2", "attn.c_proj": "attn.o_proj", "mlp.c_fc": "mlp.up_proj",
         "mlp.c_proj": "mlp.down_proj"}
_CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # weights stored (in, out)


def is_gpt2(config: Config) -> bool:
    return config.causal and all(getattr(config, k) == v for k, v in GPT2_FIELDS.items() if k != "gelu_approximate")


def config_from_hf_gpt2(hf: Dict[str, Any], name: str = "") -> Config:
    """Our :class:`Config` for an HF ``GPT2Config`` dict; variants our model does not implement raise."""
    act = hf.get("activation_function", "gelu_new")
    bad = [f"activation_function={act!r}"] if act not in _ACTIVATIONS else []
    for key, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                    ("reorder_and_upcast_attn", False), ("add_cross_attention", False)):
        if key in hf and bool(hf[key]) != ok:
            bad.append(f"{key}={hf[key]!r}")
    if bad:
        raise UserError(f"config.json uses GPT-2 features lit-adapter does not implement: {', '.join(bad)}")
    try:
        n_embd = hf["n_embd"]
        return Config(
            name=name, block_size=hf.get("n_positions", 1024), vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
            n_head=hf["n_head"], n_embd=n_embd, intermediate_size=hf.get("n_inner") or 4 * n_embd,
            norm_eps=hf.get("layer_norm_epsilon", 1e-5), tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
            **dict(GPT2_FIELDS, gelu_approximate=_ACTIVATIONS[act]),
        )
    except KeyError as err:
        raise UserError(f"config.json lacks the field {err.args[0]!r}") from None


def hf_config_gpt2(config: Config, dtype_name: str, *, bos_token_id, eos_token_id,
                   tie_word_embeddings: bool) -> Dict[str, Any]:
    """``config.json`` of a ``GPT2LMHeadModel`` with the shape of ``config``."""
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": config.padded_vocab_size,
        "n_positions": config.block_size, "n_ctx": config.block_size, "n_embd": config.n_embd,
        "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": config.intermediate_size,
        "activation_function": "gelu_new" if config.gelu_approximate == "tanh" else "gelu",
        "layer_norm_epsilon": config.norm_eps, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "initializer_range": 0.02, "use_cache": True, "tie_word_embeddings": tie_word_embeddings,
        "bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "torch_dtype": dtype_name, "dtype": dtype_name,
    }


def hf_gpt2_to_lit(state_dict: StateDict, config: Config, source: str = "checkpoint") -> StateDict:
    """An HF ``GPT2LMHeadModel`` (or ``GPT2Model``) state dict under our names and layout."""
    out: StateDict = {}
    d = config.n_embd
    for name, tensor in state_dict.items():
        key = name[len("transformer."):] if name.startswith("transformer.") else name
        if key.endswith((".attn.bias", ".attn.masked_bias")):  # causal-mask buffers of old checkpoints
            continue
        if key in ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"):
            out[f"transformer.{key}"] = tensor
            continue
        if key == "lm_head.weight":
            out[key] = tensor
            continue
        match = re.fullmatch(r"h\.(\d+)\.(ln_1|ln_2|attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.(weight|bias)",
                             key)
        if not match:
            raise UserError(f"{source} holds a tensor that is not part of GPT2LMHeadModel: {name}")
        layer, module, kind = match.groups()
        prefix = f"transformer.h.{layer}"
        if module in _CONV1D and kind == "weight":
            tensor = tensor.t()  # Conv1D (in, out) -> Linear (out, in)
        if module == "attn.c_attn":
            for proj, part in zip(("q_proj", "k_proj", "v_proj"), tensor.split(d, dim=0)):
                out[f"{prefix}.attn.{proj}.{kind}"] = part.contiguous()
        else:
            out[f"{prefix}.{_SAME[module]}.{kind}"] = tensor.contiguous()
    if config.tie_embeddings:
        out.pop("lm_head.weight", None)
    return out


def lit_to_hf_gpt2(state_dict: StateDict, config: Config) -> StateDict:
    """Our GPT-2 state dict (base names) under HF ``GPT2LMHeadModel`` names, ``c_attn`` fused and every Conv1D
    weight transposed back to ``(in, out)``."""
    inverse = {v: k for k, v in _SAME.items()}
    out: StateDict = {}
    for name, tensor in state_dict.items():
        if name == "lm_head.weight":
            out[name] = tensor
            continue
        if name.startswith("transformer.") and not name.startswith("transformer.h."):
            out[name] = tensor
            continue
        match = re.fullmatch(r"transformer\.h\.(\d+)\.(.+)\.(weight|bias)", name)
        if not match:
            raise UserError(f"{name} has no place in GPT2LMHeadModel")
        layer, module, kind = match.groups()
        if module in ("attn.k_proj", "attn.v_proj"):
            continue  # fused with q_proj below
        if module == "attn.q_proj":
            parts = [state_dict[f"transformer.h.{layer}.attn.{p}.{kind}"] for p in ("q_proj", "k_proj", "v_proj")]
            tensor, hf_module = torch.cat(parts, dim=0), "attn.c_attn"
        elif module in inverse:
            hf_module = inverse[module]
        else:
            raise UserError(f"{name} has no place in GPT2LMHeadModel")
        if hf_module in _CONV1D and kind == "weight":
            tensor = tensor.t()
        out[f"transformer.h.{layer}.{hf_module}.{kind}"] = tensor.contiguous()
    return out
