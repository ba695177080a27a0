"""lit-adapter → HF ``transformers``: a ``LlamaForCausalLM`` (or, for a GPT-2 config, ``GPT2LMHeadModel``:
:mod:`lit_adapter.convert.gpt2`, Conv1D weights transposed, ``c_attn`` fused) folder from a plain state dict under
our names. A BPE tokenizer (GPT-2, Llama 3) is copied as its files are; a SentencePiece one is converted below.

The folder holds what ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` read:
``config.json``, ``generation_config.json``, the weights as ``model.safetensors`` or, above ``max_shard_size``,
as ``model-0000i-of-0000n.safetensors`` shards with ``model.safetensors.index.json``, and the tokenizer files
(:mod:`lit_adapter.convert.hf_tokenizer`). The rotary layout is the same on both sides, so only names change
(``lit_adapter.convert.common``); biases, which only a merged BitFit or Adapter v2 run has, are named like the
weights and switch on ``attention_bias`` / ``mlp_bias``.

Nothing here imports ``transformers``: ``config.json`` is written field by field. It carries the rotary base
both as transformers 4's ``rope_theta`` and as transformers 5's ``rope_parameters`` and the dtype both as
``torch_dtype`` and ``dtype``, so either version reads it (only the installed 5.x is tested).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch

from lit_adapter.model.config import Config
from lit_adapter.convert.common import StateDict, lit_to_hf_name
from lit_adapter.convert.gpt2 import hf_config_gpt2, is_gpt2, lit_to_hf_gpt2
from lit_adapter.errors import UserError

DEFAULT_SHARD_SIZE = "5GB"
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
_UMASK = os.umask(0o022)
os.umask(_UMASK)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_shard_size(value: Union[int, str]) -> int:
    """Bytes of ``value``: an int, or a number with a unit as transformers writes it (``"5GB"`` = 5e9,
    ``"500MiB"`` = 500 * 2**20)."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(value).upper())
        if not match or match.group(2) not in _UNITS:
            raise UserError(f"--max_shard_size {value!r} is not a size such as 5GB, 500MB or 2000000000")
        size = int(float(match.group(1)) * _UNITS[match.group(2)])
    if size < 1:
        raise UserError(f"--max_shard_size must be positive, got {value!r}")
    return size


def hf_name(name: str) -> str:
    """The HF name of one of our tensors, including the biases a merged run may add (``...q_proj.bias``)."""
    if name.endswith(".bias"):
        return lit_to_hf_name(name[: -len("bias")] + "weight")[: -len("weight")] + "bias"
    return lit_to_hf_name(name)


def bias_flags(state_dict: StateDict) -> Dict[str, bool]:
    """``attention_bias`` / ``mlp_bias`` as the biases present in ``state_dict`` need them."""
    leaves = {k.split(".")[-2] for k in state_dict if k.endswith(".bias")}
    return {"attention_bias": bool(leaves & set(_ATTENTION)), "mlp_bias": bool(leaves & set(_MLP))}


def complete_biases(state_dict: StateDict, config: Config, flags: Dict[str, bool]) -> StateDict:
    """Zero biases for every linear of a group whose flag is on but that has none: HF's flags give all four
    attention (or all three MLP) linears of every layer a bias."""
    out = dict(state_dict)
    for i in range(config.n_layer):
        for flag, parent, leaves in (("attention_bias", "attn", _ATTENTION), ("mlp_bias", "mlp", _MLP)):
            if not flags[flag]:
                continue
            for leaf in leaves:
                key = f"transformer.h.{i}.{parent}.{leaf}"
                if f"{key}.bias" not in out:
                    weight = out[f"{key}.weight"]
                    out[f"{key}.bias"] = torch.zeros(weight.shape[0], dtype=weight.dtype)
    return out


def hf_config(config: Config, dtype: torch.dtype, *, attention_bias: bool = False, mlp_bias: bool = False,
              tie_word_embeddings: Optional[bool] = None, bos_token_id: Optional[int] = 1,
              eos_token_id: Optional[int] = 2) -> Dict[str, Any]:
    """``config.json`` of a ``LlamaForCausalLM`` with the shape of ``config``.

    ``vocab_size`` is the embedding's row count (``padded_vocab_size``): HF's logits then have that many columns,
    ours are cut to ``vocab_size``.
    """
    from lit_adapter.convert.hf import hf_config_from_lit

    tie = config.tie_embeddings if tie_word_embeddings is None else tie_word_embeddings
    if not config.causal:
        raise UserError("exporting an encoder (RoBERTa, BERT) to HF is not implemented: its run's tensors and head "
                        "are in final/ (a full fine-tuning's final/ is a lit-adapter checkpoint)")
    if is_gpt2(config):
        return hf_config_gpt2(config, _DTYPE_NAMES[dtype], bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                              tie_word_embeddings=tie)
    if config.norm_class != "RMSNorm" or config.mlp_class != "LLaMAMLP" or config.position_embedding != "rope" \
            or config.bias or config.lm_head_bias:
        raise UserError("this model mixes LLaMA and GPT-2 parts (norm_class, mlp_class, position_embedding, bias): "
                        "neither LlamaForCausalLM nor GPT2LMHeadModel holds it")
    # the scaled rotary frequencies as HF reads them (every type we implement is one of HF's): the fields of
    # hf_config_from_lit, and max_position_embeddings as HF's scaling code expects it
    hf_rope = hf_config_from_lit(config)
    rope_parameters = dict(hf_rope.get("rope_scaling") or {"rope_type": "default"}, rope_theta=config.rope_base)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.padded_vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_query_groups,
        "head_dim": config.head_size,
        "hidden_act": "silu",
        "max_position_embeddings": hf_rope["max_position_embeddings"],
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_base,
        "rope_scaling": hf_rope.get("rope_scaling"),
        "rope_parameters": rope_parameters,
        "attention_bias": attention_bias,
        "attention_dropout": 0.0,
        "mlp_bias": mlp_bias,
        "tie_word_embeddings": tie,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": None,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "torch_dtype": _DTYPE_NAMES[dtype],
        "dtype": _DTYPE_NAMES[dtype],
    }


def plan_shards(tensors: Dict[str, torch.Tensor], max_bytes: int) -> List[List[str]]:
    """Tensor names in order, cut into shards of at most ``max_bytes`` (a bigger tensor gets a shard alone)."""
    shards: List[List[str]] = [[]]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def write_weights(out_dir: Path, tensors: Dict[str, torch.Tensor], max_shard_size: Union[int, str]) -> List[str]:
    """``model.safetensors``, or shards and ``model.safetensors.index.json``; returns the file names written."""
    from safetensors.torch import save_file

    shards = plan_shards(tensors, parse_shard_size(max_shard_size))
    # transformers refuses safetensors files whose metadata does not say they hold PyTorch tensors
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file({k: tensors[k].contiguous() for k in shards[0]}, str(out_dir / "model.safetensors"), metadata)
        return ["model.safetensors"]
    files, weight_map = [], {}
    for i, names in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: tensors[k].contiguous() for k in names}, str(out_dir / file), metadata)
        weight_map.update({k: file for k in names})
        files.append(file)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return files + ["model.safetensors.index.json"]


def hf_tensors(state_dict: StateDict, dtype: torch.dtype, tie_word_embeddings: bool) -> Dict[str, torch.Tensor]:
    """``state_dict`` (our names) under HF names in ``dtype``, as separate contiguous tensors; a tied head is
    stored once, as the embedding (as ``save_pretrained`` does)."""
    out = {}
    seen = set()
    for name, tensor in state_dict.items():
        if name == "lm_head.weight" and tie_word_embeddings:
            continue
        tensor = tensor.detach().to("cpu", dtype)
        if tensor.data_ptr() in seen:  # safetensors refuses two names on one storage
            tensor = tensor.clone()
        seen.add(tensor.data_ptr())
        out[hf_name(name)] = tensor.contiguous()
    if not tie_word_embeddings and "lm_head.weight" not in out:
        out["lm_head.weight"] = out["model.embed_tokens.weight"].clone()
    return out


def write_hf_folder(out_dir: Path, config: Config, state_dict: StateDict, tokenizer_model: Optional[bytes], *,
                    dtype: torch.dtype, tokenizer_dir: Optional[Path] = None,
                    max_shard_size: Union[int, str] = DEFAULT_SHARD_SIZE,
                    tie_word_embeddings: Optional[bool] = None, bos_token_id: Optional[int] = 1,
                    eos_token_id: Optional[int] = 2) -> List[str]:
    """Writes the whole HF folder for ``state_dict`` (our names, optionally with biases) into ``out_dir``; the
    tokenizer is ``tokenizer_model`` (SentencePiece bytes) or, when that is None, the BPE files of
    ``tokenizer_dir``."""
    from lit_adapter.convert.hf_tokenizer import write_tokenizer_files
    from lit_adapter.data.tokenizer import tokenizer_files

    tie = config.tie_embeddings if tie_word_embeddings is None else tie_word_embeddings
    gpt2 = is_gpt2(config)
    flags = {} if gpt2 else bias_flags(state_dict)  # GPT-2's linears all have biases already
    if not gpt2:
        state_dict = complete_biases(state_dict, config, flags)
    cfg = hf_config(config, dtype, tie_word_embeddings=tie, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                    **flags)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    generation = {k: v for k, v in (("bos_token_id", bos_token_id), ("eos_token_id", eos_token_id)) if v is not None}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    files = ["config.json", "generation_config.json"]
    if gpt2:
        if not tie and "lm_head.weight" not in state_dict:
            state_dict = dict(state_dict, **{"lm_head.weight": state_dict["transformer.wte.weight"]})
        tensors = {k: v.detach().to("cpu", dtype).clone() for k, v in lit_to_hf_gpt2(state_dict, config).items()
                   if not (k == "lm_head.weight" and tie)}
    else:
        tensors = hf_tensors(state_dict, dtype, tie)
    files += write_weights(out_dir, tensors, max_shard_size)
    if tokenizer_model is not None:
        files += write_tokenizer_files(out_dir, tokenizer_model, config.block_size)
    else:
        if tokenizer_dir is None or not tokenizer_files(tokenizer_dir):
            raise UserError(f"{tokenizer_dir} has no tokenizer files to copy into the HF folder")
        for file in tokenizer_files(tokenizer_dir):
            shutil.copyfile(file, out_dir / file.name)
            files.append(file.name)
    return files


def check_target(target: Path, overwrite: bool, sources: Sequence[Optional[Path]] = ()) -> None:
    """Refuses a ``target`` that is a file, is a non-empty folder (unless ``overwrite``), or would replace one
    of ``sources`` (the folders being read), before any work is done."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise UserError(f"{target} exists and is not a folder")
    resolved = target.resolve()
    for source in sources:
        if source is not None and (resolved == Path(source).resolve() or resolved in Path(source).resolve().parents):
            raise UserError(f"the output folder {target} would replace {source}, which this export reads")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise UserError(f"{target} exists and is not empty; pass --overwrite true to replace it")


def replace_folder(target: Path, write: Callable[[Path], Any]) -> Any:
    """Calls ``write(tmp)`` on a fresh folder beside ``target`` and then puts it in ``target``'s place, so an
    interrupted export leaves either the old folder or the new one, never a mix."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.export-tmp")
    old = target.with_name(f".{target.name}.export-old")
    for leftover in (tmp, old):
        if leftover.exists():
            shutil.rmtree(leftover)
    tmp.mkdir(parents=True)
    try:
        result = write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for path in tmp.rglob("*"):
        if path.is_file():  # safetensors writes 0600 files; give them the permissions open() would
            os.chmod(path, 0o666 & ~_UMASK)
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    if old.exists():
        shutil.rmtree(old)
    return result
