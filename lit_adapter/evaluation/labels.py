"""What the classification evaluations share: the tasks, their labels, an example, and reading a label from text.

:func:`parse_label` reads the label a short answer names (case, punctuation, extra words, synonyms such as
yes/maybe/no for NLI); an answer that names no label, or several, or a negated one, is no answer. The
generation evaluation (:mod:`lit_adapter.evaluation.classification`) and the chain-of-thought one
(:mod:`lit_adapter.evaluation.cot`) both read answers with it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional, Tuple

TASKS = ("sentiment", "nli")
LABELS = {"sentiment": ("positive", "negative"), "nli": ("entailment", "neutral", "contradiction")}

# words that name a label, after lower-casing; "neg"/"pos" are common abbreviations in short answers
_SYNONYMS = {
    "sentiment": {
        "positive": {"positive", "pos", "positively", "favorable", "favourable"},
        "negative": {"negative", "neg", "negatively", "unfavorable", "unfavourable"},
    },
    "nli": {
        "entailment": {"entailment", "entails", "entailed", "entail", "yes", "true"},
        "neutral": {"neutral", "maybe", "undetermined", "unknown", "unrelated"},
        "contradiction": {"contradiction", "contradicts", "contradicted", "contradict", "contradictory", "no",
                          "false"},
    },
}
_WORD = re.compile(r"[a-z]+")
_NEGATIONS = {"not", "never", "t"}  # "t": the end of "isn't", "doesn't" after the split into words


def parse_label(text: str, task: str) -> Optional[str]:
    """The label ``text`` names, or ``None`` when it names none or several ("positive or negative?").

    Only the first line of the answer counts: a base model continuing the few-shot pattern goes on with the next
    "Review: ..." on a new line, whose words are not its answer. A negated label ("not positive", "isn't
    negative") is not read as its opposite; it makes the answer unparseable.
    """
    first_line = text.strip().split("\n", 1)[0].lower()
    words = _WORD.findall(first_line.replace("\u2019", "'"))
    named = set()
    for j, word in enumerate(words):
        for label, synonyms in _SYNONYMS[task].items():
            if word in synonyms:
                if j > 0 and words[j - 1] in _NEGATIONS:
                    return None
                named.add(label)
    return named.pop() if len(named) == 1 else None


@dataclass(frozen=True)
class Example:
    fields: Tuple[str, ...]
    """(review,) for sentiment; (premise, hypothesis) for NLI."""
    label: str
    where: str = field(default="", compare=False)
    """Where the example came from (``file, line N``), for one-line errors about it; not part of its identity."""
