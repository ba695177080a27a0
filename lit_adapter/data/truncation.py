"""Tokenizing instruction records into training examples, and what happens to the ones that do not fit.

An example is ``BOS + prompt + response + EOS``, the prompt rendered with the Alpaca template of
:mod:`lit_adapter.data.prompts`. With ``mask_inputs`` the prompt positions get label ``-100``, so the loss covers only the
response and EOS. An example longer than ``max_seq_length`` is handled by one of three policies (``--truncation``):

``context`` (the default)
    Shorten the record's input (Dolly's ``context``: the prompt's ``### Input:`` section) from its end, at a token
    boundary, until the whole response and EOS fit. Only when the input is gone and the example is still too long is
    the response's tail cut. An input shortened to nothing leaves no ``### Input:`` section, exactly as
    :func:`~lit_adapter.data.prompts.generate_prompt` renders a record without one, so training sees only prompts that
    generation can produce. A record whose prompt alone leaves no room for one response token is dropped: it would
    teach nothing about responding.
``response``
    Cut the example's tail, whatever is there. The response and EOS are at the end, so a record with a long input can
    lose its whole response and, with masked inputs, give no training signal at all. This was the only behaviour
    before the policies existed; on Dolly with a 512-piece vocabulary at 256 tokens it emptied a third of the examples.
``drop``
    Skip every record that does not fit.

:func:`tokenize_split` counts what each policy did; :func:`describe_truncation` says it in one line.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from lit_adapter.errors import UserError
from lit_adapter.data.prompts import UNKNOWN_CATEGORY, InstructionRecord, generate_prompt, input_span
from lit_adapter.data.tokenizer import Tokenizer

IGNORE_INDEX = -100
TRUNCATION_POLICIES = ("context", "response", "drop")
DEFAULT_TRUNCATION = "context"

Example = Dict[str, Any]  # input_ids and labels (1-D LongTensors), category (str)

# The per-split counts of what the policy did (all in examples, except tokens_dropped):
COUNT_KEYS = (
    "examples_too_long",          # longer than max_seq_length as rendered: what the policy acted on
    "examples_truncated",         # kept in a shortened form (input shortened and/or response cut)
    "contexts_shortened",         # kept with a shortened (or removed) input
    "responses_cut",              # kept with the tail of the response (at least the EOS) cut
    "examples_dropped",           # skipped: not in the written split
    "examples_without_response",  # kept with the whole response and EOS cut (only the response policy does that)
    "examples_without_target",    # kept with no position left in the loss (masked inputs, no response left)
    "tokens_dropped",             # tokens of the untruncated examples that are not written (dropped ones included)
)


def check_policy(policy: str) -> None:
    if policy not in TRUNCATION_POLICIES:
        raise UserError(f"unknown truncation policy {policy!r}; choose one of {', '.join(TRUNCATION_POLICIES)}")


def encode_record(record: InstructionRecord, tokenizer: Tokenizer) -> Tuple[torch.Tensor, int]:
    """``BOS + prompt + output + EOS`` ids and the number of leading prompt positions (BOS included)."""
    prompt = generate_prompt(record)
    n_prompt = len(tokenizer.encode(prompt, bos=True, eos=False))
    # Encoding the whole text (not prompt and output separately) gives the response the same tokens it gets when
    # the model continues the prompt; for LLaMA the prompt ends with a byte token for "\n" that never merges.
    ids = tokenizer.encode(prompt + record.output, bos=True, eos=True)
    return ids, n_prompt


def min_seq_length(tokenizer: Tokenizer) -> int:
    """The shortest ``max_seq_length`` that fits BOS, the template with an empty instruction and one response
    token."""
    return len(tokenizer.encode(generate_prompt(InstructionRecord("")), bos=True, eos=False)) + 1


@dataclass
class Fitted:
    """One record after tokenization and the truncation policy."""

    example: Optional[Example]
    """``{"input_ids", "labels"}`` 1-D LongTensors, or ``None`` when the policy dropped the record."""
    full_tokens: int
    """Tokens of the untruncated example."""
    n_prompt: int
    """Prompt positions (BOS included) of the written example's rendering."""
    context_shortened: bool = False
    response_cut: bool = False

    @property
    def tokens_dropped(self) -> int:
        return self.full_tokens - (0 if self.example is None else len(self.example["input_ids"]))


def fit_record(
    record: InstructionRecord, tokenizer: Tokenizer, max_seq_length: Optional[int], mask_inputs: bool = True,
    policy: str = DEFAULT_TRUNCATION,
) -> Fitted:
    """Tokenizes ``record`` and applies the truncation ``policy`` (see the module docstring) at ``max_seq_length``
    (``None``: no limit)."""
    check_policy(policy)
    ids, n_prompt = encode_record(record, tokenizer)
    full = len(ids)
    if max_seq_length is None or full <= max_seq_length:
        return Fitted(_make_example(ids, n_prompt, mask_inputs), full, n_prompt)
    if policy == "drop":
        return Fitted(None, full, n_prompt)
    shortened = False
    if policy == "context" and input_span(record) is not None:
        ids, n_prompt = _shorten_input(record, tokenizer, len(ids) - max_seq_length, max_seq_length)
        shortened = True
    if policy == "context" and n_prompt >= max_seq_length:  # not even one response token fits
        return Fitted(None, full, n_prompt)
    cut = len(ids) > max_seq_length
    if cut:
        ids = ids[:max_seq_length].clone()  # clone: store only what is kept, not a view of the whole
    return Fitted(_make_example(ids, n_prompt, mask_inputs), full, n_prompt, shortened, cut)


def _shorten_input(
    record: InstructionRecord, tokenizer: Tokenizer, excess: int, max_seq_length: int
) -> Tuple[torch.Tensor, int]:
    """The encoding of ``record`` with its input cut at a token boundary so that the example loses at least
    ``excess`` tokens and fits ``max_seq_length`` (or with no input at all when that is not enough)."""
    text = generate_prompt(record) + record.output
    start, end = input_span(record)
    raw = text.encode("utf-8")
    input_begin, input_end = len(text[:start].encode("utf-8")), len(text[:end].encode("utf-8"))
    # The input's own tokens are those that begin inside it: the template puts a "\n" on both sides, which
    # SentencePiece keeps as a token of its own, so no token straddles the input's edges.
    ends = [e for b, e in tokenizer.token_spans(text) if input_begin <= b < input_end]
    keep = len(ends) - excess
    while True:
        kept = raw[input_begin : ends[keep - 1]].decode("utf-8", errors="ignore") if keep > 0 else ""
        # an input cut down to whitespace renders without an "### Input:" section, as generation renders it
        ids, n_prompt = encode_record(replace(record, input=kept if kept.strip() else ""), tokenizer)
        if len(ids) <= max_seq_length or keep <= 0:
            return ids, n_prompt
        # Re-encoding can merge differently at the new end (a word cut in two); take off what is still over.
        keep -= len(ids) - max_seq_length


def _make_example(ids: torch.Tensor, n_prompt: int, mask_inputs: bool) -> Example:
    labels = ids.clone()
    if mask_inputs:
        labels[:n_prompt] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels}


def tokenize_record(
    record: InstructionRecord, tokenizer: Tokenizer, max_seq_length: Optional[int] = None, mask_inputs: bool = True,
    truncation: str = DEFAULT_TRUNCATION,
) -> Tuple[Optional[Example], int]:
    """Tokenizes one record as ``BOS + prompt + output + EOS``; returns ``(example, n_dropped)``.

    ``example`` holds 1-D LongTensors ``input_ids`` and ``labels`` (equal, except that with ``mask_inputs`` the
    prompt positions are ``-100``), or is ``None`` when the ``truncation`` policy drops the record. An example longer
    than ``max_seq_length`` is shortened as the policy says; ``n_dropped`` is the number of tokens it lost (0 when
    it fits, so it doubles as the truncated flag).
    """
    fitted = fit_record(record, tokenizer, max_seq_length, mask_inputs, truncation)
    return fitted.example, fitted.tokens_dropped


def tokenize_split(
    name: str, records: Sequence[InstructionRecord], tokenizer: Tokenizer, max_seq_length: int, mask_inputs: bool,
    policy: str, progress: bool,
) -> Tuple[List[Example], Dict[str, Any]]:
    """The examples of one split and its statistics: ``examples`` (records in), the :data:`COUNT_KEYS`,
    ``tokens`` and ``target_tokens`` written, and the longest untruncated example (``longest_index`` is the
    record's index in ``records``)."""
    from tqdm import tqdm

    check_policy(policy)
    examples: List[Example] = []
    stats: Dict[str, Any] = {"examples": len(records), **{key: 0 for key in COUNT_KEYS}, "tokens": 0,
                             "target_tokens": 0, "longest_tokens": 0, "longest_index": -1}
    bar = tqdm(records, desc=f"tokenizing {name}", unit=" records", disable=not progress, file=sys.stderr,
               dynamic_ncols=True, mininterval=0.5)
    for i, record in enumerate(bar):
        fitted = fit_record(record, tokenizer, max_seq_length, mask_inputs, policy)
        if fitted.full_tokens > stats["longest_tokens"]:
            stats["longest_tokens"], stats["longest_index"] = fitted.full_tokens, i
        stats["examples_too_long"] += fitted.full_tokens > max_seq_length
        stats["tokens_dropped"] += fitted.tokens_dropped
        example = fitted.example
        if example is None:
            stats["examples_dropped"] += 1
            continue
        example["category"] = record.category or UNKNOWN_CATEGORY
        targets = int((example["labels"] != IGNORE_INDEX).sum())
        stats["examples_truncated"] += fitted.context_shortened or fitted.response_cut
        stats["contexts_shortened"] += fitted.context_shortened
        stats["responses_cut"] += fitted.response_cut
        stats["examples_without_response"] += fitted.n_prompt >= len(example["input_ids"])
        stats["examples_without_target"] += targets == 0
        stats["tokens"] += len(example["input_ids"])
        stats["target_tokens"] += targets
        examples.append(example)
    return examples, stats


def total_counts(*splits: Dict[str, Any]) -> Dict[str, int]:
    """The :data:`COUNT_KEYS` summed over splits."""
    return {key: sum(split[key] for split in splits) for key in COUNT_KEYS}


def describe_truncation(counts: Dict[str, int], policy: str, max_seq_length: int, n_examples: int,
                        longest_tokens: int, origin: str = "") -> str:
    """One line saying what the truncation policy did to ``n_examples`` examples (``counts`` from
    :func:`total_counts`)."""
    return (
        f"truncation policy {policy!r} at max_seq_length {max_seq_length}{origin}: "
        f"{counts['examples_too_long']:,} of {n_examples:,} examples did not fit; "
        f"{counts['contexts_shortened']:,} inputs shortened, {counts['responses_cut']:,} responses cut, "
        f"{counts['examples_dropped']:,} dropped; {counts['examples_without_target']:,} examples left without a "
        f"target token ({counts['tokens_dropped']:,} tokens removed; the longest example has {longest_tokens:,})"
    )
