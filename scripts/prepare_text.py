"""Packs plain text (C4-style JSON lines or .txt files) into fixed-length sequences for language-model fine-tuning."""

import sys
from pathlib import Path
from typing import List, Optional, Union

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lit_adapter.errors import run_cli  # noqa: E402


def main(
    checkpoint_dir: Path,
    source: Union[str, List[str]],
    destination_path: Path = Path("data/text"),
    seq_length: int = 2048,
    val_documents: int = 50,
    max_documents: Optional[int] = None,
    seed: int = 42,
) -> None:
    """Tokenizes documents as BOS + text + EOS, joins them and cuts them into --seq_length-token sequences
    (train.pt, val.pt, metadata.json; labels = input_ids), holding out --val_documents whole documents.

    Args:
        checkpoint_dir: Checkpoint folder whose tokenizer.model to use.
        source: Text files: .json/.jsonl lines with a "text" field (gzipped too, e.g. the C4 shard in
            ../shared/data/c4) or .txt files (one document each); several as [a,b].
        destination_path: Folder to write train.pt, val.pt and metadata.json into.
        seq_length: Tokens per sequence (the training context; past the model's window needs --model.rope_scaling).
        val_documents: Documents drawn at random (seeded) for the validation split.
        max_documents: Read only the first N documents.
        seed: Seed of the document split.
    """
    from lit_adapter.data.text import prepare_text

    sources = [source] if isinstance(source, (str, Path)) else list(source)
    prepare_text(destination_path, checkpoint_dir, sources, seq_length=seq_length, val_documents=val_documents,
                 max_documents=max_documents, seed=seed)


if __name__ == "__main__":
    from jsonargparse import CLI

    run_cli(CLI, main, as_positional=False)
