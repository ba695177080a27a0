"""Labelled text for classification: Rotten Tomatoes, premise/hypothesis/label files and Hugging Face datasets.

Every source becomes three lists of :class:`~lit_adapter.evaluation.classification.Example` (train, validation,
test) and the label set, in the head's output order:

* ``rotten_tomatoes``: Pang & Lee's sentence polarity files (``<data_dir>/rotten_tomatoes/rt-polarity.{pos,neg}``,
  10,662 snippets), labels ``(negative, positive)`` as in HF's ``rotten_tomatoes`` (0 = neg, 1 = pos);
* a local JSON array, JSON-lines, TSV or CSV file with ``text`` (or ``sentence``) or ``premise``/``hypothesis``
  (or MultiNLI's ``sentence1``/``sentence2``) and ``label`` (or ``gold_label``); one file is split here with the
  seed, a folder holds ``train``, ``validation`` (or ``val``/``dev``; without one a slice of train is held out) and
  optionally ``test`` files or those ``test_split`` names (MultiNLI's own ``multinli_1.0_dev_matched.jsonl``, ...);
* a Hugging Face dataset id (``nyu-mll/multi_nli``, ``cornell-movie-review-data/rotten_tomatoes``), loaded through
  ``datasets``; a ``ClassLabel`` column gives the label names.

MultiNLI (``nyu-mll/multi_nli``, or ``nyu-mll/glue`` with ``hub_config: mnli``) is scored on both of its labelled
evaluation splits, ``validation_matched`` and ``validation_mismatched``, each reported by name, while the
validation that chooses ``best/`` is held out of the training split (so no evaluated example selects the
checkpoint); ``test_split`` may name several splits (``a,b``) of any source.

A pair is encoded by the tokenizer's own pair method where it has one (RoBERTa's ``<s> A </s></s> B </s>``,
:func:`encode_examples`), else as the text ``Premise: A\\nHypothesis: B`` after BOS (a LLaMA head reads the last
token). A sequence past the model's window is cut and counted (``truncation: cut``: a pair loses tokens from its
longer text first, as transformers' ``truncation=True``) or refused in one line naming it (``refuse``).

Labels are names from the label set or integer indices into it; anything else is one :class:`UserError` line
naming the file and record; so is a record of a pair dataset without its hypothesis. MultiNLI's examples without a
gold label (``-1``, ``-``) are skipped and counted. The default label set is the NLI one for pairs and
``(negative, positive)`` for single texts; ``--data.labels`` sets another.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Literal, Optional, Sequence, Tuple

from lit_adapter.errors import UserError
from lit_adapter.evaluation.classification import LABELS, Example, load_sentiment

ROTTEN_TOMATOES = "rotten_tomatoes"
SENTIMENT_LABELS = ("negative", "positive")
"""HF ``rotten_tomatoes`` order: 0 = neg, 1 = pos."""
NLI_LABELS = LABELS["nli"]
"""MultiNLI order: 0 = entailment, 1 = neutral, 2 = contradiction."""
NO_GOLD = ("-1", "-", "")
TEXT_KEYS, PAIR_KEYS = ("text", "sentence", "review"), (("premise", "hypothesis"), ("sentence1", "sentence2"))
LABEL_KEYS = ("label", "gold_label")
SPLIT_NAMES = {"train": ("train",), "val": ("validation", "val", "dev"), "test": ("test",)}
SUFFIXES = (".jsonl", ".json", ".tsv", ".csv")
MNLI_SOURCES = {("nyu-mll/multi_nli", None), ("multi_nli", None), ("nyu-mll/glue", "mnli"), ("glue", "mnli")}
MNLI_EVAL_SPLITS = ("validation_matched", "validation_mismatched")
"""MultiNLI's labelled evaluation splits (its test splits have no public labels)."""


@dataclass
class ClassifyData:
    """Where the labelled examples come from and how they are split."""

    source: str = ROTTEN_TOMATOES
    """rotten_tomatoes (Pang & Lee's files in data_dir/rotten_tomatoes), a local JSON/JSONL/TSV/CSV file with
    text or premise/hypothesis and label (split here), a folder of train/validation[/test] files, or a Hugging Face
    dataset id (loaded with datasets)."""
    data_dir: Optional[Path] = None
    """The folder holding rotten_tomatoes/ (default: ../shared/data beside the checkout)."""
    labels: Optional[List[str]] = None
    """The label set in the head's output order; default: a hub dataset's ClassLabel names, else entailment,
    neutral, contradiction for pairs and negative, positive for single texts."""
    hub_config: Optional[str] = None
    """The dataset configuration of a hub id (e.g. mnli for nyu-mll/glue)."""
    train_split: str = "train"
    val_split: str = "validation"
    """The validation split of a hub dataset (validation_matched for nyu-mll/multi_nli)."""
    test_split: str = "test"
    """The split(s) best/ is scored on, comma-separated (each reported by name): a hub dataset's split names, or a
    data folder's file names; for MultiNLI left at test, both validation_matched and validation_mismatched."""
    val_fraction: float = 0.1
    """Share of a single file (or of Rotten Tomatoes) held out for validation, and of a hub dataset's train split
    when it has no validation split."""
    test_fraction: float = 0.1
    """Share of a single file (or of Rotten Tomatoes) held out for the test evaluation."""
    max_seq_length: Optional[int] = None
    """Tokens per example at most (an encoder's window: 512 for RoBERTa); default: the model's block_size."""
    truncation: Literal["cut", "refuse"] = "cut"
    """A longer example: cut (counted and reported; a pair loses tokens from its longer text first, as
    transformers' truncation=True) or refuse (one line naming the example)."""
    max_train_examples: Optional[int] = None
    """Train on the first N training examples (after the seeded shuffle), for quick runs."""
    max_eval_examples: Optional[int] = None
    """Validate and test on the first N examples of those splits, for quick runs."""
    seed: int = 42
    """Seeds the shuffle and split."""

    def __post_init__(self) -> None:
        for name in ("val_fraction", "test_fraction"):
            if not 0 <= getattr(self, name) < 1:
                raise UserError(f"data.{name} must lie in [0, 1), got {getattr(self, name)}")
        if self.val_fraction + self.test_fraction >= 1:
            raise UserError("data.val_fraction + data.test_fraction leave nothing to train on")
        if self.truncation not in ("cut", "refuse"):
            raise UserError(f"data.truncation must be cut or refuse, got {self.truncation!r}")

    @property
    def test_splits(self) -> List[str]:
        return [name.strip() for name in self.test_split.split(",") if name.strip()]


@dataclass
class Splits:
    train: List[Example]
    val: List[Example]
    test: List[Example]
    labels: Tuple[str, ...]
    source: str
    skipped_no_gold: int = 0
    test_is_validation: bool = False
    """The source has no test split: the test evaluation reads the validation split (said in the report)."""
    named_tests: Dict[str, List[Example]] = field(default_factory=dict)
    """Several test splits by name (MultiNLI's matched and mismatched); ``test`` is the first of them."""

    def test_sets(self) -> Dict[str, List[Example]]:
        """Every split best/ is scored on, by name."""
        return dict(self.named_tests) if self.named_tests else {"test": self.test}


def load_splits(data: ClassifyData, default_data_dir: Path) -> Splits:
    """The three splits and the label set of ``data.source``; bad records are one line naming where."""
    source = data.source
    if source == ROTTEN_TOMATOES:
        folder = Path(data.data_dir) if data.data_dir is not None else default_data_dir
        examples = [_relabel(e, SENTIMENT_LABELS, data.labels) for e in load_sentiment(folder)]
        labels = tuple(data.labels or SENTIMENT_LABELS)
        splits = _split(examples, data, labels, str(folder / ROTTEN_TOMATOES))
    elif Path(source).expanduser().exists():
        splits = _load_local(Path(source).expanduser(), data)
    elif "/" in source or not Path(source).suffix:
        splits = _load_hub(source, data)
    else:
        raise UserError(f"data.source {source!r}: no such file or folder (and not a Hugging Face dataset id)")
    return _capped(splits, data)


def _relabel(example: Example, names: Sequence[str], labels: Optional[Sequence[str]]) -> Example:
    if labels is not None and example.label not in labels:
        raise UserError(f"label {example.label!r} of the source is not in data.labels {list(labels)}")
    return example


def _split(examples: List[Example], data: ClassifyData, labels: Tuple[str, ...], source: str,
           skipped: int = 0) -> Splits:
    shuffled = list(examples)
    random.Random(data.seed).shuffle(shuffled)
    n_test, n_val = round(len(shuffled) * data.test_fraction), round(len(shuffled) * data.val_fraction)
    test, val, train = shuffled[:n_test], shuffled[n_test:n_test + n_val], shuffled[n_test + n_val:]
    if not val and data.val_fraction > 0 or not train:
        raise UserError(f"{source}: {len(examples)} examples are too few to split into train/validation/test")
    return Splits(train, val, test, labels, source, skipped, test_is_validation=not test)


def _capped(splits: Splits, data: ClassifyData) -> Splits:
    if data.max_train_examples is not None:
        splits.train = splits.train[: data.max_train_examples]
    if data.max_eval_examples is not None:
        splits.val, splits.test = splits.val[: data.max_eval_examples], splits.test[: data.max_eval_examples]
        splits.named_tests = {k: v[: data.max_eval_examples] for k, v in splits.named_tests.items()}
    if splits.test_is_validation:
        splits.test = splits.val
    return splits


# ----------------------------------------------------------------------------------------------------------------------
# records -> examples


class _Labeller:
    """Turns raw records into examples, fixing the layout (text or pair) and label set on the first record it sees:
    a pair dataset whose record lacks its hypothesis is refused there, not read as a single text."""

    def __init__(self, labels: Optional[Sequence[str]]) -> None:
        self.labels: Optional[Tuple[str, ...]] = tuple(labels) if labels else None
        self.pairs: Optional[bool] = None
        self.skipped = 0

    def example(self, row: Dict[str, Any], where: str) -> Optional[Example]:
        fields = _fields(row, where, self.pairs)
        label = next((row[k] for k in LABEL_KEYS if k in row), None)
        if label is None:
            raise UserError(f"{where}: no label (expected a {' or '.join(LABEL_KEYS)} field)")
        if self.pairs is None:
            self.pairs = len(fields) == 2
        if self.labels is None:
            self.labels = NLI_LABELS if self.pairs else SENTIMENT_LABELS
        text = str(label).strip()
        if text.lower() in NO_GOLD:
            self.skipped += 1
            return None
        if text.lstrip("-").isdigit():
            index = int(text)
            if not 0 <= index < len(self.labels):
                raise UserError(f"{where}: label {index} is outside the label set {list(self.labels)} (indices "
                                f"0..{len(self.labels) - 1}); set data.labels")
            return Example(fields, self.labels[index], where)
        lowered = {name.lower(): name for name in self.labels}
        if text.lower() not in lowered:
            raise UserError(f"{where}: label {text!r} is not in the label set {list(self.labels)}; set data.labels")
        return Example(fields, lowered[text.lower()], where)


def _present(value: Any) -> bool:
    return value is not None and str(value).strip() != ""


def _fields(row: Dict[str, Any], where: str, pairs: Optional[bool] = None) -> Tuple[str, ...]:
    """The text (one field) or premise and hypothesis (two) of ``row``; ``pairs`` is the dataset's layout so far."""
    if not isinstance(row, dict):
        raise UserError(f"{where}: a record must be an object with text (or premise/hypothesis) and label")
    for first, second in PAIR_KEYS:
        if first in row:
            if not _present(row.get(second)):
                raise UserError(f"{where}: {first} without a {second} (a pair dataset needs both in every record)")
            if not _present(row[first]):
                raise UserError(f"{where}: {second} without a {first} (a pair dataset needs both in every record)")
            return (str(row[first]).strip(), str(row[second]).strip())
        if second in row and pairs is not False:
            raise UserError(f"{where}: {second} without a {first} (a pair dataset needs both in every record)")
    if pairs:  # a pair dataset's record with a single text: no hypothesis to pair it with
        raise UserError(f"{where}: no hypothesis (the dataset's earlier records are premise/hypothesis pairs; "
                        "every record needs both)")
    for key in TEXT_KEYS:
        if key in row:
            return (str(row[key]).strip(),)
    raise UserError(f"{where}: no text field (expected text/sentence, or premise and hypothesis, or "
                    "sentence1 and sentence2)")


def read_records(path: Path) -> List[Tuple[str, Dict[str, Any]]]:
    """``(where, record)`` pairs of a JSON array, JSON-lines, TSV or CSV file; ``where`` names file and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read {path}: {err}") from None
    try:
        if path.suffix in (".tsv", ".csv"):
            delimiter = "\t" if path.suffix == ".tsv" else ","
            reader = csv.DictReader(text.splitlines(), delimiter=delimiter,
                                    quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL)
            return [(f"{path}, line {i}", row) for i, row in enumerate(reader, start=2)]
        if text.lstrip().startswith("["):
            return [(f"{path}, record {i}", row) for i, row in enumerate(json.loads(text), start=1)]
        out = []
        for i, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    out.append((f"{path}, line {i}", json.loads(line)))
                except json.JSONDecodeError as err:
                    raise UserError(f"{path}, line {i}: invalid JSON ({err.msg})") from None
        return out
    except (json.JSONDecodeError, csv.Error) as err:
        raise UserError(f"cannot read {path}: {err}") from None


def _examples(rows: Iterable[Tuple[str, Dict[str, Any]]], labeller: _Labeller) -> List[Example]:
    return [e for e in (labeller.example(row, where) for where, row in rows) if e is not None]


def _split_file(folder: Path, names: Sequence[str]) -> Optional[Path]:
    """The file of a split in ``folder``: ``<name>.<suffix>``, or a file ending ``_<name>.<suffix>`` (MultiNLI's own
    ``multinli_1.0_dev_matched.jsonl``); ``validation_x`` is also found as ``dev_x``."""
    for name in names:
        for alias in (name, *([f"dev_{name[len('validation_'):]}"] if name.startswith("validation_") else [])):
            for suffix in SUFFIXES:
                if (folder / f"{alias}{suffix}").is_file():
                    return folder / f"{alias}{suffix}"
                found = sorted(folder.glob(f"*_{alias}{suffix}"))
                if found:
                    return found[0]
    return None


def _load_local(path: Path, data: ClassifyData) -> Splits:
    labeller = _Labeller(data.labels)
    if path.is_file():
        examples = _examples(read_records(path), labeller)
        return _split(examples, data, labeller.labels or (), str(path), labeller.skipped)
    train_file, val_file = _split_file(path, SPLIT_NAMES["train"]), _split_file(path, SPLIT_NAMES["val"])
    if train_file is None:
        raise UserError(f"{path}: a data folder needs a train file (train.jsonl/.json/.tsv/.csv), and validation "
                        "(val/dev) and test files or the splits named by data.test_split")
    tests = {name: _split_file(path, (name,)) for name in data.test_splits}
    if data.test_split == "test" and tests["test"] is None:  # MultiNLI's folder: its dev_matched/_mismatched files
        mnli = {name: _split_file(path, (name,)) for name in MNLI_EVAL_SPLITS}
        tests = mnli if all(mnli.values()) else tests
    absent = [name for name, f in tests.items() if f is None]
    if absent and data.test_split != "test":  # named on purpose: its file must be there
        raise UserError(f"{path}: no file for the test split {absent[0]!r} ({absent[0]}.jsonl/.json/.tsv/.csv)")
    train = _examples(read_records(train_file), labeller)
    named = {name: _examples(read_records(f), labeller) for name, f in tests.items() if f is not None}
    if val_file is not None and val_file not in tests.values():
        val = _examples(read_records(val_file), labeller)
    else:  # no validation file: hold out val_fraction of train, seeded (as for a hub dataset)
        val, train = _hold_out(train, data)
    test = next(iter(named.values()), [])
    return Splits(train, val, test, labeller.labels or (), str(path), labeller.skipped,
                  test_is_validation=not named, named_tests=named if len(named) > 1 else {})


def _hold_out(train: List[Example], data: ClassifyData) -> Tuple[List[Example], List[Example]]:
    """``(validation, train)``: a seeded val_fraction of the training examples set aside to choose best/."""
    shuffled = list(train)
    random.Random(data.seed).shuffle(shuffled)
    n_val = max(1, round(len(shuffled) * data.val_fraction))
    return shuffled[:n_val], shuffled[n_val:]


def is_mnli(dataset_id: str, config: Optional[str]) -> bool:
    return (dataset_id, config) in MNLI_SOURCES


def _load_hub(dataset_id: str, data: ClassifyData) -> Splits:
    if dataset_id in ("nyu-mll/glue", "glue") and not data.hub_config:
        raise UserError(f"{dataset_id} is a collection of tasks: pass --data.hub_config (mnli for MultiNLI)")
    try:
        import datasets

        loaded = datasets.load_dataset(dataset_id, data.hub_config)
    except Exception as err:  # offline, unknown id, authentication: one line either way
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise UserError(f"cannot load {dataset_id!r} from the Hugging Face hub ({first}); offline? pass a local "
                        "file or folder as --data.source") from None
    if data.train_split not in loaded:
        raise UserError(f"{dataset_id} has no split {data.train_split!r} (it has {', '.join(loaded)})")
    test_splits = data.test_splits
    mnli = is_mnli(dataset_id, data.hub_config) and data.test_split == "test" and data.val_split == "validation"
    if mnli:  # both labelled evaluation splits are scored; best/ is chosen on a slice held out of train
        test_splits = list(MNLI_EVAL_SPLITS)
    unknown = [name for name in test_splits if name != "test" and name not in loaded]
    if unknown:
        raise UserError(f"{dataset_id} has no split {unknown[0]!r} (it has {', '.join(loaded)})")
    labels = data.labels
    feature = loaded[data.train_split].features.get("label") if hasattr(loaded[data.train_split], "features") else None
    if labels is None and getattr(feature, "names", None):
        labels = list(feature.names)
    labeller = _Labeller(labels)

    def rows(split: str):
        return ((f"{dataset_id} {split} record {i}", dict(r)) for i, r in enumerate(loaded[split]))

    train = _examples(rows(data.train_split), labeller)
    if data.val_split in loaded:
        val = _examples(rows(data.val_split), labeller)
    else:  # no validation split: hold out val_fraction of train, seeded
        val, train = _hold_out(train, data)
    named = {}
    for name in test_splits:
        if name not in loaded:
            continue
        named[name] = _examples(rows(name), labeller)
        if not named[name]:
            raise UserError(f"{dataset_id} {name}: no example has a label (a hidden test set?); pass "
                            "--data.test_split with a labelled split (validation_matched,validation_mismatched "
                            "for MultiNLI)")
    test = next(iter(named.values()), [])
    return Splits(train, val, test, labeller.labels or (), f"hub: {dataset_id}", labeller.skipped,
                  test_is_validation=not named, named_tests=named if len(named) > 1 else {})


# ----------------------------------------------------------------------------------------------------------------------
# text


def render(example: Example) -> str:
    """The text a head reads: the snippet itself, or ``"Premise: ...\\nHypothesis: ..."`` for a pair."""
    if len(example.fields) == 1:
        return example.fields[0]
    return f"Premise: {example.fields[0]}\nHypothesis: {example.fields[1]}"


def has_pair_template(tokenizer) -> bool:
    """Whether ``tokenizer`` encodes text pairs with its own special tokens (an encoder's: RoBERTa, BERT)."""
    try:
        tokenizer.encode_pair("a", "b")
    except UserError:  # SentencePiece's, GPT-2's and Llama 3's vocabularies have no pair template
        return False
    return True


def encode_examples(tokenizer, examples: Sequence[Example], max_len: Optional[int] = None,
                    truncation: str = "cut") -> Tuple[List[Any], int]:
    """Token ids of each example and how many were cut to ``max_len``.

    A tokenizer with a pair template (``encode_pair``: RoBERTa's ``<s> A </s></s> B </s>``, ``<s> A </s>`` for one
    text) encodes with it, and a longer example is cut as transformers' ``truncation=True`` cuts it (longest
    first: the longer text loses tokens first, the special tokens stay). Otherwise the text is :func:`render`'s
    after BOS, cut at its end. ``truncation="refuse"`` raises one line naming the example instead.
    """
    pairs = has_pair_template(tokenizer)
    out, cut = [], 0
    for example in examples:
        ids = tokenizer.encode_pair(*example.fields)[0] if pairs else tokenizer.encode(render(example), bos=True)
        if max_len is not None and ids.numel() > max_len:
            if truncation == "refuse":
                raise UserError(f"{example.where or 'an example'}: {ids.numel()} tokens, past the model's "
                                f"{max_len} positions; shorten it, or pass --data.truncation cut to cut such "
                                "examples (counted)")
            cut += 1
            ids = tokenizer.encode_pair(*example.fields, max_length=max_len)[0] if pairs else ids[:max_len]
        out.append(ids)
    return out, cut
