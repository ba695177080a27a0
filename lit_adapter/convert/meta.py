"""Meta's original ``consolidated.NN.pth`` tensor-parallel shards with ``params.json``."""

from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Tuple

import torch

from lit_adapter.model.config import Config
from lit_adapter.errors import UserError
from lit_adapter.convert.common import PathLike, StateDict, existing_dir, read_json, rename, interleaved_to_half

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
            lit_name = rename(name, _META_TO_LIT)
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

    checkpoint_dir = existing_dir(checkpoint_dir)
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
        read_json(params_path),
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
