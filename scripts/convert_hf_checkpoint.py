"""Convert an HF transformers LLaMA (1/2/3), GPT-2 or RoBERTa/BERT checkpoint into a lit-adapter checkpoint folder."""

from pathlib import Path
from typing import Literal, Optional

from lit_adapter.convert import convert_hf_checkpoint
from lit_adapter.errors import run_cli


def main(
    checkpoint_dir: Path,
    output_dir: Path,
    dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None,
    tokenizer_path: Optional[Path] = None,
) -> None:
    """Convert an HF transformers LlamaForCausalLM, GPT2LMHeadModel or RoBERTa/BERT (bare or ForSequenceClassification,
    its head kept) directory into a lit-adapter checkpoint.

    Reads config.json (its model_type picks the family: llama, gpt2, roberta or bert; another is refused), the
    weights (*.safetensors or pytorch_model*.bin, sharded or not) and the tokenizer (tokenizer.model, else
    tokenizer.json or vocab.json + merges.txt); writes model_config.json, lit_model.safetensors and the tokenizer
    files. Example: python scripts/convert_hf_checkpoint.py --checkpoint_dir gpt2-medium/ --output_dir
    checkpoints/gpt2-medium

    Args:
        checkpoint_dir: The HF model directory (as written by ``save_pretrained`` or downloaded from the Hub).
        output_dir: Where to write the lit-adapter checkpoint directory.
        dtype: Cast the weights to this dtype; by default they keep the dtype they are stored in.
        tokenizer_path: The tokenizer file (tokenizer.model, tokenizer.json or vocab.json), if it is not in
            ``checkpoint_dir``.
    """
    config = convert_hf_checkpoint(checkpoint_dir, output_dir, dtype=dtype, tokenizer_path=tokenizer_path)
    print(f"wrote {output_dir} ({config.n_layer} layers, n_embd={config.n_embd}, vocab={config.vocab_size})")


if __name__ == "__main__":
    from jsonargparse import CLI

    run_cli(CLI, main, as_positional=False)
