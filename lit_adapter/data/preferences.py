"""Preference pairs for DPO: prompt/chosen/rejected records from JSON-lines, JSON arrays or a Hugging Face dataset.

A record is ``{"prompt": str, "chosen": str, "rejected": str}`` (extra fields are ignored). With ``template:
alpaca`` the prompt is wrapped as the instruction of the Alpaca template the SFT data uses; ``plain`` takes it as
it is. Each response is tokenized as ``BOS + prompt + response + EOS`` in one piece (as :mod:`lit_adapter.data.instructions`
does for SFT, so a response gets the tokens it gets when the model continues the prompt) and its labels mask the
prompt. A record missing a field, or with a non-string one (chat-format lists of messages), is one
:class:`UserError` line naming the file and line.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Literal, Optional, Tuple

import torch

from lit_adapter.errors import UserError

FIELDS = ("prompt", "chosen", "rejected")


@dataclass
class PreferenceData:
    """Where the preference pairs come from."""

    source: str = "prefs.jsonl"
    """A JSON-lines or JSON-array file of prompt/chosen/rejected records, or a Hugging Face dataset id."""
    template: Literal["plain", "alpaca"] = "plain"
    """plain: the prompt as it is; alpaca: the prompt as the instruction of the Alpaca template (as in SFT)."""
    val_size: int = 100
    """Pairs held out (seeded) for validation, when the source has no validation split."""
    val_split: str = "test"
    """The validation split of a hub dataset (used when it exists)."""
    train_split: str = "train"
    hub_config: Optional[str] = None
    max_seq_length: Optional[int] = None
    """Cut longer sequences to this many tokens; a pair whose response is cut away entirely is dropped."""
    max_pairs: Optional[int] = None
    """Use the first N training pairs (after the seeded shuffle)."""
    seed: int = 42

    def __post_init__(self) -> None:
        if self.val_size < 1:
            raise UserError(f"data.val_size must be >= 1, got {self.val_size}")


def _record(row: Any, where: str) -> Dict[str, str]:
    if not isinstance(row, dict):
        raise UserError(f"{where}: a preference record must be an object with prompt, chosen and rejected")
    missing = [f for f in FIELDS if f not in row or row[f] is None]
    if missing:
        raise UserError(f"{where}: the preference record has no {' and no '.join(repr(m) for m in missing)}")
    wrong = [f for f in FIELDS if not isinstance(row[f], str)]
    if wrong:
        raise UserError(f"{where}: {', '.join(wrong)} must be text (chat-format message lists are not supported)")
    empty = [f for f in FIELDS if not row[f].strip()]
    if empty:
        raise UserError(f"{where}: the preference record's {' and '.join(empty)} is empty; a pair needs a prompt "
                        "and two responses")
    if row["chosen"] == row["rejected"]:
        raise UserError(f"{where}: chosen and rejected are the same text; the pair prefers nothing (drop it)")
    return {f: row[f] for f in FIELDS}


def _file_rows(path: Path) -> Iterator[Tuple[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read {path}: {err}") from None
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: invalid JSON ({err.msg} at line {err.lineno})") from None
        yield from ((f"{path}, record {i}", row) for i, row in enumerate(rows, start=1))
        return
    for i, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                yield f"{path}, line {i}", json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}, line {i}: invalid JSON ({err.msg})") from None


def load_pairs(data: PreferenceData) -> Tuple[List[Dict[str, str]], List[Dict[str, str]], str]:
    """``(train, val, source description)`` as records."""
    path = Path(data.source).expanduser()
    val: Optional[List[Dict[str, str]]] = None
    if path.is_file():
        records = [_record(row, where) for where, row in _file_rows(path)]
        described = str(path)
    elif "/" in data.source and not path.exists():
        try:
            import datasets

            loaded = datasets.load_dataset(data.source, data.hub_config)
        except Exception as err:  # offline, unknown id: one line
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise UserError(f"cannot load {data.source!r} from the Hugging Face hub ({first}); offline? pass a "
                            "local JSON-lines file as --data.source") from None
        if data.train_split not in loaded:
            raise UserError(f"{data.source} has no split {data.train_split!r} (it has {', '.join(loaded)})")
        rows = lambda split: [_record(dict(r), f"{data.source} {split} record {i}")  # noqa: E731
                              for i, r in enumerate(loaded[split])]
        records = rows(data.train_split)
        val = rows(data.val_split) if data.val_split in loaded else None
        described = f"hub: {data.source}"
    else:
        raise UserError(f"data.source {data.source!r}: no such file (and not a Hugging Face dataset id)")
    rng = random.Random(data.seed)
    records = list(records)
    rng.shuffle(records)
    if val is None:
        if len(records) <= data.val_size:
            raise UserError(f"{described}: {len(records)} pairs leave none for training after {data.val_size} "
                            "validation pairs (data.val_size)")
        val, records = records[: data.val_size], records[data.val_size:]
    if data.max_pairs is not None:
        records = records[: data.max_pairs]
    return records, val, described


def tokenize_pair(tokenizer, record: Dict[str, str], template: str) -> Dict[str, torch.Tensor]:
    """``input_ids``/``labels`` of prompt + chosen and ``rejected_input_ids``/``rejected_labels`` (1-D, prompt masked)."""
    from lit_adapter.data.prompts import InstructionRecord, generate_prompt

    prompt = record["prompt"] if template == "plain" else generate_prompt(InstructionRecord(record["prompt"]))
    n_prompt = len(tokenizer.encode(prompt, bos=True))
    out = {}
    for key, prefix in (("chosen", ""), ("rejected", "rejected_")):
        ids = tokenizer.encode(prompt + record[key], bos=True, eos=True)
        labels = ids.clone()
        labels[:n_prompt] = -100
        out[f"{prefix}input_ids"], out[f"{prefix}labels"] = ids, labels
    return out
