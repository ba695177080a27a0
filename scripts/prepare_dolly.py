"""Prepares databricks-dolly-15k (or Dolly-format JSON/JSONL files) for instruction fine-tuning."""

from pathlib import Path
from typing import List, Literal, Optional, Union

from lit_adapter.data.instructions import prepare
from lit_adapter.errors import UserError, run_cli


def main(
    checkpoint_dir: Optional[Path] = None,
    tokenizer_path: Optional[Path] = None,
    destination_path: Path = Path("data/dolly"),
    source: Union[str, List[str]] = "databricks/databricks-dolly-15k",
    val_size: int = 2000,
    seed: int = 42,
    mask_inputs: bool = True,
    max_seq_length: Optional[int] = None,
    truncation: Literal["context", "response", "drop"] = "context",
    skip_invalid: bool = False,
    max_records: Optional[int] = None,
) -> None:
    """Tokenizes Dolly records with the Alpaca prompt template into train.pt, val.pt and metadata.json.

    Each record (instruction, context, response) becomes BOS + prompt + response + EOS; the context is the
    prompt's "### Input:" section when it is not empty.

    Args:
        checkpoint_dir: Checkpoint folder whose tokenizer.model to use (or give --tokenizer_path).
        tokenizer_path: A SentencePiece tokenizer.model file (or give --checkpoint_dir).
        destination_path: Folder to write train.pt, val.pt and metadata.json into.
        source: A Hugging Face Hub dataset id (needs internet), or local data: a .jsonl file, a JSON-array .json
            file, several files ([a.json,b.json]) or a folder of them. Files are read in sorted path order.
        val_size: Number of records drawn at random for the validation split.
        seed: Seed of the train/validation split (and of the --max_records subset).
        mask_inputs: Leave the prompt tokens out of the loss (label -100), training on the response only.
        max_seq_length: Tokens per example; default: the model's context length (block_size in the checkpoint's
            model_config.json). Longer examples are handled by --truncation; what it did is counted, printed and
            recorded in metadata.json.
        truncation: What to do with an example longer than max_seq_length. context: shorten the input ("### Input:",
            Dolly's context) until the whole response and EOS fit, and only then cut the response's tail; a record
            whose instruction alone leaves no room for a response is dropped. response: cut the example's tail
            (the response goes first, so a long input can leave no response at all). drop: skip the example.
        skip_invalid: Skip (and count) records that are malformed or miss a field instead of stopping.
        max_records: Use only this many randomly chosen records (for quick runs).
    """
    tokenizer = _tokenizer_source(checkpoint_dir, tokenizer_path)
    prepare(destination_path, tokenizer, source=source, schema="dolly", val_size=val_size, seed=seed,
            mask_inputs=mask_inputs, max_seq_length=max_seq_length, truncation=truncation,
            skip_invalid=skip_invalid,
            max_records=max_records)


def _tokenizer_source(checkpoint_dir: Optional[Path], tokenizer_path: Optional[Path]) -> Path:
    if (checkpoint_dir is None) == (tokenizer_path is None):
        raise UserError("give exactly one of --checkpoint_dir and --tokenizer_path")
    return checkpoint_dir if checkpoint_dir is not None else tokenizer_path


if __name__ == "__main__":
    from jsonargparse import CLI

    run_cli(CLI, main, as_positional=False)
