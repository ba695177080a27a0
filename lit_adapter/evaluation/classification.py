"""Classification accuracy by generation with in-context examples: sentiment (Rotten Tomatoes) and NLI (MultiNLI).

Brown et al. 2020, "Language Models are Few-Shot Learners" (https://arxiv.org/abs/2005.14165): the task is
shown as text, optionally after k solved demonstrations, and the model's free-form continuation is read back as a
label. Zero-, one- and few-shot prompts differ only in the number of demonstrations; they are drawn with a fixed
seed from a pool that is disjoint from the evaluated examples, so every model sees the same prompts.

Seed 002's NLI prompt (``prompt="seed002"``) is its wording exactly: ``Premise: ...``, ``Hypothesis: ...``, then
"Does the hypothesis follow from the premise? Answer (yes, no, maybe):"; yes, maybe and no read as entailment,
neutral and contradiction, and its one-shot demonstration is the seed's own (the man inspecting a uniform, "yes").
An answer that is none of them is "no answer": wrong, counted, never dropped (the seed's baseline is 0, not 1/3).

A base model gets a plain prompt ("Review: ...\\nSentiment:"); an instruction-tuned checkpoint gets the same
content inside the Alpaca template it was trained on (:func:`lit_adapter.data.prompts.generate_prompt`). The answer is
parsed robustly (:func:`parse_label`: case, punctuation, extra words, synonyms such as yes/maybe/no for NLI); an
answer that names no label, or more than one, counts as wrong and is reported as "no answer".

Data: Pang & Lee's sentence polarity v1.0 (``rt-polarity.pos``/``.neg``, Latin-1, one snippet per line) and
MultiNLI's ``validation_matched`` (hub ``nyu-mll/multi_nli``) or a local JSON/JSONL/TSV file.
"""

from __future__ import annotations

import csv
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from lit_adapter.errors import UserError
from lit_adapter.evaluation.labels import LABELS, TASKS, Example, parse_label  # noqa: F401 (their home before)

POOL_SIZE = 200
"""Examples set aside (after the seeded shuffle) as the demonstration pool; the rest are evaluated."""

# ----------------------------------------------------------------------------------------------------------------------
# data


def load_sentiment(data_dir: Path) -> List[Example]:
    folder = data_dir / "rotten_tomatoes"
    examples = []
    for label, suffix in (("positive", "pos"), ("negative", "neg")):
        path = folder / f"rt-polarity.{suffix}"
        if not path.is_file():
            raise UserError(
                f"sentiment dataset: {path} not found (Pang & Lee's rt-polarity.pos/.neg); pass --data_dir with a "
                "rotten_tomatoes/ folder holding them"
            )
        # split on "\n" only: str.splitlines would also break at "\x85", a character of these Latin-1 files
        lines = path.read_text(encoding="latin-1").split("\n")
        examples += [Example((line.strip(),), label) for line in lines if line.strip()]
    return examples


_NLI_NAMES = {"0": "entailment", "1": "neutral", "2": "contradiction"}


def _nli_example(premise, hypothesis, label, where: str) -> Optional[Example]:
    label = str(label).strip().lower()
    label = _NLI_NAMES.get(label, label)
    if label in ("-1", "-", ""):  # MultiNLI's examples without a gold label
        return None
    if label not in LABELS["nli"]:
        raise UserError(f"{where}: label {label!r} is not entailment/neutral/contradiction (or 0/1/2)")
    return Example((str(premise).strip(), str(hypothesis).strip()), label)


def load_nli_file(path: Path) -> List[Example]:
    """A JSON array, JSON lines or a TSV with premise/hypothesis/label (or MultiNLI's own column names
    sentence1/sentence2/gold_label); labels are names or MultiNLI's 0/1/2, and "-"/-1 (no gold label) is skipped."""
    if not path.is_file():
        raise UserError(f"NLI file not found: {path}")
    where: Dict[int, str] = {}  # record number -> where it is in the file, when that is not "record i"
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".tsv":
            rows = list(csv.DictReader(text.splitlines(), delimiter="\t", quoting=csv.QUOTE_NONE))
            where = {i: f"line {i + 1}" for i in range(1, len(rows) + 1)}  # after the header
        elif text.lstrip().startswith("["):
            rows = json.loads(text)
        else:  # JSON lines: each record is named by its line (a broken one is not "line 1 column 84")
            numbered = [(i, line) for i, line in enumerate(text.splitlines(), start=1) if line.strip()]
            rows = []
            for number, line in numbered:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise UserError(f"{path}, line {number}: invalid JSON ({err.msg} at column {err.colno})") from None
                where[len(rows)] = f"line {number}"
    except (UnicodeDecodeError, json.JSONDecodeError, csv.Error) as err:
        raise UserError(f"cannot read NLI file {path}: {err}") from None
    examples = []
    for i, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise UserError(f"{path}, {where.get(i, f'record {i}')}: a record must be an object with premise, "
                            "hypothesis and label")
        premise = row.get("premise", row.get("sentence1"))
        hypothesis = row.get("hypothesis", row.get("sentence2"))
        label = row.get("label", row.get("gold_label"))
        if premise is None or hypothesis is None or label is None:
            raise UserError(f"{path}, {where.get(i, f'record {i}')}: needs premise, hypothesis and label (or "
                            "sentence1/sentence2/gold_label)")
        example = _nli_example(premise, hypothesis, label, f"{path}, {where.get(i, f'record {i}')}")
        if example is not None:
            examples.append(example)
    return examples


def load_nli_hub() -> List[Example]:
    try:
        from datasets import load_dataset

        rows = load_dataset("nyu-mll/multi_nli", split="validation_matched")
    except Exception as err:  # offline, hub down: one clear line
        first_line = (str(err).strip().splitlines() or [""])[0]
        raise UserError(
            f"nli dataset: cannot load nyu-mll/multi_nli from the Hugging Face hub ({type(err).__name__}: "
            f"{first_line}); offline? pass --nli_file with a local JSON/JSONL/TSV (premise, hypothesis, label)"
        ) from None
    examples = [_nli_example(r["premise"], r["hypothesis"], r["label"], "multi_nli") for r in rows]
    return [e for e in examples if e is not None]


def split_pool(
    examples: Sequence[Example], seed: int, pool_size: int = POOL_SIZE
) -> Tuple[List[Example], List[Example]]:
    """``(pool, evaluated)``: a seeded shuffle, the first ``pool_size`` examples kept for demonstrations."""
    shuffled = list(examples)
    random.Random(seed).shuffle(shuffled)
    pool_size = min(pool_size, len(shuffled) // 2)
    return shuffled[:pool_size], shuffled[pool_size:]


def draw_demonstrations(pool: Sequence[Example], shots: int, seed: int, index: int) -> List[Example]:
    """``shots`` demonstrations for evaluated example ``index``: a fixed function of (seed, index), so the same
    example gets the same prompt however many examples are evaluated."""
    if shots > len(pool):
        raise UserError(f"--shots {shots} but the demonstration pool has only {len(pool)} examples")
    return random.Random(seed * 1_000_003 + index).sample(list(pool), shots)


# ----------------------------------------------------------------------------------------------------------------------
# prompts

INSTRUCTIONS = {
    "sentiment": "Classify the sentiment of the last movie review as positive or negative.",
    "nli": "Does the premise entail the hypothesis? Answer entailment, neutral or contradiction.",
}
SEED002_QUESTION = "Does the hypothesis follow from the premise? Answer (yes, no, maybe):"
SEED002_ANSWERS = {"entailment": "yes", "neutral": "maybe", "contradiction": "no"}
SEED002_DEMONSTRATION = Example(("A man inspects the uniform of a figure in some East Asian country.",
                                 "The man is looking at something."), "entailment")
"""The seed's one-shot demonstration (its label "yes")."""
PROMPTS = ("default", "seed002")
_HEADERS = {
    "sentiment": "Classify the sentiment of each movie review as positive or negative.\n\n",
    "nli": "Decide whether each premise entails the hypothesis: entailment, neutral or contradiction.\n\n",
}


def _render(task: str, example: Example, with_label: bool, prompt: str = "default") -> str:
    if prompt == "seed002":
        text = f"Premise: {example.fields[0]}\nHypothesis: {example.fields[1]}\n{SEED002_QUESTION}"
        return text + f" {SEED002_ANSWERS[example.label]}\n\n" if with_label else text
    if task == "sentiment":
        text = f"Review: {example.fields[0]}\nSentiment:"
    else:
        text = f"Premise: {example.fields[0]}\nHypothesis: {example.fields[1]}\nRelation:"
    return text + f" {example.label}\n\n" if with_label else text


def build_prompt(task: str, demonstrations: Sequence[Example], example: Example, template: str,
                 prompt: str = "default") -> str:
    """``plain``: header, demonstrations, the example ending in "Sentiment:"/"Relation:". ``instruction``: the
    Alpaca template with the task as instruction and the demonstrations and example as input. ``prompt="seed002"``
    (NLI, plain): the seed's wording, no header, each demonstration answered yes/maybe/no."""
    if prompt == "seed002":
        return "".join(_render(task, d, True, prompt) for d in demonstrations) + _render(task, example, False, prompt)
    shots = "".join(_render(task, d, True) for d in demonstrations)
    if template == "plain":
        return _HEADERS[task] + shots + _render(task, example, False)
    from lit_adapter.data.prompts import InstructionRecord, generate_prompt

    query = _render(task, example, False).rsplit("\n", 1)[0]  # without the trailing "Sentiment:"
    return generate_prompt(InstructionRecord(instruction=INSTRUCTIONS[task], input=shots + query))


# ----------------------------------------------------------------------------------------------------------------------
# evaluation


@dataclass
class ClassificationResult:
    task: str
    shots: int
    template: str
    examples: int
    correct: int
    accuracy: float
    no_answer: int
    no_answer_rate: float
    per_label: Dict[str, Dict[str, int]]
    """gold label -> {"n", "correct", and the count of each predicted label plus "none"}: a confusion matrix."""
    truncated_prompts: int
    seconds: float


def _fit(tokenizer, task, demos, example, template, room: int, prompt: str = "default") -> Tuple[torch.Tensor, bool]:
    """Drops demonstrations (the first ones first) until the prompt fits ``room`` tokens; as a last resort keeps
    the prompt's end, where the example and the answer cue are."""
    kept = list(demos)
    while True:
        ids = tokenizer.encode(build_prompt(task, kept, example, template, prompt), bos=True)
        if ids.numel() <= room:
            return ids, len(kept) < len(demos)
        if not kept:
            return ids[-room:], True
        kept = kept[1:]


def evaluate_classification(
    model: torch.nn.Module,
    tokenizer,
    task: str,
    examples: Sequence[Example],
    shots: int = 0,
    template: str = "plain",
    max_examples: Optional[int] = None,
    max_new_tokens: int = 5,
    temperature: float = 0.0,
    seed: int = 42,
    pool: Optional[Sequence[Example]] = None,
    cot: str = "none",
    cot_demos: Optional[Sequence] = None,
    rationale_tokens: int = 64,
    prompt: str = "default",
) -> Tuple[ClassificationResult, List[Dict]]:
    """Accuracy by generation on ``examples``: ``shots`` demonstrations drawn from a seeded pool of them (or from
    ``pool``, in which case every one of ``examples`` is evaluated, in order), or chain-of-thought prompts
    (``cot``: ``few_shot`` with ``cot_demos`` rationales, ``zero_shot``; :mod:`lit_adapter.evaluation.cot`)."""
    from lit_adapter.evaluation.cot import check_style, classify_with_cot, load_classification_demos
    from lit_adapter.generation.decode import generate_tokens

    if task not in TASKS:
        raise UserError(f"unknown --task {task!r}; choose {' or '.join(TASKS)}")
    if shots < 0:
        raise UserError(f"--shots must be >= 0, got {shots}")
    if max_new_tokens < 1:
        raise UserError(f"--max_new_tokens must be >= 1, got {max_new_tokens}")
    check_style(cot)
    check_prompt(prompt, task, shots, template, cot)
    if cot == "few_shot" and cot_demos is None:
        cot_demos = load_classification_demos(None, task)
    if pool is None:  # seed 002's prompt brings its own demonstration: no pool is set aside
        pool, evaluated = split_pool(examples, seed, 0 if prompt == "seed002" else POOL_SIZE)
    else:
        pool, evaluated = list(pool), list(examples)
    if max_examples is not None:
        evaluated = evaluated[:max_examples]
    if not evaluated:
        raise UserError(f"no {task} examples to evaluate")
    from lit_adapter.generation.decode import real_window

    room = real_window(model) - max_new_tokens
    device = next(model.parameters()).device
    torch.manual_seed(seed)

    labels = LABELS[task]
    per_label = {g: {"n": 0, "correct": 0, **{p: 0 for p in labels}, "none": 0} for g in labels}
    records, correct, none, truncated = [], 0, 0, 0
    t0 = time.perf_counter()
    for i, example in enumerate(evaluated):
        if cot != "none":  # the rationale, then the answer read from its end
            answer, predicted = classify_with_cot(model, tokenizer, task, example, cot, cot_demos or (),
                                                  rationale_tokens, max_new_tokens, temperature)
        else:
            if prompt == "seed002":  # the seed's own demonstration (shots is 0 or 1)
                demos = [SEED002_DEMONSTRATION] * shots
            else:
                demos = draw_demonstrations(pool, shots, seed, i)
            ids, cut = _fit(tokenizer, task, demos, example, template, room, prompt)
            truncated += cut
            new = [t.item() for t in generate_tokens(model, ids.to(device), max_new_tokens, temperature,
                                                     eos_id=tokenizer.eos_id)]
            answer = tokenizer.decode([t for t in new if t != tokenizer.eos_id])
            predicted = parse_label(answer, task)
        per_label[example.label]["n"] += 1
        per_label[example.label][predicted or "none"] += 1
        correct += predicted == example.label
        per_label[example.label]["correct"] += predicted == example.label
        none += predicted is None
        records.append({"label": example.label, "answer": answer, "predicted": predicted})
    n = len(evaluated)
    result = ClassificationResult(
        task=task, shots=len(cot_demos or ()) if cot == "few_shot" else shots, template=template, examples=n, correct=correct, accuracy=correct / n,
        no_answer=none, no_answer_rate=none / n, per_label=per_label, truncated_prompts=truncated,
        seconds=time.perf_counter() - t0,
    )
    return result, records


def check_prompt(prompt: str, task: str, shots: int, template: str, cot: str) -> None:
    """Seed 002's prompt is an NLI question in plain text with at most its one demonstration."""
    if prompt not in PROMPTS:
        raise UserError(f"unknown --prompt {prompt!r}; choose {' or '.join(PROMPTS)}")
    if prompt == "seed002" and (task != "nli" or shots > 1 or template != "plain" or cot != "none"):
        raise UserError("--prompt seed002 is seed 002's NLI question, zero- or one-shot (its one demonstration), "
                        f"plain text: got task {task}, {shots} shots, template {template}, cot {cot}")


def run_classification(
    checkpoint_dir: Path,
    adapter_dir: Optional[Path] = None,
    task: str = "sentiment",
    shots: int = 0,
    template: str = "auto",
    max_examples: Optional[int] = None,
    max_new_tokens: int = 5,
    temperature: float = 0.0,
    seed: int = 42,
    data_dir: Optional[Path] = None,
    nli_file: Optional[Path] = None,
    out_file: Optional[Path] = None,
    quantize: Optional[str] = None,
    precision: Optional[str] = None,
    device: Optional[str] = None,
    cot: str = "none",
    cot_file: Optional[Path] = None,
    rationale_tokens: int = 64,
    prompt: str = "default",
) -> Dict:
    """Loads data and model, evaluates, prints the summary and writes the JSON report."""
    from lit_adapter.evaluation.cot import check_style, load_classification_demos

    from lit_adapter.evaluation import DEFAULT_DATA_DIR, describe_model, load_model, run_info, write_json

    if task not in TASKS:
        raise UserError(f"unknown --task {task!r}; choose {' or '.join(TASKS)}")
    if template == "auto":
        template = "instruction" if adapter_dir is not None and prompt == "default" else "plain"
    if template not in ("plain", "instruction"):
        raise UserError(f"unknown --template {template!r}; choose auto, plain or instruction")
    check_prompt(prompt, task, shots, template, cot)
    if task == "sentiment":
        source = Path(data_dir) if data_dir is not None else DEFAULT_DATA_DIR
        examples = load_sentiment(source)
        source = str(source / "rotten_tomatoes")
    elif nli_file is not None:
        examples, source = load_nli_file(Path(nli_file)), str(nli_file)
    else:
        examples, source = load_nli_hub(), "hub: nyu-mll/multi_nli validation_matched"
    demos = load_classification_demos(cot_file, task) if check_style(cot) == "few_shot" else None
    config, model, tokenizer, spec, dev = load_model(checkpoint_dir, adapter_dir, quantize, precision, device)

    result, records = evaluate_classification(model, tokenizer, task, examples, shots, template, max_examples,
                                              max_new_tokens, temperature, seed, cot=cot, cot_demos=demos,
                                              rationale_tokens=rationale_tokens, prompt=prompt)
    style = (f"{cot.replace('_', '-')} CoT" if cot != "none" else
             f"{shots}-shot, {'seed 002' if prompt == 'seed002' else template} prompt")
    print(f"{task}, {style}: accuracy {result.accuracy:.4f} "
          f"({result.correct}/{result.examples}), no answer {result.no_answer_rate:.4f}, {result.seconds:.1f} s")
    for gold, counts in result.per_label.items():
        others = ", ".join(f"{k} {v}" for k, v in counts.items() if k not in ("n", "correct"))
        print(f"  {gold}: {counts['correct']}/{counts['n']} correct; predicted: {others}")
    report = {
        **describe_model(checkpoint_dir, adapter_dir, spec), "data": source, "seed": seed,
        "max_new_tokens": max_new_tokens, "temperature": temperature, "cot": cot, "prompt": prompt,
        "cot_demonstrations": str(cot_file) if cot_file else ("built-in" if cot == "few_shot" else None),
        **result.__dict__,
        "answers": records, "run": run_info(dev),
    }
    if out_file is not None:
        print(f"wrote {write_json(out_file, report)}")
    return report
