"""karpathy's llama2.c exports: legacy ``.bin`` (v0), versioned fp32 ``.bin`` (v1) and ``.pt`` training checkpoints."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import List, Tuple

import torch

from lit_adapter.model.config import Config
from lit_adapter.errors import UserError
from lit_adapter.convert.common import PathLike, StateDict, first_line, numel
from lit_adapter.convert.meta import meta_to_lit_state_dict

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
    n_floats = sum(numel(shape) for _, shape in layout)
    if len(data) - offset != 4 * n_floats:
        raise UserError(
            f"{path} has {len(data) - offset} bytes of weights but its header (dim, hidden_dim, n_layers, n_heads, "
            f"n_kv_heads, vocab_size, max_seq_len = {header}) implies {4 * n_floats}; is it a llama2.c fp32 export?"
        )
    flat = torch.frombuffer(data, dtype=torch.float32, offset=offset, count=n_floats)
    raw: StateDict = {}
    start = 0
    for name, shape in layout:
        raw[name] = flat[start : start + numel(shape)].view(shape)
        start += numel(shape)
    return config, meta_to_lit_state_dict(raw, config)


def load_llama2c_pt(path: PathLike) -> Tuple[Config, StateDict]:
    """``(config, state dict under our names)`` of a llama2.c training checkpoint ``{"model_args", "model"}``."""
    path = Path(path)
    try:
        checkpoint = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:
        raise UserError(f"cannot read llama2.c checkpoint {path}: {type(err).__name__}: {first_line(err)}") from None
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
