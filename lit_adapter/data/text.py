"""Plain text for language-model fine-tuning: documents packed into fixed-length sequences in the prepared format.

Long-context fine-tuning (LongLoRA, Chen et al. 2023) trains on long text, not instructions. :func:`prepare_text`
reads documents (C4-style ``.json``/``.jsonl``, optionally gzipped, with a ``text`` field; or ``.txt`` files, one
document each), splits them by document into training and validation (seeded, so no document is in both),
tokenizes each as ``BOS + text + EOS``, joins each split's documents into one token stream and cuts it into
sequences of exactly ``seq_length`` tokens (the incomplete tail is dropped and counted). Every position is a target
(``labels == input_ids``; the loss shifts them), so the output is the ``train.pt`` / ``val.pt`` / ``metadata.json``
folder of :mod:`lit_adapter.data.instructions`, which the training loop reads unchanged.
"""

from __future__ import annotations

import gzip
import json
import random
import zlib
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from lit_adapter.data.instructions import FORMAT_VERSION, IGNORE_INDEX, METADATA_FILE, SPLIT_FILES, Example, write_atomically
from lit_adapter.errors import UserError
from lit_adapter.data.tokenizer import Tokenizer

PathLike = Union[str, Path]


def read_documents(sources: Sequence[PathLike], max_documents: Optional[int] = None) -> List[str]:
    """The non-empty documents of ``sources`` in order: JSON lines with ``text`` (``.json``/``.jsonl``, ``.gz`` too)
    or ``.txt`` files, one document per file."""
    documents: List[str] = []
    for source in sources:
        path = Path(source)
        if not path.is_file():
            raise UserError(f"text source not found: {path}")
        name = path.name[:-3] if path.name.endswith(".gz") else path.name
        opener = gzip.open if path.name.endswith(".gz") else open
        try:
            with opener(path, "rt", encoding="utf-8") as f:
                if name.endswith(".txt"):
                    documents.append(f.read())
                elif name.endswith((".json", ".jsonl")):
                    for number, line in enumerate(f, 1):
                        if line.strip():
                            try:
                                record = json.loads(line)
                            except json.JSONDecodeError as err:
                                raise UserError(f"{path}, line {number}: invalid JSON ({err.msg})") from None
                            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                                raise UserError(f"{path}, line {number}: expected a JSON object with a \"text\" string")
                            documents.append(record["text"])
                        if max_documents is not None and len(documents) >= max_documents:
                            break
                else:
                    raise UserError(f"{path}: expected .txt, .json or .jsonl (optionally .gz) text")
        except (EOFError, zlib.error) as err:  # gzip's own words for a download cut short
            raise UserError(f"{path} is cut short or damaged ({type(err).__name__}: {err}) after {len(documents)} "
                            "documents; download or copy it again") from None
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"cannot read {path}: {type(err).__name__}: {err}") from None
        if max_documents is not None and len(documents) >= max_documents:
            break
    documents = [d for d in documents if d.strip()][:max_documents]
    if not documents:
        raise UserError(f"no text in {', '.join(map(str, sources))}")
    return documents


def pack(token_ids: Sequence[torch.Tensor], seq_length: int) -> Tuple[List[Example], int]:
    """The documents' tokens joined into one stream and cut into ``seq_length``-token examples; also the number of
    tokens left over at the end (dropped)."""
    stream = torch.cat(list(token_ids)) if token_ids else torch.zeros(0, dtype=torch.long)  # (total,)
    n = stream.numel() // seq_length
    rows = stream[: n * seq_length].view(n, seq_length)  # (n, seq_length)
    examples = [{"input_ids": row.clone(), "labels": row.clone()} for row in rows]
    return examples, stream.numel() - n * seq_length


def prepare_text(
    destination_path: PathLike,
    tokenizer_path: PathLike,
    sources: Sequence[PathLike],
    seq_length: int = 2048,
    val_documents: int = 50,
    max_documents: Optional[int] = None,
    seed: int = 42,
    log: Callable[[str], None] = print,
) -> Dict:
    """Writes packed ``train.pt``, ``val.pt`` and ``metadata.json`` into ``destination_path``; returns the metadata."""
    if seq_length < 2:
        raise UserError(f"seq_length must be at least 2 tokens, got {seq_length}")
    tokenizer = Tokenizer(tokenizer_path)
    documents = read_documents(sources, max_documents)
    if not 1 <= val_documents < len(documents):
        raise UserError(f"val_documents={val_documents} must be between 1 and the number of documents - 1 "
                        f"({len(documents) - 1})")
    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    held_out = set(order[:val_documents])
    splits = {"train": [d for i, d in enumerate(documents) if i not in held_out],
              "val": [d for i, d in enumerate(documents) if i in held_out]}
    examples, stats = {}, {}
    for name, docs in splits.items():
        ids = tokenizer.encode_batch(docs, bos=True, eos=True)
        examples[name], dropped = pack(ids, seq_length)
        tokens = sum(t.numel() for t in ids)
        stats[name] = {"documents": len(docs), "tokens": tokens, "sequences": len(examples[name]),
                       "tokens_dropped": dropped, "longest_document_tokens": max(t.numel() for t in ids)}
        if not examples[name]:
            raise UserError(f"the {name} split has {tokens} tokens, fewer than one sequence of {seq_length}; "
                            "use more documents or a shorter seq_length")
    log(f"packed {len(documents):,} documents into {len(examples['train']):,} training and "
        f"{len(examples['val']):,} validation sequences of {seq_length} tokens "
        f"({stats['train']['tokens'] + stats['val']['tokens']:,} tokens)")
    metadata = {
        "format_version": FORMAT_VERSION, "source": [str(s) for s in sources], "schema": "text", "template": None,
        "packing": "each split's documents as BOS + text + EOS, joined and cut into seq_length tokens; "
                   "the tail is dropped; labels = input_ids",
        "records_loaded": len(documents), "train_records": len(examples["train"]),
        "val_records": len(examples["val"]), "val_documents": val_documents, "seed": seed,
        "max_seq_length": seq_length, "mask_inputs": False, "ignore_index": IGNORE_INDEX, "splits": stats,
        "tokenizer": {"path": str(Path(tokenizer.path).resolve()), "vocab_size": tokenizer.vocab_size,
                      "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id},
    }
    write_atomically(Path(destination_path), examples["train"], examples["val"], metadata)
    log(f"wrote {', '.join(SPLIT_FILES)} and {METADATA_FILE} to {destination_path}")
    return metadata
