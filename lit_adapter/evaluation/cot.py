"""Chain-of-thought prompting for the classification and MMLU evaluations, and reading the answer back.

* Few-shot CoT (Wei et al. 2022, https://arxiv.org/abs/2201.11903): every demonstration shows a rationale and then
  the answer; the model continues the query's "Reasoning:" (classification) or "Answer: Let's think step by step."
  (MMLU) with its own rationale and answer, and the answer is read from the end of what it wrote.
* Zero-shot CoT (Kojima et al. 2022, https://arxiv.org/abs/2205.11916): two stages. The query ends with "Let's think
  step by step."; the model's rationale is generated up to a blank line; then the prompt, the rationale and an
  answer-extraction trigger ("Therefore, the sentiment (positive or negative) is" / "Therefore, among A through D,
  the answer is") are fed back, and the short continuation is parsed.

Demonstrations with rationales come from a JSON-lines file (``--cot_file``: for classification the example's fields
(``text`` or ``premise``/``hypothesis``), ``rationale`` and ``label``; for MMLU ``question``, ``choices`` (4),
``answer`` (A-D or 0-3), ``rationale`` and optionally ``subject``); for sentiment and NLI a few written here
(:data:`BUILTIN_DEMOS`, plain reasoning, no claim of being optimal) serve when no file is given.

Answer extraction is deliberately strict about what counts as an answer and lenient about how it is written: the
*last* answer statement wins ("... so it is positive. Sentiment: negative" reads negative), an answer that names
several labels or none is no answer (counted wrong and reported as such), and for MMLU a bare capital letter is
only an answer where it cannot be the article "A" ("A man ..."). :func:`extract_label` and :func:`extract_letter`
are tested on messy generations in tests/test_cot.py. The MMLU prompts and loop that use them live in
:mod:`lit_adapter.evaluation.mmlu` (which imports this module, never the other way round).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple


from lit_adapter.errors import UserError
from lit_adapter.evaluation.labels import LABELS, Example, parse_label

STYLES = ("none", "few_shot", "zero_shot")
STEP_BY_STEP = "Let's think step by step."
CUES = {"sentiment": "Sentiment:", "nli": "Relation:"}
TRIGGERS = {
    "sentiment": "Therefore, the sentiment (positive or negative) is",
    "nli": "Therefore, the relation (entailment, neutral or contradiction) is",
    "mmlu": "Therefore, among A through D, the answer is",
}
HEADERS = {
    "sentiment": "Classify the sentiment of each movie review as positive or negative, reasoning first.\n\n",
    "nli": "Decide whether each premise entails the hypothesis (entailment, neutral or contradiction), reasoning "
           "first.\n\n",
}
QUESTIONS = {
    "sentiment": "Is the sentiment of the review positive or negative?",
    "nli": "Does the premise entail the hypothesis, contradict it, or neither (neutral)?",
}


@dataclass(frozen=True)
class Rationale:
    """A demonstration: the example and the reasoning that leads to its label."""

    example: Example
    rationale: str


BUILTIN_DEMOS = {
    "sentiment": [
        Rationale(Example(("a gorgeous, witty, seductive movie .",), "positive"),
                  "The reviewer calls the film gorgeous, witty and seductive, all words of praise."),
        Rationale(Example(("the plot is nothing but boilerplate clichés from start to finish .",), "negative"),
                  "Calling the plot boilerplate clichés from start to finish is a complaint about the film."),
        Rationale(Example(("it's not a great film , but it's a warm and likable one .",), "positive"),
                  "The reviewer admits it is not great, but ends on warm and likable, so the verdict is favourable."),
        Rationale(Example(("an ambitious film that never quite comes together .",), "negative"),
                  "Ambitious is faint praise here: the point is that the film never comes together, a failure."),
    ],
    "nli": [
        Rationale(Example(("A man inspects the uniform of a figure in some East Asian country.",
                           "The man is looking at something."), "entailment"),
                  "Inspecting a uniform means looking at it, so the hypothesis follows from the premise."),
        Rationale(Example(("A soccer game with multiple males playing.", "Some men are sleeping."), "contradiction"),
                  "Men who are playing a soccer game are not sleeping, so the two cannot both be true."),
        Rationale(Example(("A woman is walking across the street eating a banana.", "The woman is late for work."),
                          "neutral"),
                  "Walking and eating a banana says nothing about being late for work; it may or may not be true."),
    ],
}


def check_style(style: str) -> str:
    if style not in STYLES:
        raise UserError(f"unknown --cot {style!r}; choose {', '.join(STYLES)}")
    return style


# ----------------------------------------------------------------------------------------------------------------------
# answer extraction

_ANSWER_IS = re.compile(r"(?:answer|sentiment|relation|label)\s*(?:is|:|=|would be|should be)\s*", re.IGNORECASE)


def extract_label(text: str, task: str) -> Optional[str]:
    """The label a (possibly rambling) generation ends up answering, or ``None``.

    The last answer statement counts: the task's cue ("Sentiment:"/"Relation:") or "the answer is ...", read up to
    the end of its line with :func:`parse_label` (negations and several labels are no answer). Without any answer
    statement, the first line is read as a bare answer (a zero-shot CoT second stage continues "... is" directly).
    """
    cues = [m.end() for m in re.finditer(re.escape(CUES[task]), text)]
    cues += [m.end() for m in _ANSWER_IS.finditer(text)]
    for start in sorted(cues, reverse=True):
        label = parse_label(text[start:].split("\n", 1)[0], task)
        if label is not None:
            return label
        if text[start:].strip():  # the last statement names no single label: that is the answer, a bad one
            return None
    return None if cues else parse_label(text, task)


_LETTER_PATTERNS = [
    re.compile(r"answer\s*(?:is|:)\s*(?:option\s*)?\(?([ABCD])\b\)?", re.IGNORECASE),  # "the answer is (B)"
    re.compile(r"\(([ABCD])\)"),  # "(C)"
    re.compile(r"(?:^|\s)([ABCD])(?:[.):]|\s*$)"),  # "D." "B)" "C:" or a letter closing the text
]


def extract_letter(text: str, choices: Optional[Sequence[str]] = None) -> Optional[int]:
    """The index 0-3 of the option a generation answers, or ``None``.

    In order: the last "answer is X"/"Answer: X", the last "(X)", the last letter written as "X." / "X)" / "X:" or
    ending the text; then, if ``choices`` are given and exactly one choice's text appears, that choice. A bare "A"
    inside a sentence ("A man walks") is never an answer.
    """
    for pattern in _LETTER_PATTERNS:
        found = pattern.findall(text)
        if found:
            return "ABCD".index(found[-1].upper())
    if choices:
        named = [i for i, c in enumerate(choices) if c.strip() and c.strip().lower() in text.lower()]
        if len(named) == 1:
            return named[0]
    return None


# ----------------------------------------------------------------------------------------------------------------------
# demonstrations


def load_classification_demos(path: Optional[Path], task: str) -> List[Rationale]:
    """The rationale demonstrations of ``path`` (JSON lines), or the built-in ones for ``task``."""
    if path is None:
        return list(BUILTIN_DEMOS[task])
    demos = []
    for where, row in read_rows(Path(path)):
        fields = (row.get("premise"), row.get("hypothesis")) if task == "nli" else (row.get("text"),)
        if any(f is None for f in fields) or "rationale" not in row or "label" not in row:
            needs = "premise, hypothesis" if task == "nli" else "text"
            raise UserError(f"{where}: a CoT demonstration needs {needs}, rationale and label")
        label = str(row["label"]).strip().lower()
        if label not in LABELS[task]:
            raise UserError(f"{where}: label {label!r} is not one of {', '.join(LABELS[task])}")
        demos.append(Rationale(Example(tuple(str(f) for f in fields), label), str(row["rationale"]).strip()))
    return demos


def read_rows(path: Path):
    """``(where, record)`` of a JSON-lines file; ``where`` names the file and line."""
    if not path.is_file():
        raise UserError(f"CoT demonstrations not found: {path}")
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                yield f"{path}, line {i}", json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}, line {i}: invalid JSON ({err.msg})") from None


# ----------------------------------------------------------------------------------------------------------------------
# prompts


def _query(task: str, example: Example) -> str:
    if task == "sentiment":
        return f"Review: {example.fields[0]}\n"
    return f"Premise: {example.fields[0]}\nHypothesis: {example.fields[1]}\n"


def few_shot_prompt(task: str, demos: Sequence[Rationale], example: Example) -> str:
    """Header, demonstrations (example, "Reasoning: ...", the answer cue and label), the example and "Reasoning:"."""
    shots = "".join(f"{_query(task, d.example)}Reasoning: {d.rationale}\n{CUES[task]} {d.example.label}\n\n"
                    for d in demos)
    return HEADERS[task] + shots + _query(task, example) + "Reasoning:"


def zero_shot_prompt(task: str, example: Example) -> str:
    """Kojima et al.'s first stage: the question, then "Answer: Let's think step by step."."""
    return f"{_query(task, example)}Question: {QUESTIONS[task]}\nAnswer: {STEP_BY_STEP}"


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int, temperature: float = 0.0,
                  stop: Sequence[str] = ()) -> str:
    """The model's continuation of ``prompt`` (BOS first; the prompt's end kept when it is too long), cut at the
    first ``stop`` string; generation stops there too."""
    from lit_adapter.generation.decode import generate_tokens, real_window

    device = next(model.parameters()).device
    ids = tokenizer.encode(prompt, bos=True)
    room = real_window(model) - max_new_tokens
    if ids.numel() > room:
        ids = ids[-room:]
    new: List[int] = []
    for token in generate_tokens(model, ids.to(device), max_new_tokens, temperature, eos_id=tokenizer.eos_id):
        if token.item() == tokenizer.eos_id:
            break
        new.append(token.item())
        if stop:
            text = tokenizer.decode(new)
            if any(s in text for s in stop):
                break
    text = tokenizer.decode(new)
    for s in stop:
        text = text.split(s, 1)[0]
    return text


def classify_with_cot(model, tokenizer, task: str, example: Example, style: str, demos: Sequence[Rationale],
                      rationale_tokens: int = 64, answer_tokens: int = 5,
                      temperature: float = 0.0) -> Tuple[str, Optional[str]]:
    """``(what the model wrote, the label read from it)`` with few-shot or zero-shot CoT."""
    if style == "few_shot":
        text = generate_text(model, tokenizer, few_shot_prompt(task, demos, example),
                             rationale_tokens + answer_tokens, temperature, stop=("\n\n",))
        return text, extract_label(text, task)
    prompt = zero_shot_prompt(task, example)
    rationale = generate_text(model, tokenizer, prompt, rationale_tokens, temperature, stop=("\n\n",))
    answer = generate_text(model, tokenizer, f"{prompt}{rationale}\n{TRIGGERS[task]}", answer_tokens, temperature,
                           stop=("\n",))
    return f"{rationale}\n{TRIGGERS[task]}{answer}", extract_label(answer, task)
