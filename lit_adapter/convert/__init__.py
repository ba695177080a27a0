"""Checkpoint conversion between lit-adapter and other LLaMA layouts, and HF's GPT-2.

Three sources become a lit-adapter checkpoint directory (``model_config.json``, ``lit_model.safetensors``,
``tokenizer.model``):

* HF ``transformers`` ``LlamaForCausalLM`` directories (same rotary layout as ours: only names change) and
  ``GPT2LMHeadModel`` ones (``convert/gpt2.py``: Conv1D transposed, the fused ``c_attn`` split), with a
  SentencePiece ``tokenizer.model`` or a BPE ``tokenizer.json`` / ``vocab.json`` + ``merges.txt``;
* Meta's ``consolidated.NN.pth`` tensor-parallel shards with ``params.json``;
* karpathy's llama2.c exports: legacy ``.bin`` (v0), versioned fp32 ``.bin`` (v1) and ``.pt`` training checkpoints.

Meta and llama2.c rotate interleaved pairs of each head, so their q/k rows are permuted into the rotate-half order
our model uses (see :func:`interleaved_to_half`), the same permutation as HF's ``convert_llama_weights_to_hf.py``.

Layout: ``common.py`` (tensor names, the rotary permutation, file helpers), one module per source (``hf.py``,
``meta.py``, ``llama2c.py``), and here the writer of a checkpoint folder and the ``convert_*`` entry points.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import torch

from lit_adapter.model.config import Config
from lit_adapter.convert.common import (
    PathLike,
    StateDict,
    find_tokenizer,
    half_to_interleaved,
    hf_to_lit_name,
    hf_to_lit_state_dict,
    interleaved_to_half,
    lit_to_hf_name,
    lit_to_hf_state_dict,
)
from lit_adapter.convert.hf import config_from_hf, hf_config_from_lit, load_hf_checkpoint, rope_scaling_from_hf
from lit_adapter.convert.roberta import head_labels
from lit_adapter.convert.llama2c import load_llama2c_bin, load_llama2c_checkpoint, load_llama2c_pt
from lit_adapter.convert.meta import (
    config_from_meta_params,
    load_meta_checkpoint,
    merge_meta_shards,
    meta_to_lit_state_dict,
)
from lit_adapter.errors import UserError

__all__ = [
    "config_from_hf", "config_from_meta_params", "convert_hf_checkpoint", "convert_llama2c_checkpoint",
    "convert_meta_checkpoint", "half_to_interleaved", "hf_config_from_lit", "hf_to_lit_name", "hf_to_lit_state_dict",
    "interleaved_to_half", "lit_to_hf_name", "lit_to_hf_state_dict", "load_hf_checkpoint", "load_llama2c_bin",
    "load_llama2c_checkpoint", "load_llama2c_pt", "load_meta_checkpoint", "merge_meta_shards", "meta_to_lit_state_dict",
    "parse_dtype", "rope_scaling_from_hf", "write_checkpoint_dir",
]
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
    """Writes ``model_config.json``, ``lit_model.safetensors`` and the tokenizer (each atomically).

    The weights are first checked against ``config`` on a meta-device model, so a converter bug or an inconsistent
    source fails before anything is written. ``tokenizer`` is a SentencePiece ``.model`` (copied) or a llama2.c
    vocabulary (converted), or a BPE ``tokenizer.json`` / ``vocab.json`` (GPT-2, Llama 3: it and the other
    tokenizer files beside it are copied); its vocabulary size must match the model's.
    """
    from lit_adapter.checkpoint import CONFIG_FILE, atomic_write, cast_state_dict, load_weights_into, save_state_dict
    from lit_adapter.model.gpt import GPT
    from lit_adapter.data.tokenizer import (
        TOKENIZER_FILE, Tokenizer, is_llama2c_vocab, llama2c_vocab_to_sentencepiece, tokenizer_files,
    )

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
        if head_labels(state_dict):  # a converted encoder classifier keeps its head (lit_adapter.convert.roberta)
            from lit_adapter.model.heads import HeadSpec, attach_head

            labels = [str(i) for i in range(head_labels(state_dict))]
            attach_head(model, HeadSpec(labels=labels, pad_id=config.pad_token_id))
    load_weights_into(model, state_dict, source="converted checkpoint")
    del model

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    save_state_dict(state_dict, output_dir / "lit_model.safetensors")
    atomic_write(output_dir / CONFIG_FILE, config.save)
    target = output_dir / TOKENIZER_FILE
    if tok.processor is None:  # BPE: copy its files
        for file in tokenizer_files(tokenizer.parent):
            if file.resolve() != (output_dir / file.name).resolve():
                atomic_write(output_dir / file.name, lambda tmp, file=file: shutil.copyfile(file, tmp))
    elif is_llama2c_vocab(tokenizer):
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
    from lit_adapter.data.tokenizer import resolve_tokenizer_path

    config, state_dict = load_hf_checkpoint(checkpoint_dir)
    candidates = [resolve_tokenizer_path(checkpoint_dir)]
    tokenizer = find_tokenizer(tokenizer_path, candidates, "--tokenizer_path")
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
    tokenizer = find_tokenizer(tokenizer_path, candidates, "--tokenizer_path")
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
    tokenizer = find_tokenizer(tokenizer_path, candidates, "--tokenizer_path")
    write_checkpoint_dir(output_dir, config, state_dict, tokenizer, parse_dtype(dtype))
    return config


