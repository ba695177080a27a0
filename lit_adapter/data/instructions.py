"""Instruction-tuning data: load Dolly-15k / Alpaca records, split, tokenize, cache and batch them.

The pipeline behind ``scripts/prepare_dolly.py`` and ``scripts/prepare_alpaca.py``:

1. :func:`load_records` reads a Hugging Face Hub dataset, local ``.jsonl`` / JSON-array ``.json`` files (or a folder
   of them; :mod:`lit_adapter.data.records` does the reading), or the built-in :func:`synthetic_instructions`, into
   :class:`InstructionRecord` objects. Malformed input is reported with the file and the line (JSONL) or record
   index (JSON array).
2. :func:`split_records` draws a seeded validation split.
3. :func:`tokenize_record` (:mod:`lit_adapter.data.truncation`) renders the Alpaca template (:mod:`lit_adapter.data.prompts`)
   and tokenizes ``BOS + prompt + response + EOS``. With ``mask_inputs`` the prompt positions get label ``-100``, so
   the loss only covers the response and EOS, as in Alpaca and LLaMA-Adapter. An example longer than
   ``max_seq_length`` (by default the model's ``block_size``) is shortened or dropped by the truncation policy:
   by default its input (Dolly's ``context``) is shortened so that the response fits.
4. :func:`prepare` writes ``train.pt`` / ``val.pt`` (lists of ``{"input_ids", "labels"}`` LongTensors and the
   record's ``"category"`` string, loadable with ``torch.load(weights_only=True)``) and ``metadata.json``.
   :func:`load_prepared` reads them back; folders prepared before categories were kept read as ``"unknown"``.

Labels are *not* shifted: ``labels[t]`` is the target for the logits at position ``t - 1`` (the loss shifts).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch.utils.data import Dataset

from lit_adapter.model.config import Config
from lit_adapter.errors import UserError
from lit_adapter.data.records import InvalidRecord, Source, iter_records, report_skipped, resolve_source, source_name
from lit_adapter.data.prompts import TEMPLATE_NAME, UNKNOWN_CATEGORY, InstructionRecord
from lit_adapter.data.synthetic import SYNTHETIC_DEFAULT_SIZE, synthetic_instructions
from lit_adapter.data.tokenizer import Tokenizer
from lit_adapter.data.truncation import (
    DEFAULT_TRUNCATION,
    IGNORE_INDEX,
    TRUNCATION_POLICIES,
    Example,
    check_policy,
    describe_truncation,
    min_seq_length,
    tokenize_record,
    tokenize_split,
    total_counts,
)

__all__ = [
    "DEFAULT_TRUNCATION", "IGNORE_INDEX", "InstructionRecord", "InstructionDataset", "TRUNCATION_POLICIES",
    "UNKNOWN_CATEGORY", "category_counts", "category_sample",
    "collate_instructions", "load_prepared", "load_records", "min_seq_length", "model_block_size", "prepare",
    "split_records", "synthetic_instructions", "tokenize_record",
]

SYNTHETIC = "synthetic"
FORMAT_VERSION = 1
SPLIT_FILES = ("train.pt", "val.pt")
METADATA_FILE = "metadata.json"

# Field names per schema: (instruction, input, output). The input field may be absent or null.
SCHEMAS: Dict[str, Tuple[str, str, str]] = {
    "dolly": ("instruction", "context", "response"),
    "alpaca": ("instruction", "input", "output"),
}



# ----------------------------------------------------------------------------------------------------------- loading


def load_records(
    source: Source,
    skip_invalid: bool = False,
    schema: str = "auto",
    on_skip: Optional[Callable[[str], None]] = None,
) -> Tuple[List[InstructionRecord], int]:
    """Reads instruction records and returns ``(records, n_skipped)``.

    ``source`` is ``"synthetic"``, a Hugging Face Hub dataset id (loaded with ``datasets.load_dataset(id,
    split="train")``), or local path(s): ``.jsonl`` files, JSON-array ``.json`` files, or folders of them. Files are
    read in sorted path order so the result does not depend on how they were listed. ``schema`` is ``"dolly"``
    (instruction/context/response), ``"alpaca"`` (instruction/input/output) or ``"auto"`` (per record).
    With ``skip_invalid`` a record that is malformed, not an object or misses a field is skipped and counted (its
    reason goes to ``on_skip``); broken JSON-array syntax and truncated files are errors either way.
    """
    if schema not in (*SCHEMAS, "auto"):
        raise UserError(f"unknown record schema {schema!r}; expected one of {', '.join([*SCHEMAS, 'auto'])}")
    if isinstance(source, str) and source == SYNTHETIC:
        return synthetic_instructions(SYNTHETIC_DEFAULT_SIZE), 0
    records: List[InstructionRecord] = []
    skipped = 0
    for where, obj in iter_records(source):
        try:
            if isinstance(obj, InvalidRecord):
                raise obj
            records.append(_to_record(obj, schema))
        except InvalidRecord as err:
            if not skip_invalid:
                hint = " (pass --skip_invalid true to skip invalid records)"
                raise UserError(f"{where}: {err}{hint}") from None
            skipped += 1
            if on_skip is not None:
                on_skip(f"{where}: {err}")
    return records, skipped


def _to_record(obj: Any, schema: str) -> InstructionRecord:
    if not isinstance(obj, dict):
        raise InvalidRecord(f"expected a JSON object with instruction fields, got {type(obj).__name__}")
    if schema == "auto":
        if "response" in obj:
            schema = "dolly"
        elif "output" in obj:
            schema = "alpaca"
        else:
            raise InvalidRecord("missing field 'response' (Dolly) or 'output' (Alpaca)")
    instruction_key, input_key, output_key = SCHEMAS[schema]
    values = []
    for key, required in ((instruction_key, True), (input_key, False), (output_key, True)):
        value = obj.get(key)
        if value is None:
            if required:
                raise InvalidRecord(f"missing field {key!r}" + (" (it is null)" if key in obj else ""))
            value = ""
        if not isinstance(value, str):
            raise InvalidRecord(f"field {key!r} must be a string, got {type(value).__name__}")
        if required and not value.strip():
            raise InvalidRecord(f"field {key!r} is empty")
        values.append(value)
    category = obj.get("category")  # Dolly's task; Alpaca-format records have none
    return InstructionRecord(*values, category=category.strip() if isinstance(category, str) else "")


# ------------------------------------------------------------------------------------------------------- splitting


def split_records(
    records: Sequence[InstructionRecord], val_size: int, seed: int, max_records: Optional[int] = None
) -> Tuple[List[InstructionRecord], List[InstructionRecord]]:
    """A seeded random ``(train, val)`` split with ``val_size`` validation records.

    With ``max_records`` only that many randomly chosen records are used (the first ``max_records`` of the same
    seeded permutation), which keeps a quick run representative of a dataset stored grouped by category.
    """
    n = len(records)
    if n == 0:
        raise UserError("there are no records to split")
    if max_records is not None:
        if max_records < 1:
            raise UserError(f"max_records must be at least 1, got {max_records}")
        n = min(n, max_records)
    if val_size < 1:
        raise UserError(f"val_size must be at least 1 (the validation split would be empty), got {val_size}")
    if val_size >= n:
        raise UserError(f"val_size {val_size} leaves no training records out of {n}; lower val_size")
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    return [records[i] for i in order[val_size:]], [records[i] for i in order[:val_size]]


# ------------------------------------------------------------------------------------------------------- preparing


def model_block_size(tokenizer_path: Union[str, Path]) -> Optional[int]:
    """The model's context length: ``block_size`` from ``model_config.json`` in the checkpoint folder
    ``tokenizer_path`` (or the folder of the tokenizer file ``tokenizer_path``); ``None`` when there is none."""
    path = Path(tokenizer_path)
    config_file = (path if path.is_dir() else path.parent) / "model_config.json"
    return Config.from_file(config_file).block_size if config_file.is_file() else None


def _resolve_max_seq_length(max_seq_length: Optional[int], block_size: Optional[int],
                            tokenizer_path: Union[str, Path]) -> Tuple[int, str]:
    """``max_seq_length``, or by default the model's ``block_size``; and where the number came from (for the log)."""
    if max_seq_length is not None:
        return max_seq_length, ""
    if block_size is None:
        path = Path(tokenizer_path)
        raise UserError(
            f"{path if path.is_dir() else path.parent} has no model_config.json to take the model's context length "
            "(block_size) from: pass the model's --checkpoint_dir, or --max_seq_length"
        )
    return block_size, " (the model's block_size)"


def prepare(
    destination_path: Union[str, Path],
    tokenizer_path: Union[str, Path],
    source: Source = "databricks/databricks-dolly-15k",
    schema: str = "auto",
    val_size: int = 2000,
    seed: int = 42,
    mask_inputs: bool = True,
    max_seq_length: Optional[int] = None,
    truncation: str = DEFAULT_TRUNCATION,
    skip_invalid: bool = False,
    max_records: Optional[int] = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> Dict[str, Any]:
    """Loads, splits and tokenizes instruction records and writes ``train.pt``, ``val.pt`` and ``metadata.json``
    into ``destination_path``; returns the metadata.

    ``tokenizer_path`` is a ``tokenizer.model`` file or a checkpoint folder holding one. ``source`` is
    ``"synthetic"`` (``max_records`` records of :func:`synthetic_instructions`, 5,000 by default), a Hub dataset id
    or local file(s)/folder(s); see :func:`load_records`. ``max_seq_length`` defaults to the model's ``block_size``
    (read from the checkpoint's ``model_config.json``); ``truncation`` is one of :data:`TRUNCATION_POLICIES` (see
    :mod:`lit_adapter.data.truncation`). The other arguments are those of the prepare scripts.
    """
    destination_path = Path(destination_path)
    if destination_path.exists() and not destination_path.is_dir():
        raise UserError(f"the destination {destination_path} exists and is not a folder")
    check_policy(truncation)
    block_size = model_block_size(tokenizer_path)
    max_seq_length, origin = _resolve_max_seq_length(max_seq_length, block_size, tokenizer_path)
    if max_seq_length < 1:
        raise UserError(f"max_seq_length must be a positive number of tokens, got {max_seq_length}")
    tokenizer = Tokenizer(tokenizer_path)
    minimum = min_seq_length(tokenizer)
    if max_seq_length < minimum:
        raise UserError(
            f"max_seq_length {max_seq_length} is too short for the {TEMPLATE_NAME} prompt template: BOS, the template "
            f"and one response token need at least {minimum} tokens with this tokenizer"
        )
    if block_size is not None and max_seq_length > block_size:
        # training caps sequences at block_size by cutting their tail, which would undo the policy chosen here
        log(f"warning: max_seq_length {max_seq_length} is longer than the model's block_size {block_size}; training "
            f"refuses examples longer than {block_size} tokens, so prepare with --max_seq_length {block_size}")

    skip_reasons: List[str] = []
    if isinstance(source, str) and source == SYNTHETIC:
        records, skipped = synthetic_instructions(max_records or SYNTHETIC_DEFAULT_SIZE, seed), 0
    else:
        records, skipped = load_records(source, skip_invalid=skip_invalid, schema=schema, on_skip=skip_reasons.append)
    report_skipped(log, skipped, skip_reasons)
    if not records:
        raise UserError(f"no valid records in {_describe_source(source)}")
    duplicates = len(records) - len(set(records))
    train, val = split_records(records, val_size, seed, max_records)
    subset = ""
    if max_records and max_records < len(records):
        subset = f", {len(train) + len(val):,} of them drawn at random (max_records)"
    log(f"loaded {len(records):,} records from {_summarize_source(source)}{subset}; split {len(train):,} for "
        f"training and {len(val):,} for validation (seed {seed})")

    splits = {}
    for name, split in (("train", train), ("val", val)):
        splits[name] = tokenize_split(name, split, tokenizer, max_seq_length, mask_inputs, truncation, progress)
        if not splits[name][0]:
            hint = "use --truncation context or raise --max_seq_length" if truncation == "drop" else (
                "raise --max_seq_length")
            raise UserError(f"the truncation policy {truncation!r} dropped all {len(split):,} {name} examples at "
                            f"max_seq_length {max_seq_length}: {hint}")
    (train_examples, train_stats), (val_examples, val_stats) = splits["train"], splits["val"]
    longest_split, longest = max((("train", train_stats), ("val", val_stats)), key=lambda s: s[1]["longest_tokens"])
    counts = total_counts(train_stats, val_stats)
    log(describe_truncation(counts, truncation, max_seq_length, len(train) + len(val), longest["longest_tokens"],
                            origin))
    kept = f"using {len(train_examples):,} for training and {len(val_examples):,} for validation"
    lost = len(train) + len(val) - len(train_examples) - len(val_examples)
    log(kept + (f" ({lost:,} dropped by the truncation policy {truncation!r})" if lost else ""))
    if counts["examples_without_target"]:
        log(f"warning: {counts['examples_without_target']:,} examples have no target token left (their whole "
            "response was cut) and give no training signal; use --truncation context or raise --max_seq_length")

    metadata = {
        "format_version": FORMAT_VERSION,
        "source": _describe_source(source),
        "schema": schema,
        "template": TEMPLATE_NAME,
        "records_loaded": len(records),
        "records_skipped_invalid": skipped,
        "duplicate_records": duplicates,
        "max_records": max_records,
        "train_records": len(train_examples),
        "val_records": len(val_examples),
        "val_size": val_size,
        "seed": seed,
        "max_seq_length": max_seq_length,
        "model_block_size": block_size,
        "mask_inputs": mask_inputs,
        "ignore_index": IGNORE_INDEX,
        "truncation": {"policy": truncation, **counts},
        "longest_example": {"split": longest_split, "index": longest["longest_index"],
                            "tokens": longest["longest_tokens"]},
        "splits": {"train": train_stats, "val": val_stats},
        "categories": {"train": category_counts(train_examples), "val": category_counts(val_examples)},
        "tokenizer": {"path": str(Path(tokenizer_path).resolve()), "vocab_size": tokenizer.vocab_size,
                      "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id},
    }
    write_atomically(destination_path, train_examples, val_examples, metadata)
    log(f"wrote {', '.join(SPLIT_FILES)} and {METADATA_FILE} to {destination_path}")
    return metadata


def _describe_source(source: Source) -> Union[str, List[str]]:
    if isinstance(source, str) and source == SYNTHETIC:
        return SYNTHETIC
    files = resolve_source(source)
    if files is None:
        return source_name(source)
    return [str(p) for p in files] if len(files) > 1 else str(files[0])


def _summarize_source(source: Source) -> str:
    described = _describe_source(source)
    if isinstance(described, str):
        return described
    return f"{len(described)} files in {os.path.commonpath(described)}"


def write_atomically(destination: Path, train: List[Example], val: List[Example], metadata: Dict[str, Any]) -> None:
    # Each file is written under a temporary name and renamed into place, so an interrupted run never leaves a
    # half-written file; metadata.json goes last and its counts let load_prepared spot a mix of two runs.
    destination.mkdir(parents=True, exist_ok=True)
    temporary: List[Tuple[Path, Path]] = []
    try:
        for name, payload in (("train.pt", train), ("val.pt", val), (METADATA_FILE, metadata)):
            final = destination / name
            tmp = destination / f".{name}.{os.getpid()}.tmp"
            temporary.append((tmp, final))
            if name == METADATA_FILE:
                tmp.write_text(json.dumps(payload, indent=2) + "\n")
            else:
                torch.save(payload, tmp)
        for tmp, final in temporary:
            os.replace(tmp, final)
    finally:
        for tmp, _ in temporary:
            tmp.unlink(missing_ok=True)


def load_prepared(destination_path: Union[str, Path]) -> Tuple[List[Example], List[Example], Dict[str, Any]]:
    """Reads what :func:`prepare` wrote: ``(train_examples, val_examples, metadata)``."""
    path = Path(destination_path)
    hint = f"run scripts/prepare_dolly.py (or prepare_alpaca.py) --destination_path {path}"
    if not path.is_dir():
        raise UserError(f"no prepared data at {path}: {hint}")
    missing = [name for name in (*SPLIT_FILES, METADATA_FILE) if not (path / name).is_file()]
    if missing:
        raise UserError(f"{', '.join(missing)} missing in {path}: {hint}")
    try:
        metadata = json.loads((path / METADATA_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path / METADATA_FILE} is not valid JSON ({err}); {hint}") from None
    splits = []
    for name, key in zip(SPLIT_FILES, ("train_records", "val_records")):
        try:
            examples = torch.load(path / name, weights_only=True)
        except Exception as err:  # unpickling errors come in many types; all mean the file is unusable
            raise UserError(f"{path / name} cannot be loaded ({type(err).__name__}); {hint}") from None
        _check_examples(path / name, examples)
        for ex in examples:  # prepared before categories were kept: one "unknown" task
            ex.setdefault("category", UNKNOWN_CATEGORY)
        if metadata.get(key) is not None and metadata[key] != len(examples):
            raise UserError(
                f"{path / name} has {len(examples)} examples but {METADATA_FILE} says {metadata[key]}; the folder "
                f"mixes two preparation runs: {hint}"
            )
        splits.append(examples)
    return splits[0], splits[1], metadata


def _check_examples(path: Path, examples: Any) -> None:
    if not isinstance(examples, list):
        raise UserError(f"{path} does not hold a list of examples")
    for i, ex in enumerate(examples):
        ok = (isinstance(ex, dict) and isinstance(ex.get("input_ids"), torch.Tensor)
              and isinstance(ex.get("labels"), torch.Tensor) and ex["input_ids"].ndim == 1
              and ex["input_ids"].shape == ex["labels"].shape and ex["input_ids"].numel() > 0)
        if not ok:
            raise UserError(f"{path}: example {i} is not a dict of equal-length 1-D 'input_ids' and 'labels'")


def category_counts(examples: Sequence[Example]) -> Dict[str, int]:
    """Examples per category, most frequent first (ties by name)."""
    counts: Dict[str, int] = {}
    for ex in examples:
        name = ex.get("category", UNKNOWN_CATEGORY)
        counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def category_sample(examples: Sequence[Example], per_category: int) -> List[Example]:
    """The first ``per_category`` examples of each category, in the examples' order (categories by size).

    Applied to the validation split, which preparation drew at random with its seed, this is a fixed random sample
    per task: the same for every run on the same prepared folder, so a grid's cells answer the same questions.
    """
    chosen: Dict[str, List[Example]] = {name: [] for name in category_counts(examples)}
    for ex in examples:
        bucket = chosen[ex.get("category", UNKNOWN_CATEGORY)]
        if len(bucket) < per_category:
            bucket.append(ex)
    return [ex for bucket in chosen.values() for ex in bucket]


# -------------------------------------------------------------------------------------------------------- batching


def truncate_examples(examples: List[Example], max_len: int) -> Tuple[List[Example], int, int]:
    """``examples`` cut to ``max_len`` tokens (input ids and labels alike), how many were cut, and how many of
    those lost every target token (they still cost compute but teach nothing)."""
    cut, emptied, out = 0, 0, []
    for ex in examples:
        if len(ex["input_ids"]) > max_len:
            cut += 1
            ex = {**ex, "input_ids": ex["input_ids"][:max_len], "labels": ex["labels"][:max_len]}
            emptied += int(bool((ex["labels"][1:] == IGNORE_INDEX).all()))
        out.append(ex)
    return out, cut, emptied


class InstructionDataset(Dataset):
    """The tokenized examples of one split, as a map-style torch Dataset."""

    def __init__(self, examples: Sequence[Example]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Example:
        return self.examples[index]


def collate_instructions(
    batch: Sequence[Example], pad_id: int = 0, ignore_index: int = IGNORE_INDEX, max_length: Optional[int] = None
) -> Dict[str, torch.Tensor]:
    """Right-pads a list of examples to the longest one: ``{"input_ids": (B, T), "labels": (B, T)}``.

    Padding positions get ``pad_id`` in ``input_ids`` and ``ignore_index`` in ``labels``, so they never count in the
    loss; with causal attention, right padding cannot change the logits of the real tokens. Examples longer than
    ``max_length`` are cut to it first.
    """
    if not batch:
        raise ValueError("cannot collate an empty batch")
    rows = [(ex["input_ids"], ex["labels"]) for ex in batch]
    if max_length is not None:
        rows = [(ids[:max_length], labels[:max_length]) for ids, labels in rows]
    longest = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(rows), longest), ignore_index, dtype=torch.long)  # (B, T)
    for row, (ids, target) in enumerate(rows):
        input_ids[row, : len(ids)] = ids
        labels[row, : len(target)] = target
    return {"input_ids": input_ids, "labels": labels}
