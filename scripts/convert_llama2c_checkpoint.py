"""Convert a karpathy/llama2.c model (.bin export or .pt training checkpoint) into a lit-adapter checkpoint."""

from pathlib import Path
from typing import Literal, Optional

from lit_adapter.convert import convert_llama2c_checkpoint
from lit_adapter.errors import run_cli


def main(
    checkpoint_path: Path,
    output_dir: Path,
    tokenizer_path: Optional[Path] = None,
    dtype: Literal["float32", "bfloat16", "float16"] = "float32",
) -> None:
    """Convert a karpathy/llama2.c model into a lit-adapter checkpoint directory.

    Reads a legacy (v0) or version-1 fp32 ``.bin`` export, or a ``.pt`` training checkpoint
    (``{"model_args": ..., "model": state_dict}``), permutes the q/k rows from llama2.c's interleaved rotary layout
    to ours and writes model_config.json, lit_model.safetensors and tokenizer.model.

    Args:
        checkpoint_path: The llama2.c ``.bin`` or ``.pt`` file.
        output_dir: Where to write the lit-adapter checkpoint directory.
        tokenizer_path: A llama2.c vocabulary (tokenizer.bin, tok512.bin; converted to a SentencePiece model) or a
            SentencePiece ``.model`` (copied). Default: tokenizer.model, tokenizer.bin or tok<vocab_size>.bin beside
            the checkpoint.
        dtype: The dtype of the written weights.
    """
    config = convert_llama2c_checkpoint(checkpoint_path, output_dir, tokenizer_path=tokenizer_path, dtype=dtype)
    print(f"wrote {output_dir} ({config.n_layer} layers, n_embd={config.n_embd}, vocab={config.vocab_size})")


if __name__ == "__main__":
    from jsonargparse import CLI

    run_cli(CLI, main, as_positional=False)
