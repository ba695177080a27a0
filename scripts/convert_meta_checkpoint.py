"""Convert Meta's original LLaMA checkpoint (consolidated.*.pth + params.json) into a lit-adapter checkpoint."""

from pathlib import Path
from typing import Literal, Optional

from lit_adapter.convert import convert_meta_checkpoint
from lit_adapter.errors import run_cli


def main(
    checkpoint_dir: Path,
    output_dir: Path,
    model_name: Optional[str] = None,
    block_size: Optional[int] = None,
    dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None,
    tokenizer_path: Optional[Path] = None,
) -> None:
    """Convert Meta's original LLaMA weights into a lit-adapter checkpoint directory.

    Merges the tensor-parallel shards, permutes the q/k rows from Meta's interleaved rotary layout to ours and
    writes model_config.json, lit_model.safetensors and tokenizer.model.

    Args:
        checkpoint_dir: The Meta model folder (e.g. ``llama/7B``) holding params.json and consolidated.NN.pth.
        output_dir: Where to write the lit-adapter checkpoint directory.
        model_name: A known config name (e.g. 7B, Llama-2-7b); the weights are checked against it and it gives the
            name and block_size. Without it the config comes from params.json alone.
        block_size: Context length to record (default: from --model_name, else 2048).
        dtype: Cast the weights to this dtype; by default they keep the dtype they are stored in.
        tokenizer_path: The SentencePiece tokenizer.model, if it is neither in ``checkpoint_dir`` nor its parent.
    """
    config = convert_meta_checkpoint(
        checkpoint_dir, output_dir, model_name=model_name, block_size=block_size, dtype=dtype,
        tokenizer_path=tokenizer_path,
    )
    print(f"wrote {output_dir} ({config.n_layer} layers, n_embd={config.n_embd}, vocab={config.vocab_size})")


if __name__ == "__main__":
    from jsonargparse import CLI

    run_cli(CLI, main, as_positional=False)
