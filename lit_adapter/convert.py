"""Checkpoint conversion between lit-adapter and other LLaMA layouts.

Three sources become a lit-adapter checkpoint directory (``model_config.json``, ``lit_model.safetensors``,
``tokenizer.model``):

* HF ``transformers`` ``LlamaForCausalLM`` directories (same rotary layout as ours: only names change);
* Meta's ``consolidated.NN.pth`` tensor-parallel shards with ``params.json``;
* karpathy's llama2.c exports: legacy ``.bin`` (v0), versioned fp32 ``.bin`` (v1) and ``.pt`` training checkpoints.

Meta and llama2.c rotate interleaved pairs of each head, so their q/k rows are permuted into the rotate-half order
our model uses (see :func:`interleaved_to_half`), the same permutation as HF's ``convert_llama_weights_to_hf.py``.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from lit_adapter.config import Config
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
# Meta / llama2.c names (llama2.c's model.py uses Meta's module names)

_META_TO_LIT = {
    "tok_embeddings.weight": "transformer.wte.weight",
    "layers.{}.attention_norm.weight": "transformer.h.{}.norm_1.weight",
    "layers.{}.attention.wq.weight": "transformer.h.{}.attn.q_proj.weight",
    "layers.{}.attention.wk.weight": "transformer.h.{}.attn.k_proj.weight",
    "layers.{}.attention.wv.weight": "transformer.h.{}.attn.v_proj.weight",
    "layers.{}.attention.wo.weight": "transformer.h.{}.attn.o_proj.weight",
    "layers.{}.ffn_norm.weight": "transformer.h.{}.norm_2.weight",
    "layers.{}.feed_forward.w1.weight": "transformer.h.{}.mlp.gate_proj.weight",
    "layers.{}.feed_forward.w3.weight": "transformer.h.{}.mlp.up_proj.weight",
    "layers.{}.feed_forward.w2.weight": "transformer.h.{}.mlp.down_proj.weight",
    "norm.weight": "transformer.ln_f.weight",
    "output.weight": "lm_head.weight",
}
# Cached rotary tables; our model computes its own.
_ROTARY_TABLES = re.compile(r"(^|\.)(rope\.freqs|freqs_cis|freqs_cos|freqs_sin)$")


def meta_to_lit_state_dict(state_dict: StateDict, config: Config) -> StateDict:
    """A Meta / llama2.c state dict (``tok_embeddings``, ``layers.N.attention.wq``, ...) under our names.

    The q/k rows are permuted to the rotate-half layout (k with ``n_query_groups`` heads), the ``torch.compile``
    prefix ``_orig_mod.`` is dropped, and with ``config.tie_embeddings`` the duplicate ``output.weight`` too.
    """
    out: StateDict = {}
    unknown = []
    for name, tensor in state_dict.items():
        name = name.removeprefix("_orig_mod.")
        if _ROTARY_TABLES.search(name):
            continue
        try:
            lit_name = _rename(name, _META_TO_LIT)
        except KeyError:
            unknown.append(name)
            continue
        if lit_name.endswith("attn.q_proj.weight"):
            tensor = interleaved_to_half(tensor, config.n_head)
        elif lit_name.endswith("attn.k_proj.weight"):
            tensor = interleaved_to_half(tensor, config.n_query_groups)
        out[lit_name] = tensor
    if unknown:
        raise UserError(f"{len(unknown)} unknown tensors in the checkpoint: {', '.join(unknown[:5])}")
    if config.tie_embeddings:
        out.pop("lm_head.weight", None)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# HF transformers


def config_from_hf(hf_config: Dict[str, Any], name: str = "") -> Config:
    """Our :class:`Config` for an HF ``LlamaConfig`` dict (``config.json``); unsupported variants raise."""
    model_type = hf_config.get("model_type", "llama")
    if model_type != "llama":
        raise UserError(f"only LLaMA checkpoints are supported, config.json has model_type={model_type!r}")
    # transformers < 5 writes rope_theta (+ rope_scaling); transformers 5 writes rope_parameters
    rope = dict(hf_config.get("rope_scaling") or {}, **(hf_config.get("rope_parameters") or {}))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    rope_theta = hf_config.get("rope_theta", rope.get("rope_theta", 10000.0))
    unsupported = {
        "rope_scaling": rope_type != "default",
        "attention_bias": bool(hf_config.get("attention_bias", False)),
        "mlp_bias": bool(hf_config.get("mlp_bias", False)),
        "hidden_act": hf_config.get("hidden_act", "silu") != "silu",
    }
    bad = [f"{k}={rope if k == 'rope_scaling' else hf_config.get(k)!r}" for k, v in unsupported.items() if v]
    head_dim, n_head = hf_config.get("head_dim"), hf_config.get("num_attention_heads")
    n_embd = hf_config.get("hidden_size")
    if head_dim is not None and n_head and n_embd and head_dim * n_head != n_embd:
        bad.append(f"head_dim={head_dim} != hidden_size / num_attention_heads = {n_embd} / {n_head}")
    if bad:
        raise UserError(f"config.json uses LLaMA features lit-adapter does not implement: {', '.join(bad)}")
    try:
        return Config(
            name=name,
            block_size=hf_config.get("max_position_embeddings", 2048),
            vocab_size=hf_config["vocab_size"],
            n_layer=hf_config["num_hidden_layers"],
            n_head=hf_config["num_attention_heads"],
            n_query_groups=hf_config.get("num_key_value_heads") or hf_config["num_attention_heads"],
            n_embd=hf_config["hidden_size"],
            intermediate_size=hf_config["intermediate_size"],
            rope_base=float(rope_theta),
            norm_eps=hf_config.get("rms_norm_eps", 1e-6),
            tie_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        )
    except KeyError as err:
        raise UserError(f"config.json lacks the field {err.args[0]!r}") from None


def _hf_weight_files(checkpoint_dir: Path) -> List[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = checkpoint_dir / index_name
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
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
    """``(config, state dict under our names)`` of an HF ``LlamaForCausalLM`` directory."""
    from lit_adapter.checkpoint import load_state_dict

    checkpoint_dir = _existing_dir(checkpoint_dir)
    config_path = checkpoint_dir / "config.json"
    if not config_path.is_file():
        raise UserError(f"{checkpoint_dir} has no config.json; is it an HF transformers model directory?")
    config = config_from_hf(_read_json(config_path), name=checkpoint_dir.name)
    state_dict: StateDict = {}
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


# ----------------------------------------------------------------------------------------------------------------------
# Meta consolidated.NN.pth

# How Meta's tensor-parallel layers are split across the shards: column-parallel layers (and the output head) along
# their output rows, row-parallel layers and the (parallel) embedding along their input columns.
_META_SHARD_DIM = {
    "attention.wq": 0, "attention.wk": 0, "attention.wv": 0, "feed_forward.w1": 0, "feed_forward.w3": 0,
    "output": 0, "attention.wo": 1, "feed_forward.w2": 1, "tok_embeddings": 1,
}


def _meta_shard_dim(name: str) -> Optional[int]:
    """The concatenation dim of a sharded tensor, or ``None`` for tensors every shard holds in full (norms)."""
    stem = re.sub(r"^layers\.\d+\.", "", name.removesuffix(".weight"))
    if stem in _META_SHARD_DIM:
        return _META_SHARD_DIM[stem]
    if stem in ("attention_norm", "ffn_norm", "norm", "rope.freqs"):
        return None
    raise UserError(f"unknown tensor in the Meta checkpoint: {name}")


def merge_meta_shards(shards: List[StateDict]) -> StateDict:
    """One state dict from Meta's tensor-parallel shards (``consolidated.00.pth``, ``01``, ...)."""
    if len(shards) == 1:
        return dict(shards[0])
    names = list(shards[0])
    for i, shard in enumerate(shards[1:], start=1):
        if set(shard) != set(names):
            raise UserError(f"shard {i} has different tensors than shard 0; are all consolidated.*.pth from one model?")
    merged = {}
    for name in names:
        dim = _meta_shard_dim(name)
        parts = [shard[name] for shard in shards]
        merged[name] = parts[0] if dim is None else torch.cat(parts, dim=dim)
    return merged


def config_from_meta_params(
    params: Dict[str, Any], state_dict: StateDict, name: str = "", block_size: int = 2048
) -> Config:
    """Our config from Meta's ``params.json``; the vocabulary and MLP width are read off the tensors because
    ``params.json`` gives them only indirectly (``vocab_size: -1``, ``multiple_of``, ``ffn_dim_multiplier``)."""
    try:
        dim, n_head, n_layer = params["dim"], params["n_heads"], params["n_layers"]
    except KeyError as err:
        raise UserError(f"params.json lacks the field {err.args[0]!r}") from None
    for required in ("tok_embeddings.weight", "layers.0.feed_forward.w1.weight"):
        if required not in state_dict:
            raise UserError(f"the Meta checkpoint has no {required}")
    embedding = state_dict["tok_embeddings.weight"]
    vocab_size = embedding.shape[0]
    tie = "output.weight" not in state_dict or torch.equal(state_dict["output.weight"], embedding)
    return Config(
        name=name,
        block_size=block_size,
        vocab_size=vocab_size,
        n_layer=n_layer,
        n_head=n_head,
        n_query_groups=params.get("n_kv_heads") or n_head,
        n_embd=dim,
        intermediate_size=state_dict["layers.0.feed_forward.w1.weight"].shape[0],
        rope_base=float(params.get("rope_theta", 10000.0)),
        norm_eps=params.get("norm_eps", 1e-5),
        tie_embeddings=tie,
    )


def load_meta_checkpoint(
    checkpoint_dir: PathLike, model_name: Optional[str] = None, block_size: Optional[int] = None
) -> Tuple[Config, StateDict]:
    """``(config, state dict under our names)`` of a Meta checkpoint directory (``params.json`` + shards).

    With ``model_name`` (a :meth:`Config.from_name` name) the result is checked against that config and takes its
    name and ``block_size``; otherwise ``block_size`` defaults to 2048 (LLaMA 1).
    """
    from lit_adapter.checkpoint import load_state_dict

    checkpoint_dir = _existing_dir(checkpoint_dir)
    params_path = checkpoint_dir / "params.json"
    if not params_path.is_file():
        raise UserError(f"{checkpoint_dir} has no params.json; is it a Meta LLaMA checkpoint directory?")
    shard_paths = sorted(checkpoint_dir.glob("consolidated.*.pth"))
    if not shard_paths:
        raise UserError(f"no consolidated.*.pth weights in {checkpoint_dir}")
    raw = merge_meta_shards([load_state_dict(p) for p in shard_paths])
    raw = {k.removeprefix("_orig_mod."): v for k, v in raw.items()}
    reference = Config.from_name(model_name) if model_name else None
    config = config_from_meta_params(
        _read_json(params_path),
        raw,
        name=model_name or checkpoint_dir.name,
        block_size=block_size or (reference.block_size if reference else 2048),
    )
    if reference is not None:
        _check_same_shape(config, reference, f"--model_name {model_name}")
    return config, meta_to_lit_state_dict(raw, config)


def _check_same_shape(config: Config, reference: Config, what: str) -> None:
    keys = ("n_layer", "n_head", "n_query_groups", "n_embd", "intermediate_size", "vocab_size")
    diff = [f"{k}={getattr(config, k)} vs {getattr(reference, k)}" for k in keys
            if getattr(config, k) != getattr(reference, k)]
    if diff:
        raise UserError(f"the checkpoint does not match {what}: {', '.join(diff)} (checkpoint vs {what})")


# ----------------------------------------------------------------------------------------------------------------------
# llama2.c

_LLAMA2C_MAGIC = 0x616B3432  # "ak42"
_LLAMA2C_HEADER = 256  # bytes of the versioned header


def _llama2c_config(
    name: str, dim: int, hidden_dim: int, n_layers: int, n_heads: int, n_kv_heads: int, vocab_size: int,
    max_seq_len: int, tied: bool, norm_eps: float = 1e-5,
) -> Config:
    return Config(
        name=name, block_size=max_seq_len, vocab_size=vocab_size, n_layer=n_layers, n_head=n_heads,
        n_query_groups=n_kv_heads, n_embd=dim, intermediate_size=hidden_dim, norm_eps=norm_eps, tie_embeddings=tied,
    )


def _llama2c_layout(config: Config, *, legacy: bool) -> List[Tuple[str, Tuple[int, ...]]]:
    """Names (Meta style) and shapes of the tensors of a llama2.c ``.bin``, in file order."""
    L, d, h = config.n_layer, config.n_embd, config.intermediate_size
    kv = config.n_query_groups * config.head_size

    def per_layer(stem: str, shape: Tuple[int, ...]) -> List[Tuple[str, Tuple[int, ...]]]:
        return [(f"layers.{i}.{stem}.weight", shape) for i in range(L)]

    matrices = [
        *per_layer("attention.wq", (d, d)), *per_layer("attention.wk", (kv, d)), *per_layer("attention.wv", (kv, d)),
        *per_layer("attention.wo", (d, d)),
    ]
    if legacy:
        layout = [
            ("tok_embeddings.weight", (config.vocab_size, d)), *per_layer("attention_norm", (d,)), *matrices,
            *per_layer("ffn_norm", (d,)), *per_layer("feed_forward.w1", (h, d)), *per_layer("feed_forward.w2", (d, h)),
            *per_layer("feed_forward.w3", (h, d)), ("norm.weight", (d,)),
            ("freqs_cos", (config.block_size, config.head_size // 2)),
            ("freqs_sin", (config.block_size, config.head_size // 2)),
        ]
    else:
        layout = [
            *per_layer("attention_norm", (d,)), *per_layer("ffn_norm", (d,)), ("norm.weight", (d,)),
            ("tok_embeddings.weight", (config.vocab_size, d)), *matrices, *per_layer("feed_forward.w1", (h, d)),
            *per_layer("feed_forward.w2", (d, h)), *per_layer("feed_forward.w3", (h, d)),
        ]
    if not config.tie_embeddings:
        layout.append(("output.weight", (config.vocab_size, d)))
    return layout


def load_llama2c_bin(path: PathLike) -> Tuple[Config, StateDict]:
    """``(config, state dict under our names)`` of a llama2.c fp32 ``.bin`` export, legacy (v0) or version 1.

    v0: 7 int32 ``dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, max_seq_len`` (a negative vocab size
    means an untied classifier is stored last), then the tensors grouped by kind over the layers. v1: the magic
    "ak42", the version, the same 7 int32 and a uint8 "shared classifier" flag in a 256-byte header, then the tensors
    (norms first). The rotary tables of v0 are skipped.
    """
    path = Path(path)
    data = bytearray(path.stat().st_size)  # writable, so torch.frombuffer can share it without a copy
    with open(path, "rb") as f:
        f.readinto(data)
    if len(data) < 28:
        raise UserError(f"{path} is too short ({len(data)} bytes) for a llama2.c checkpoint")
    (magic,) = struct.unpack_from("<I", data, 0)
    if magic == _LLAMA2C_MAGIC:
        (version,) = struct.unpack_from("<i", data, 4)
        if version != 1:
            raise UserError(
                f"{path} is a llama2.c version-{version} export; only the fp32 exports (legacy v0 and v1) are "
                "supported (convert the .pt training checkpoint instead)"
            )
        header = struct.unpack_from("<7i", data, 8)
        tied = bool(data[36])
        offset, legacy = _LLAMA2C_HEADER, False
    else:
        header = struct.unpack_from("<7i", data, 0)
        tied = header[5] > 0
        header = (*header[:5], abs(header[5]), header[6])
        offset, legacy = 28, True
    if min(header) <= 0:
        raise UserError(f"{path} does not start with a llama2.c header (read {header})")
    config = _llama2c_config(path.stem, *header, tied=tied)
    layout = _llama2c_layout(config, legacy=legacy)
    n_floats = sum(_numel(shape) for _, shape in layout)
    if len(data) - offset != 4 * n_floats:
        raise UserError(
            f"{path} has {len(data) - offset} bytes of weights but its header (dim, hidden_dim, n_layers, n_heads, "
            f"n_kv_heads, vocab_size, max_seq_len = {header}) implies {4 * n_floats}; is it a llama2.c fp32 export?"
        )
    flat = torch.frombuffer(data, dtype=torch.float32, offset=offset, count=n_floats)
    raw: StateDict = {}
    start = 0
    for name, shape in layout:
        raw[name] = flat[start : start + _numel(shape)].view(shape)
        start += _numel(shape)
    return config, meta_to_lit_state_dict(raw, config)


def load_llama2c_pt(path: PathLike) -> Tuple[Config, StateDict]:
    """``(config, state dict under our names)`` of a llama2.c training checkpoint ``{"model_args", "model"}``."""
    path = Path(path)
    try:
        checkpoint = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:
        raise UserError(f"cannot read llama2.c checkpoint {path}: {type(err).__name__}: {_first_line(err)}") from None
    if not isinstance(checkpoint, dict) or "model_args" not in checkpoint or "model" not in checkpoint:
        raise UserError(f"{path} is not a llama2.c training checkpoint (a dict with 'model_args' and 'model')")
    args = checkpoint["model_args"]
    raw = {k.removeprefix("_orig_mod."): v for k, v in checkpoint["model"].items()}
    for required in ("tok_embeddings.weight", "layers.0.feed_forward.w1.weight"):
        if required not in raw:
            raise UserError(f"the llama2.c checkpoint {path} has no {required}")
    embedding = raw["tok_embeddings.weight"]
    tied = "output.weight" not in raw or torch.equal(raw["output.weight"], embedding)
    try:
        config = _llama2c_config(
            path.stem,
            dim=args["dim"],
            hidden_dim=raw["layers.0.feed_forward.w1.weight"].shape[0],
            n_layers=args["n_layers"],
            n_heads=args["n_heads"],
            n_kv_heads=args.get("n_kv_heads") or args["n_heads"],
            vocab_size=embedding.shape[0],
            max_seq_len=args["max_seq_len"],
            tied=tied,
            norm_eps=args.get("norm_eps", 1e-5),
        )
    except KeyError as err:
        raise UserError(f"model_args of {path} lack {err.args[0]!r}") from None
    return config, meta_to_lit_state_dict(raw, config)


def load_llama2c_checkpoint(path: PathLike) -> Tuple[Config, StateDict]:
    """A llama2.c ``.pt`` training checkpoint or fp32 ``.bin`` export (told apart by content, not name)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"llama2.c checkpoint not found: {path}")
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"  # torch.save's zip container
    return load_llama2c_pt(path) if is_zip else load_llama2c_bin(path)


# ----------------------------------------------------------------------------------------------------------------------
# Writing the converted checkpoint directory

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(dtype: Optional[str]) -> Optional[torch.dtype]:
    if dtype is None:
        return None
    if dtype not in _DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def write_checkpoint_dir(
    output_dir: PathLike,
    config: Config,
    state_dict: StateDict,
    tokenizer: PathLike,
    dtype: Optional[torch.dtype] = None,
) -> Path:
    """Writes ``model_config.json``, ``lit_model.safetensors`` and ``tokenizer.model`` (each atomically).

    The weights are first checked against ``config`` on a meta-device model, so a converter bug or an inconsistent
    source fails before anything is written. ``tokenizer`` is a SentencePiece ``.model`` (copied) or a llama2.c
    vocabulary (converted); its vocabulary size must match the model's.
    """
    from lit_adapter.checkpoint import CONFIG_FILE, atomic_write, cast_state_dict, load_weights_into, save_state_dict
    from lit_adapter.model import GPT
    from lit_adapter.tokenizer import TOKENIZER_FILE, Tokenizer, is_llama2c_vocab, llama2c_vocab_to_sentencepiece

    tokenizer = Path(tokenizer)
    tok = Tokenizer(tokenizer)  # validates the file before the slow part
    if tok.vocab_size > config.vocab_size:
        raise UserError(
            f"the tokenizer {tokenizer} has {tok.vocab_size} tokens but the model only {config.vocab_size}; "
            "is it the model's tokenizer?"
        )
    state_dict = cast_state_dict(state_dict, dtype=dtype)
    with torch.device("meta"):
        model = GPT(config)
    load_weights_into(model, state_dict, source="converted checkpoint")
    del model

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    save_state_dict(state_dict, output_dir / "lit_model.safetensors")
    atomic_write(output_dir / CONFIG_FILE, config.save)
    target = output_dir / TOKENIZER_FILE
    if is_llama2c_vocab(tokenizer):
        proto = llama2c_vocab_to_sentencepiece(tokenizer)
        atomic_write(target, lambda tmp: tmp.write_bytes(proto))
    elif tokenizer.resolve() != target.resolve():
        atomic_write(target, lambda tmp: shutil.copyfile(tokenizer, tmp))
    return output_dir


def convert_hf_checkpoint(
    checkpoint_dir: PathLike,
    output_dir: PathLike,
    dtype: Optional[str] = None,
    tokenizer_path: Optional[PathLike] = None,
) -> Config:
    config, state_dict = load_hf_checkpoint(checkpoint_dir)
    tokenizer = _find_tokenizer(tokenizer_path, [Path(checkpoint_dir) / "tokenizer.model"], "--tokenizer_path")
    write_checkpoint_dir(output_dir, config, state_dict, tokenizer, parse_dtype(dtype))
    return config


def convert_meta_checkpoint(
    checkpoint_dir: PathLike,
    output_dir: PathLike,
    model_name: Optional[str] = None,
    block_size: Optional[int] = None,
    dtype: Optional[str] = None,
    tokenizer_path: Optional[PathLike] = None,
) -> Config:
    config, state_dict = load_meta_checkpoint(checkpoint_dir, model_name, block_size)
    # Meta's download puts tokenizer.model beside the size folders (llama/7B/, llama/tokenizer.model).
    candidates = [Path(checkpoint_dir) / "tokenizer.model", Path(checkpoint_dir).parent / "tokenizer.model"]
    tokenizer = _find_tokenizer(tokenizer_path, candidates, "--tokenizer_path")
    write_checkpoint_dir(output_dir, config, state_dict, tokenizer, parse_dtype(dtype))
    return config


def convert_llama2c_checkpoint(
    checkpoint_path: PathLike,
    output_dir: PathLike,
    tokenizer_path: Optional[PathLike] = None,
    dtype: Optional[str] = "float32",
) -> Config:
    config, state_dict = load_llama2c_checkpoint(checkpoint_path)
    folder = Path(checkpoint_path).parent
    candidates = [folder / "tokenizer.model", folder / "tokenizer.bin", folder / f"tok{config.vocab_size}.bin"]
    tokenizer = _find_tokenizer(tokenizer_path, candidates, "--tokenizer_path")
    write_checkpoint_dir(output_dir, config, state_dict, tokenizer, parse_dtype(dtype))
    return config


# ----------------------------------------------------------------------------------------------------------------------
# helpers


def _find_tokenizer(given: Optional[PathLike], candidates: List[Path], flag: str) -> Path:
    if given is not None:
        if not Path(given).is_file():
            raise UserError(f"tokenizer not found: {given}")
        return Path(given)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise UserError(f"no tokenizer found (looked for {', '.join(map(str, candidates))}); pass {flag}")


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


def _existing_dir(path: PathLike) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"checkpoint directory not found: {path}")
    return path


def _read_json(path: Path) -> Dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} does not hold a JSON object")
    return data


def _numel(shape: Tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
