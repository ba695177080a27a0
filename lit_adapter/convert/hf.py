"""HF ``transformers`` folders: ``config.json`` and safetensors or ``.bin`` weights.

Dispatches on ``config.json``'s ``model_type``: ``llama`` (``LlamaForCausalLM``: LLaMA 1/2/3, TinyLlama, ...),
``gpt2`` (``GPT2LMHeadModel``, :mod:`lit_adapter.convert.gpt2`) and the encoders ``roberta`` and ``bert`` (bare or
sequence classifiers, :mod:`lit_adapter.convert.roberta`); any other architecture is refused by name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple


from lit_adapter.model.config import Config
from lit_adapter.errors import UserError
from lit_adapter.convert.common import PathLike, StateDict, existing_dir, read_json, hf_to_lit_name
from lit_adapter.convert.gpt2 import config_from_hf_gpt2, hf_gpt2_to_lit
from lit_adapter.convert.roberta import ENCODER_TYPES, config_from_hf_encoder, hf_encoder_to_lit
from lit_adapter.model.rope import ORIGINAL, ROPE_TYPES, parse_rope_scaling

# ----------------------------------------------------------------------------------------------------------------------
# HF transformers


def config_from_hf(hf_config: Dict[str, Any], name: str = "") -> Config:
    """Our :class:`Config` for an HF ``LlamaConfig`` or ``GPT2Config`` dict (``config.json``); unsupported
    architectures and variants raise."""
    model_type = hf_config.get("model_type", "llama")
    if model_type == "gpt2":
        return config_from_hf_gpt2(hf_config, name)
    if model_type in ENCODER_TYPES:
        return config_from_hf_encoder(hf_config, name)
    if model_type != "llama":
        arch = ", ".join(hf_config.get("architectures") or []) or "unnamed"
        raise UserError(f"unsupported architecture: config.json has model_type={model_type!r} ({arch}); "
                        f"lit-adapter converts {', '.join(SUPPORTED_MODEL_TYPES)}")
    # transformers < 5 writes rope_theta (+ rope_scaling); transformers 5 writes rope_parameters
    rope = dict(hf_config.get("rope_scaling") or {}, **(hf_config.get("rope_parameters") or {}))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    rope_theta = hf_config.get("rope_theta", rope.get("rope_theta", 10000.0))
    partial_rotary = hf_config.get("partial_rotary_factor", rope.get("partial_rotary_factor", 1.0))
    unsupported = {  # name: (value, unsupported?)
        "rope_scaling": (rope, rope_type not in ("default",) + ROPE_TYPES),  # e.g. longrope
        "partial_rotary_factor": (partial_rotary, partial_rotary not in (None, 1, 1.0)),
        "attention_bias": (hf_config.get("attention_bias"), bool(hf_config.get("attention_bias", False))),
        "mlp_bias": (hf_config.get("mlp_bias"), bool(hf_config.get("mlp_bias", False))),
        "hidden_act": (hf_config.get("hidden_act"), hf_config.get("hidden_act", "silu") != "silu"),
    }
    bad = [f"{k}={value!r}" for k, (value, refused) in unsupported.items() if refused]
    head_dim, n_head = hf_config.get("head_dim"), hf_config.get("num_attention_heads")
    n_embd = hf_config.get("hidden_size")
    if head_dim is not None and n_head and n_embd and head_dim * n_head != n_embd:
        bad.append(f"head_dim={head_dim} != hidden_size / num_attention_heads = {n_embd} / {n_head}")
    if bad:
        raise UserError(f"config.json uses LLaMA features lit-adapter does not implement: {', '.join(bad)}")
    max_positions = hf_config.get("max_position_embeddings", 2048)
    rope_scaling, block_size = rope_scaling_from_hf(rope, max_positions)
    try:
        return Config(
            name=name,
            block_size=block_size,
            vocab_size=hf_config["vocab_size"],
            n_layer=hf_config["num_hidden_layers"],
            n_head=hf_config["num_attention_heads"],
            n_query_groups=hf_config.get("num_key_value_heads") or hf_config["num_attention_heads"],
            n_embd=hf_config["hidden_size"],
            intermediate_size=hf_config["intermediate_size"],
            rope_base=float(rope_theta),
            rope_scaling=rope_scaling,
            norm_eps=hf_config.get("rms_norm_eps", 1e-6),
            tie_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        )
    except KeyError as err:
        raise UserError(f"config.json lacks the field {err.args[0]!r}") from None


SUPPORTED_MODEL_TYPES = ("llama", "gpt2") + ENCODER_TYPES


def rope_scaling_from_hf(rope: Dict[str, Any], max_positions: int) -> Tuple[Optional[Dict[str, Any]], int]:
    """``(rope_scaling, block_size)`` for HF's rope dict and ``max_position_embeddings``, read as HF computes them.

    HF's dynamic NTK scales relative to ``max_position_embeddings``: that is its original window. HF's YaRN and
    llama3 read ``original_max_position_embeddings`` (defaulting to ``max_position_embeddings``, as HF's
    ``standardize_rope_params`` does). Linear scaling does not depend on either; ``max_position_embeddings`` is read as
    the pretrained window unless ``original_max_position_embeddings`` says otherwise. The window (``block_size``)
    is ``factor x original``, or ``max_position_embeddings`` where that is larger (Llama 3.1: 8 x 8192 = 65536, but
    131072 declared).
    """
    scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in (None, "default"):
        return None, max_positions
    scaling.pop("type", None)
    scaling["rope_type"] = kind
    if kind == "dynamic":
        scaling[ORIGINAL] = max_positions
    else:
        scaling[ORIGINAL] = scaling.get(ORIGINAL) or max_positions
    if kind == "yarn" and scaling.get("factor") is None:  # HF: the ratio of the two windows
        scaling["factor"] = max_positions / scaling[ORIGINAL]
    scaling = parse_rope_scaling(scaling)
    return scaling, max(max_positions, int(scaling["factor"] * scaling[ORIGINAL]))


def hf_config_from_lit(config: Config) -> Dict[str, Any]:
    """The HF ``LlamaConfig`` fields (a ``config.json`` dict) of ``config``; :func:`config_from_hf` reads it back.

    ``max_position_embeddings`` is the original window for linear and dynamic scaling (HF's dynamic NTK needs it
    there) and the scaled window for yarn and llama3, whose dicts carry the original one.
    """
    scaling = config.rope_scaling
    hf: Dict[str, Any] = dict(
        model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=config.padded_vocab_size,
        hidden_size=config.n_embd, intermediate_size=config.intermediate_size, num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head, num_key_value_heads=config.n_query_groups,
        max_position_embeddings=config.block_size, rms_norm_eps=config.norm_eps, rope_theta=config.rope_base,
        tie_word_embeddings=config.tie_embeddings, hidden_act="silu",
    )
    if scaling:
        fields = dict(scaling)
        if scaling["rope_type"] in ("linear", "dynamic"):
            hf["max_position_embeddings"] = fields.pop(ORIGINAL)
        hf["rope_scaling"] = fields
    return hf


def _hf_weight_files(checkpoint_dir: Path) -> List[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = checkpoint_dir / index_name
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise UserError(f"{index} has no weight_map")
            files = [checkpoint_dir / f for f in sorted(set(weight_map.values()))]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise UserError(f"{index} lists shards that are not in {checkpoint_dir}: {', '.join(missing[:5])}")
            return files
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (checkpoint_dir / single).is_file():
            return [checkpoint_dir / single]
    found = sorted(checkpoint_dir.glob("*.safetensors")) or sorted(checkpoint_dir.glob("pytorch_model*.bin"))
    if found:
        return found
    raise UserError(
        f"no HF weights in {checkpoint_dir}: expected model.safetensors, pytorch_model.bin or a sharded "
        "*.index.json with its shards"
    )


def load_hf_checkpoint(checkpoint_dir: PathLike) -> Tuple[Config, StateDict]:
    """``(config, state dict under our names)`` of an HF ``LlamaForCausalLM`` or ``GPT2LMHeadModel`` directory."""
    from lit_adapter.checkpoint import load_state_dict

    checkpoint_dir = existing_dir(checkpoint_dir)
    config_path = checkpoint_dir / "config.json"
    if not config_path.is_file():
        raise UserError(f"{checkpoint_dir} has no config.json; is it an HF transformers model directory?")
    config = config_from_hf(read_json(config_path), name=checkpoint_dir.name)
    state_dict: StateDict = {}
    if config.position_embedding != "rope":  # GPT-2 or an encoder (config_from_hf says which)
        raw: StateDict = {}
        for path in _hf_weight_files(checkpoint_dir):
            raw.update(load_state_dict(path))
        convert = hf_gpt2_to_lit if config.causal else hf_encoder_to_lit
        return config, convert(raw, config, source=str(checkpoint_dir))
    for path in _hf_weight_files(checkpoint_dir):
        for name, tensor in load_state_dict(path).items():
            if name.endswith("rotary_emb.inv_freq"):
                continue
            try:
                state_dict[hf_to_lit_name(name)] = tensor
            except KeyError:
                raise UserError(f"{path} holds a tensor that is not part of LlamaForCausalLM: {name}") from None
    if config.tie_embeddings:
        state_dict.pop("lm_head.weight", None)
    return config, state_dict
