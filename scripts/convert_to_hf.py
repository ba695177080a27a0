"""Write a lit-adapter checkpoint, or a fine-tuned run merged into its base, as an HF transformers folder."""

from pathlib import Path
from typing import Literal, Optional

from lit_adapter.errors import run_cli
from lit_adapter.export import DEFAULT_SHARD_SIZE, convert_to_hf


def main(
    output_dir: Path,
    checkpoint_dir: Optional[Path] = None,
    adapter_dir: Optional[Path] = None,
    merge: bool = False,
    dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None,
    max_shard_size: str = DEFAULT_SHARD_SIZE,
    overwrite: bool = False,
    quantize: Optional[Literal["bnb.int8", "bnb.nf4", "bnb.nf4-dq", "bnb.fp4"]] = None,
) -> None:
    """Write an HF LlamaForCausalLM (or, for GPT-2, GPT2LMHeadModel) folder that transformers'
    AutoModelForCausalLM and AutoTokenizer load.

    Writes config.json, generation_config.json, model.safetensors (or shards with model.safetensors.index.json),
    tokenizer.model, tokenizer.json, tokenizer_config.json and special_tokens_map.json (a BPE tokenizer's files,
    GPT-2's or Llama 3's, are copied as they are; rope_scaling, e.g. Llama 3.1's llama3, is written to config.json). With --adapter_dir and
    --merge true, the run's LoRA, IA³, BitFit or Adapter v2 tensors (or a full fine-tune's weights) are folded
    into the base exactly; what LlamaForCausalLM cannot express (adaption prompts with non-zero gates, bottleneck
    adapters, a bias on the output head, sparse attention) is refused with one line. See docs/export.md.

    Args:
        output_dir: The HF folder to write; an existing non-empty folder is refused unless --overwrite true.
        checkpoint_dir: The converted base checkpoint (model_config.json, lit_model.safetensors, tokenizer.model).
            With --adapter_dir it defaults to the base recorded in the run's adapter_config.json.
        adapter_dir: A fine-tuned run's final/ (or best/) folder, merged into the base with --merge true.
        merge: Fold the run's tensors into the base weights (needed with --adapter_dir).
        dtype: The dtype of the written weights; by default the one the base weights are stored in.
        max_shard_size: The largest safetensors file (5GB, 500MB, 2GiB or bytes); a bigger model is sharded.
        overwrite: Replace output_dir when it exists and is not empty.
        quantize: Not supported (refused): the export is full precision; quantize when loading it.
    """
    files = convert_to_hf(output_dir, checkpoint_dir=checkpoint_dir, adapter_dir=adapter_dir, merge_adapter=merge,
                          dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite, quantize=quantize)
    print(f"wrote {output_dir}: {', '.join(files)}")


if __name__ == "__main__":
    from jsonargparse import CLI

    run_cli(CLI, main, as_positional=False)
