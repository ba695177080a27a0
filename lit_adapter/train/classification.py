"""Sequence classification with a linear head (``lit_adapter.model.heads``) trained by the one loop, with any method.

``finetune/classify.py <method>`` builds the run: the labelled splits (:mod:`lit_adapter.data.classification`), the head
on the method's model (its tensor trains and is saved with the method's: LoRA, QLoRA on an NF4 base, full
fine-tuning, adapters), and :class:`ClassificationObjective`, which the loop in :mod:`lit_adapter.train.run` optimises
like any other: cross-entropy over the head's logits, one item per example. Validation logs the accuracy and the
macro-F1 beside the loss; ``best/`` is the lowest validation loss after step 0, as for every run. After training,
:func:`evaluate_head` scores ``best/`` (``final/`` if there is no ``best/``) on the test split: accuracy, macro-F1
(the unweighted mean of the per-label F1, a label never predicted nor present scoring 0, as scikit-learn's
``f1_score(average="macro", zero_division=0)``) and the confusion matrix, written to ``out_dir/test_metrics.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from lit_adapter.data.classification import ClassifyData, Splits, encode_examples, load_splits
from lit_adapter.errors import UserError
from lit_adapter.model.heads import HeadSpec, classification_logits
from lit_adapter.train.objectives import MetricSums, Objective, phase

TEST_METRICS_FILE = "test_metrics.json"


@dataclass
class HeadArgs:
    """The classification head."""

    pad_id: Optional[int] = None
    """The token id batches are padded with, around which the head finds each text's last token; default: the
    tokenizer's pad piece (LLaMA and llama2.c vocabularies have none: pass one, e.g. 0)."""


# ----------------------------------------------------------------------------------------------------------------------
# metrics


def confusion_matrix(gold: torch.Tensor, predicted: torch.Tensor, num_labels: int) -> torch.Tensor:
    """``(K, K)`` counts, rows the gold label and columns the prediction."""
    flat = gold.long() * num_labels + predicted.long()  # (N,)
    return torch.bincount(flat, minlength=num_labels * num_labels).view(num_labels, num_labels)


def scores(confusion: torch.Tensor, labels: Sequence[str]) -> Dict[str, Any]:
    """Accuracy, macro-F1 and each label's precision, recall and F1 from a confusion matrix (zero division: 0)."""
    confusion = confusion.double()
    tp = confusion.diagonal()
    predicted, gold = confusion.sum(0), confusion.sum(1)
    total = confusion.sum()

    def ratio(a, b):
        return torch.where(b > 0, a / b.clamp(min=1e-300), torch.zeros_like(a))

    precision, recall = ratio(tp, predicted), ratio(tp, gold)
    f1 = ratio(2 * tp, predicted + gold)  # = 2PR / (P + R), and 0 where the label is neither predicted nor present
    return {
        "accuracy": float(tp.sum() / total) if total > 0 else 0.0,
        "macro_f1": float(f1.mean()),
        "per_label": {label: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                              "support": int(gold[i])} for i, label in enumerate(labels)},
    }


def format_confusion(confusion: torch.Tensor, labels: Sequence[str]) -> str:
    """The matrix as aligned text, rows gold and columns predicted."""
    width = max(8, *(len(label) for label in labels))
    head = "gold \\ predicted".ljust(width + 2) + "".join(label.rjust(width + 2) for label in labels)
    rows = [label.ljust(width + 2) + "".join(str(int(v)).rjust(width + 2) for v in row)
            for label, row in zip(labels, confusion.tolist())]
    return "\n".join([head, *rows])


# ----------------------------------------------------------------------------------------------------------------------
# the objective


def tokenize_examples(tokenizer, examples, labels: Sequence[str], max_len: Optional[int] = None,
                      truncation: str = "cut") -> List[Dict[str, Any]]:
    """``{"input_ids": (1-D), "label": index}`` per example, encoded by
    :func:`~lit_adapter.data.classification.encode_examples` (a pair as the tokenizer pairs texts; cut to
    ``max_len`` or refused, as ``truncation`` says)."""
    return encode_split(tokenizer, examples, labels, max_len, truncation)[0]


def encode_split(tokenizer, examples, labels: Sequence[str], max_len: Optional[int] = None,
                 truncation: str = "cut") -> Tuple[List[Dict[str, Any]], int]:
    """:func:`tokenize_examples` and how many examples were cut."""
    index = {label: i for i, label in enumerate(labels)}
    encoded, cut = encode_examples(tokenizer, examples, max_len, truncation)
    return [{"input_ids": ids, "label": index[e.label]} for ids, e in zip(encoded, examples)], cut


class ClassificationObjective(Objective):
    """Cross-entropy of the head's logits on the last non-padding token; accuracy and macro-F1 as metrics."""

    name = "sequence_classification"

    def __init__(self, train: List[Dict[str, Any]], val: List[Dict[str, Any]], metadata: Dict[str, Any],
                 head: HeadSpec) -> None:
        self.train, self.val, self.metadata, self.head = train, val, metadata, head
        self.sums = MetricSums()

    def load_examples(self, data_dir):
        return self.train, self.val, self.metadata

    def truncate(self, examples, max_len: int):
        cut = sum(len(e["input_ids"]) > max_len for e in examples)
        return [{**e, "input_ids": e["input_ids"][:max_len]} for e in examples], cut

    packing_refusal = ("its head reads each text's last token, found by the padding of a (B, T) batch; "
                       "classification batches are short texts with little padding to save")

    def count(self, batch) -> torch.Tensor:
        return torch.tensor(batch["label"].numel())  # one item per text

    def collate(self, batch, pad_id: int):
        # the head's pad id, not the loop's: the head finds each text's end by it
        longest = max(len(e["input_ids"]) for e in batch)
        input_ids = torch.full((len(batch), longest), self.head.pad_id, dtype=torch.long)  # (B, T)
        for row, example in enumerate(batch):
            input_ids[row, : len(example["input_ids"])] = example["input_ids"]
        return {"input_ids": input_ids, "label": torch.tensor([e["label"] for e in batch])}  # (B, T), (B,)

    def attach(self, model, spec, loss: str) -> None:
        if spec.head is None or spec.head.num_labels != self.head.num_labels:
            raise UserError("the classification objective needs the model's head (MethodSpec.head)")
        if loss != "cross_entropy":
            raise UserError(f"train.loss={loss} chooses how the next-token loss is computed; a classification head's "
                            "loss is over its few logits: leave train.loss at cross_entropy")

    def forward_loss(self, model, batch, loss: str = "cross_entropy",
                     autocast: Callable = contextlib.nullcontext) -> Tuple[torch.Tensor, int]:
        with autocast():  # the head runs outside the model's forward, in the same precision context
            logits = classification_logits(model, batch["input_ids"], self.head.pad_id)  # (B, K)
        gold = batch["label"].to(logits.device)
        value = F.cross_entropy(logits.float(), gold)
        predicted = logits.detach().argmax(-1)
        self.sums.add(phase(model), confusion=confusion_matrix(gold, predicted, self.head.num_labels))
        return value, gold.numel()

    def metrics(self, fabric, phase: str) -> Dict[str, float]:
        sums = self.sums.pop(phase, fabric)
        if "confusion" not in sums:
            return {}
        result = scores(sums["confusion"], self.head.labels)
        return {"accuracy": result["accuracy"], "macro_f1": result["macro_f1"]}

    def describe(self) -> Dict[str, Any]:
        return {"name": self.name, "labels": list(self.head.labels), "pad_id": self.head.pad_id}


# ----------------------------------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def evaluate_head(model, examples: List[Dict[str, Any]], head: HeadSpec, batch_size: int = 16,
                  max_len: Optional[int] = None) -> Tuple[torch.Tensor, List[int]]:
    """The ``(K, K)`` confusion matrix of ``model`` on tokenized ``examples`` and the predictions, in order."""
    objective = ClassificationObjective([], [], {}, head)
    device = next(model.parameters()).device
    confusion = torch.zeros(head.num_labels, head.num_labels, dtype=torch.long)
    predictions: List[int] = []
    model.eval()
    for start in range(0, len(examples), batch_size):
        chunk = [{**e, "input_ids": e["input_ids"][:max_len] if max_len else e["input_ids"]}
                 for e in examples[start : start + batch_size]]
        batch = objective.collate(chunk, head.pad_id)
        logits = classification_logits(model, batch["input_ids"].to(device), head.pad_id)  # (B, K)
        predicted = logits.argmax(-1).cpu()
        confusion += confusion_matrix(batch["label"], predicted, head.num_labels)
        predictions += predicted.tolist()
    return confusion, predictions


def report_test(checkpoint_dir: Path, folder: Path, tests: Dict[str, List[Dict[str, Any]]], splits: Splits,
                head: HeadSpec, device: str, precision: str, batch_size: int, max_len: int,
                out_dir: Path) -> Dict[str, Any]:
    """Loads ``folder`` (``best/`` or ``final/``), scores it on every test split (``tests``: name -> tokenized
    examples), prints and writes the report: the first split's numbers at the top, each split's under ``splits``."""
    from lit_adapter.tuners.registry import load_finetuned
    from lit_adapter.runtime import resolve_device, weights_dtype

    dev = resolve_device(device)
    _, model, spec = load_finetuned(checkpoint_dir, folder, dev, weights_dtype(precision))
    if spec.head is None or spec.head.labels != head.labels:
        raise UserError(f"{folder} holds no head for the labels {list(head.labels)}")
    reports = {}
    for name, test in tests.items():
        confusion, predictions = evaluate_head(model, test, head, batch_size, max_len)
        result = scores(confusion, head.labels)
        split = ("validation split (the source has no test split)" if splits.test_is_validation else
                 "test split" if name == "test" else name)
        print(f"{split} ({len(test)} examples, {folder.name}/): accuracy {result['accuracy']:.4f}, "
              f"macro-F1 {result['macro_f1']:.4f}")
        print(format_confusion(confusion, head.labels))
        reports[name] = {"split": split, "examples": len(test), **result, "confusion": confusion.tolist(),
                         "predictions": predictions}
    report = {"checkpoint": str(folder), **next(iter(reports.values())), "labels": list(head.labels),
              "source": splits.source, "splits": {name: {k: v for k, v in r.items() if k != "predictions"}
                                                  for name, r in reports.items()}}
    (out_dir / TEST_METRICS_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report


# ----------------------------------------------------------------------------------------------------------------------
# the entry point


def default_labels(data: ClassifyData) -> Tuple[str, ...]:
    """The label set a dry run sizes the head for, without reading the data: ``--data.labels``, else two labels
    (Rotten Tomatoes'; a note says so for another source, whose labels only its records tell); MultiNLI's three."""
    from lit_adapter.data.classification import NLI_LABELS, ROTTEN_TOMATOES, SENTIMENT_LABELS, is_mnli

    if data.labels:
        return tuple(data.labels)
    if is_mnli(data.source, data.hub_config):
        return tuple(NLI_LABELS)
    if data.source != ROTTEN_TOMATOES:
        print(f"dry run: the head is sized for {len(SENTIMENT_LABELS)} labels; pass --data.labels to size it for "
              f"those of {data.source}", file=sys.stderr)
    return tuple(SENTIMENT_LABELS)


def check_splits(splits: Splits) -> None:
    """Data a classifier can learn from and be scored on: two classes in training, and a test split that is not
    empty (else it would train a head for a class it never sees, or report "accuracy 0.0000" on nothing)."""
    seen = sorted({e.label for e in splits.train})
    if len(seen) < 2:
        raise UserError(f"{splits.source}: every training example has the label {seen[0]!r}" if seen else
                        f"{splits.source}: the training split is empty")
    if not splits.test:
        raise UserError(f"{splits.source}: the test split is empty; add test examples or set data.test_fraction")


def finetune_classifier(spec, *, checkpoint_dir: Optional[Path], model_name: Optional[str], out_dir: Path,
                        data: ClassifyData, head: HeadArgs, train, eval, fabric_args, logger, resume: bool = False,
                        dry_run: bool = False, overwrite: bool = False, model=None):
    """Trains ``spec`` plus a head on ``data`` with the one loop, then evaluates ``best/`` on the test split.

    Returns ``(run result, test report)``; both ``None`` for a dry run (the test report is ``None`` on ranks > 0).
    """
    from lit_adapter.evaluation import DEFAULT_DATA_DIR
    from lit_adapter.runtime import default_precision
    from lit_adapter.data.tokenizer import Tokenizer
    from lit_adapter.train.run import DataArgs, context_length, finetune
    from lit_adapter.tuners.registry import resolve_config

    if dry_run:  # counts and memory need the model and the number of labels, not the data or the pad token
        pad_id = head.pad_id if head.pad_id is not None else resolve_config(checkpoint_dir, model_name).pad_token_id
        spec.head = HeadSpec(labels=default_labels(data), pad_id=pad_id if pad_id is not None else 0)
        return finetune(spec, checkpoint_dir=checkpoint_dir, model_name=model_name, out_dir=out_dir,
                        data=DataArgs(max_seq_length=data.max_seq_length), train=train, eval=eval,
                        fabric_args=fabric_args, logger=logger, resume=resume, dry_run=True, overwrite=overwrite,
                        model=model), None
    splits = load_splits(data, DEFAULT_DATA_DIR)
    check_splits(splits)
    tokenizer = Tokenizer.from_checkpoint_dir(checkpoint_dir) if checkpoint_dir is not None else None
    pad_id = head.pad_id
    if pad_id is None and tokenizer is not None and tokenizer.pad_id >= 0:
        pad_id = tokenizer.pad_id
    if pad_id is None:  # an encoder knows its padding token (a decoder's config has none)
        pad_id = resolve_config(checkpoint_dir, model_name).pad_token_id
    spec.head = HeadSpec(labels=splits.labels, pad_id=pad_id)  # an unknown pad token is refused here
    vocab_size = resolve_config(checkpoint_dir, None).vocab_size if tokenizer is not None else None
    if vocab_size is not None and pad_id >= vocab_size:  # else an IndexError in the first step
        raise UserError(f"--head.pad_id {pad_id} is outside the vocabulary of {checkpoint_dir} ({vocab_size} tokens, "
                        f"ids 0 to {vocab_size - 1})")
    loop_data = DataArgs(data_dir=Path(splits.source), max_seq_length=data.max_seq_length)
    if tokenizer is None:
        return finetune(spec, checkpoint_dir=checkpoint_dir, model_name=model_name, out_dir=out_dir, data=loop_data,
                        train=train, eval=eval, fabric_args=fabric_args, logger=logger, resume=resume,
                        dry_run=dry_run, overwrite=overwrite, model=model), None
    max_len = context_length(loop_data, resolve_config(checkpoint_dir, None), spec)  # virtual tokens reserved
    encoded = {name: encode_split(tokenizer, part, splits.labels, max_len, data.truncation)
               for name, part in (("train", splits.train), ("validation", splits.val), *splits.test_sets().items())}
    cut = {name: n for name, (_, n) in encoded.items() if n}
    metadata = {"source": splits.source, "labels": list(splits.labels),
                "tokenizer": {"vocab_size": tokenizer.vocab_size}, "skipped_without_gold_label": splits.skipped_no_gold,
                "max_seq_length": max_len, "cut_to_max_seq_length": cut}
    train_examples, val_examples = encoded["train"][0], encoded["validation"][0]
    tests = {name: encoded[name][0] for name in splits.test_sets()}
    print(f"{splits.source}: {len(splits.train)} training, {len(splits.val)} validation, "
          f"{', '.join(f'{len(part)} {name}' for name, part in splits.test_sets().items())} examples; labels "
          f"{', '.join(splits.labels)}"
          + (f"; {splits.skipped_no_gold} without a gold label skipped" if splits.skipped_no_gold else "")
          + (f"; cut to {max_len} tokens: " + ", ".join(f"{n} {name}" for name, n in cut.items()) if cut else ""),
          file=sys.stderr)
    objective = ClassificationObjective(train_examples, val_examples, metadata, spec.head)
    result = finetune(spec, checkpoint_dir=checkpoint_dir, model_name=model_name, out_dir=out_dir, data=loop_data,
                      train=train, eval=eval, fabric_args=fabric_args, logger=logger, resume=resume,
                      dry_run=False, overwrite=overwrite, objective=objective, model=model)
    if int(os.environ.get("LOCAL_RANK", "0")) != 0 or result is None or result.status != "completed":
        return result, None
    folder = Path(out_dir) / ("best" if (Path(out_dir) / "best").is_dir() else "final")
    device = "cpu" if fabric_args.accelerator == "cpu" else None
    precision = fabric_args.precision or default_precision(fabric_args.accelerator)
    report = report_test(Path(checkpoint_dir), folder, tests, splits, spec.head, device, precision,
                         train.micro_batch_size, max_len, Path(out_dir))
    report["train_summary"] = asdict(result)
    return result, report


def command(method: str):
    """The ``finetune/classify.py <method>`` command: the method's options plus ``--data.*`` and ``--head.*``."""
    from lit_adapter.cli.finetune import EntryPoint, make_finetune_command

    def run(spec, **options):
        return finetune_classifier(spec, **options)[0]

    return make_finetune_command(method, EntryPoint(
        run=run, data=ClassifyData(), data_help="The labelled examples and their train/validation/test split.",
        summary=("Sequence classification: a linear head on the last non-padding token (as HF "
                 "LlamaForSequenceClassification), trained with this method; reports accuracy, macro-F1 and the "
                 "confusion matrix of best/ on the test split (out_dir/test_metrics.json)."),
        extra=[("head", HeadArgs(), "The classification head (its pad token).")], out_prefix="out/classify"))
