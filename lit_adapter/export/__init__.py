"""Exports that let a model trained here leave the project (``scripts/convert_to_hf.py``,
``scripts/export_peft.py``; ``docs/export.md`` says what is exact and what is refused).

* :func:`convert_to_hf`: a base checkpoint folder, or a fine-tuned run merged into its base
  (:mod:`lit_adapter.export.merge`), as an HF ``LlamaForCausalLM`` folder (:mod:`lit_adapter.convert.to_hf`).
* :func:`export_peft`: a run's LoRA, IA³ or LLaMA-Adapter v1 tensors as a PEFT adapter folder
  (:mod:`lit_adapter.export.peft_format`).

Both read the inputs first (:mod:`lit_adapter.export.source`), refuse what cannot be written exactly with one
:class:`~lit_adapter.errors.UserError` line before any output exists, say what the user should know as ``note:``
lines on stderr, and write into a temporary folder that replaces the target only when complete.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable, List, Optional, Union

from lit_adapter.convert import parse_dtype
from lit_adapter.convert.to_hf import DEFAULT_SHARD_SIZE, check_target, parse_shard_size, replace_folder, \
    write_hf_folder
from lit_adapter.errors import UserError
from lit_adapter.export.merge import merge
from lit_adapter.export.peft_format import PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE, peft_adapter
from lit_adapter.export.source import Source, load_source

Note = Callable[[str], None]


def print_note(text: str) -> None:
    print(f"note: {text}", file=sys.stderr)


def _refuse_sparse(source: Source, what: str) -> None:
    if source.spec is not None and source.spec.attention.pattern != "dense":
        raise UserError(f"{what} {source.label}: it was trained with {source.spec.attention.pattern} sparse "
                        "attention, and LlamaForCausalLM attends densely (its outputs would differ)")


def _quantized_note(source: Source, note: Note, peft: bool) -> None:
    mode = source.spec.quantize if source.spec is not None else None
    if mode is None:
        return
    if peft:
        note(f"{source.adapter_dir} was trained against a {mode}-quantized base: PEFT applies it to whatever base "
             "it is loaded on; load that base quantized the same way (transformers' BitsAndBytesConfig) to match "
             "training")
    else:
        note(f"{source.adapter_dir} was trained against a {mode}-quantized base; it is merged exactly into the "
             "full-precision base weights, which differ slightly from the quantized ones it learned to correct")


def convert_to_hf(
    output_dir: Path,
    checkpoint_dir: Optional[Path] = None,
    adapter_dir: Optional[Path] = None,
    merge_adapter: bool = False,
    dtype: Optional[str] = None,
    max_shard_size: Union[int, str] = DEFAULT_SHARD_SIZE,
    overwrite: bool = False,
    quantize: Optional[str] = None,
    note: Note = print_note,
) -> List[str]:
    """Writes the HF ``LlamaForCausalLM`` folder of a base checkpoint, or of a run merged into its base; returns
    the names of the files written."""
    if quantize is not None:
        raise UserError(f"--quantize {quantize}: a quantized HF folder is not written here; the export is full "
                        "precision (--dtype) and transformers quantizes it when loading (BitsAndBytesConfig)")
    if adapter_dir is not None and not merge_adapter:
        raise UserError("--adapter_dir needs --merge true: an HF folder holds one set of weights (for an unmerged "
                        "LoRA, IA³ or LLaMA-Adapter, scripts/export_peft.py writes a PEFT adapter)")
    if merge_adapter and adapter_dir is None:
        raise UserError("--merge true needs --adapter_dir (a fine-tuned run's final/ folder)")
    out_dtype = parse_dtype(dtype)
    parse_shard_size(max_shard_size)  # a bad size is refused before the work
    source = load_source(checkpoint_dir, adapter_dir)
    check_target(output_dir, overwrite, sources=[source.base_dir, source.adapter_dir])
    if source.spec is not None and source.spec.definition.final_is_checkpoint and checkpoint_dir is not None:
        note(f"--checkpoint_dir is not used: {adapter_dir} is a whole checkpoint ({source.label} fine-tuning)")
    _refuse_sparse(source, "cannot merge")
    tokenizer, tokenizer_model = source.tokenizer()
    merged = merge(source, out_dtype)
    _quantized_note(source, note, peft=False)
    for text in merged.notes:
        note(text)
    return replace_folder(Path(output_dir), lambda tmp: write_hf_folder(
        tmp, source.config, merged.state_dict, tokenizer_model, tokenizer_dir=source.base_dir, dtype=merged.dtype,
        max_shard_size=max_shard_size,
        tie_word_embeddings=merged.tie_word_embeddings,
        bos_token_id=tokenizer.bos_id if tokenizer.bos_id >= 0 else None,
        eos_token_id=tokenizer.eos_id if tokenizer.eos_id >= 0 else None))


def export_peft(
    adapter_dir: Path,
    output_dir: Path,
    checkpoint_dir: Optional[Path] = None,
    base_model_name_or_path: Optional[str] = None,
    overwrite: bool = False,
    note: Note = print_note,
) -> List[str]:
    """Writes a run's adapter as a PEFT adapter folder; returns the names of the files written."""
    from safetensors.torch import save_file

    source = load_source(checkpoint_dir, adapter_dir, need_base=False)
    check_target(output_dir, overwrite, sources=[source.base_dir, source.adapter_dir])
    _refuse_sparse(source, "PEFT cannot represent")
    config, tensors = peft_adapter(source, base_model_name_or_path)
    _quantized_note(source, note, peft=True)
    if base_model_name_or_path is None:
        note("base_model_name_or_path is empty: PeftModel.from_pretrained(model, folder) does not need it, but "
             "AutoPeftModelForCausalLM does; pass --base_model_name_or_path (the hub id or folder of the base "
             "written by scripts/convert_to_hf.py)")

    def write(tmp: Path) -> List[str]:
        (tmp / PEFT_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(tmp / PEFT_WEIGHTS_FILE), {"format": "pt"})
        return [PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE]

    return replace_folder(Path(output_dir), write)
