"""Prepares databricks-dolly-15k (or Dolly-format JSON/JSONL files) for instruction fine-tuning."""

from pathlib import Path
from typing import List, Optional, Union

from lit_adapter.data import prepare
from lit_adapter.errors import UserError, run_cli


def main(
    checkpoint_dir: Optional[Path] = None,
    tokenizer_path: Optional[Path] = None,
    destination_path: Path = Path("data/dolly"),
    source: Union[str, List[str]] = "databricks/databricks-dolly-15k",
    val_size: int = 2000,
    seed: int = 42,
    mask_inputs: bool = True,
    max_seq_length: int = 512,
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
        max_seq_length: Examples longer than this many tokens lose their tail; the cut is counted and reported.
        skip_invalid: Skip (and count) records that are malformed or miss a field instead of stopping.
        max_records: Use only this many randomly chosen records (for quick runs).
    """
    tokenizer = _tokenizer_source(checkpoint_dir, tokenizer_path)
    prepare(destination_path, tokenizer, source=source, schema="dolly", val_size=val_size, seed=seed,
            mask_inputs=mask_inputs, max_seq_length=max_seq_length, skip_invalid=skip_invalid,
            max_records=max_records)


def _tokenizer_source(checkpoint_dir: Optional[Path], tokenizer_path: Optional[Path]) -> Path:
    if (checkpoint_dir is None) == (tokenizer_path is None):
        raise UserError("give exactly one of --checkpoint_dir and --tokenizer_path")
    return checkpoint_dir if checkpoint_dir is not None else tokenizer_path


if __name__ == "__main__":
    from jsonargparse import CLI

    run_cli(CLI, main, as_positional=False)
