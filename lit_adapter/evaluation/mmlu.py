"""MMLU: k-shot multiple-choice accuracy by the likelihood of the answer letter.

Hendrycks et al. 2021, "Measuring Massive Multitask Language Understanding" (https://arxiv.org/abs/2009.03300),
evaluation code ``hendrycks/test``. The prompt of a question is

    "The following are multiple choice questions (with answers) about {subject}.\\n\\n"
    + k dev examples, each "{question}\\nA. {a}\\nB. {b}\\nC. {c}\\nD. {d}\\nAnswer: {letter}\\n\\n"
    + the test question in the same format, ending with "Answer:"

where ``{subject}`` is the file name with each ``_`` turned into a space *and a leading space*
(Hendrycks' ``format_subject``: "about  abstract algebra." has two spaces; we keep it). The predicted answer
is the letter among A-D whose continuation " A" ... " D" the model finds most likely after "Answer:" (the sum of
the log-probabilities of the continuation's tokens). With the LLaMA tokenizer each continuation is one token and
this is the comparison of four next-token logits after one forward pass per question; a tokenizer that splits some
letters (llama2.c's 512-piece vocabulary has "▁B" but encodes " A" as "▁", "A") gets one pass per letter.
When the prompt is longer than the model's context the
number of shots is reduced (Hendrycks: ``while too long: k -= 1``, keeping the first k dev examples).

Per-subject accuracy, their mean (macro) and the accuracy over all questions (micro) are reported.

``style="helm"`` asks the questions the way HELM's MMLU scenario does (crfm-helm's ``mmlu`` run spec: the
multiple-choice-joint adapter, 5 in-context examples, docs/evaluation.md sets the two side by side): the header
names the subject with single spaces, every question is prefixed ``Question: ``, and the shots are the dev examples
in the order HELM's ``InContextLearningAdapter.sample_examples`` draws them (seed 0: labels cycled, ties shuffled)
rather than the file's. HELM scores by greedy generation (exact match of the generated letter) where we compare
the four letters' likelihoods; on the single-token path the report also gives the greedy token's exact match,
HELM's number for a model whose first generated token is the whole answer.
"""

from __future__ import annotations

import csv
import io
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from lit_adapter.errors import UserError

LETTERS = ("A", "B", "C", "D")
# the 57 subjects of the benchmark (the config names of cais/mmlu, the file stems of hendrycks/test)
SUBJECTS = (
    'abstract_algebra', 'anatomy', 'astronomy', 'business_ethics', 'clinical_knowledge', 'college_biology',
    'college_chemistry', 'college_computer_science', 'college_mathematics', 'college_medicine',
    'college_physics', 'computer_security', 'conceptual_physics', 'econometrics', 'electrical_engineering',
    'elementary_mathematics', 'formal_logic', 'global_facts', 'high_school_biology', 'high_school_chemistry',
    'high_school_computer_science', 'high_school_european_history', 'high_school_geography',
    'high_school_government_and_politics', 'high_school_macroeconomics', 'high_school_mathematics',
    'high_school_microeconomics', 'high_school_physics', 'high_school_psychology', 'high_school_statistics',
    'high_school_us_history', 'high_school_world_history', 'human_aging', 'human_sexuality',
    'international_law', 'jurisprudence', 'logical_fallacies', 'machine_learning', 'management', 'marketing',
    'medical_genetics', 'miscellaneous', 'moral_disputes', 'moral_scenarios', 'nutrition', 'philosophy',
    'prehistory', 'professional_accounting', 'professional_law', 'professional_medicine',
    'professional_psychology', 'public_relations', 'security_studies', 'sociology', 'us_foreign_policy',
    'virology', 'world_religions',
)
REFORMATTED_HEADER = ["question", "choice0", "choice1", "choice2", "choice3", "answer"]
PROMPT_STYLES = ("hendrycks", "helm")
"""hendrycks: the benchmark's own evaluate.py (and lm-eval's); helm: HELM's mmlu scenario (docs/evaluation.md)."""


@dataclass(frozen=True)
class Question:
    question: str
    choices: Tuple[str, str, str, str]
    answer: int
    """Index 0-3 of the correct choice."""


# ----------------------------------------------------------------------------------------------------------------------
# data


def read_csv(path: Union[str, Path]) -> List[Question]:
    """Questions of one MMLU CSV, in Hendrycks' original format (no header, answer letter A-D) or the reformatted
    one (header ``question,choice0,choice1,choice2,choice3,answer``, answer index 0-3)."""
    path = Path(path)
    try:
        rows = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8"))))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise UserError(f"cannot read MMLU file {path}: {err}") from None
    if rows and [c.strip() for c in rows[0]] == REFORMATTED_HEADER:
        rows = rows[1:]
    questions = []
    for line, row in enumerate(rows, start=1):
        if not row:
            continue
        if len(row) != 6:
            raise UserError(f"{path}, row {line}: expected 6 columns (question, 4 choices, answer), found {len(row)}")
        answer = row[5].strip()
        if answer in LETTERS:
            index = LETTERS.index(answer)
        elif answer in ("0", "1", "2", "3"):
            index = int(answer)
        else:
            raise UserError(f"{path}, row {line}: answer {answer!r} is neither a letter A-D nor an index 0-3")
        questions.append(Question(row[0], tuple(row[1:5]), index))
    return questions


def local_subjects(data_dir: Path) -> List[str]:
    return sorted(p.name[: -len("_test.csv")] for p in (data_dir / "test").glob("*_test.csv"))


def load_subject(subject: str, data_dir: Optional[Path]) -> Tuple[List[Question], List[Question]]:
    """``(dev, test)`` questions of ``subject`` from ``data_dir/{dev,test}/`` or the ``cais/mmlu`` hub dataset."""
    if data_dir is not None:
        dev_path, test_path = data_dir / "dev" / f"{subject}_dev.csv", data_dir / "test" / f"{subject}_test.csv"
        for path in (dev_path, test_path):
            if not path.is_file():
                raise UserError(f"MMLU subject {subject}: {path} not found (expected {data_dir}/dev and /test CSVs)")
        return read_csv(dev_path), read_csv(test_path)
    try:
        from datasets import load_dataset

        splits = load_dataset("cais/mmlu", subject)
        dev, test = splits["dev"], splits["test"]
    except Exception as err:  # offline or unknown subject: one clear line either way
        first_line = (str(err).strip().splitlines() or [""])[0]
        raise UserError(
            f"MMLU subject {subject}: cannot load cais/mmlu from the Hugging Face hub ({type(err).__name__}: "
            f"{first_line}); offline? pass --data_dir with dev/ and test/ CSV folders"
        ) from None
    convert = lambda rows: [Question(r["question"], tuple(r["choices"]), int(r["answer"])) for r in rows]  # noqa
    return convert(dev), convert(test)


# ----------------------------------------------------------------------------------------------------------------------
# prompts


def format_subject(subject: str) -> str:
    return "".join(" " + part for part in subject.split("_"))


def format_question(q: Question, with_answer: bool) -> str:
    text = q.question + "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, q.choices))
    text += "\nAnswer:"
    return text + f" {LETTERS[q.answer]}\n\n" if with_answer else text


def build_prompt(subject: str, shots: Sequence[Question], question: Question) -> str:
    header = f"The following are multiple choice questions (with answers) about {format_subject(subject)}.\n\n"
    return header + "".join(format_question(s, True) for s in shots) + format_question(question, False)


def build_helm_prompt(subject: str, shots: Sequence[Question], question: Question) -> str:
    """HELM's multiple-choice-joint prompt: its instructions line, then each block ``Question: ...`` with the
    lettered choices and ``Answer: X``, blocks joined by a blank line, the last ending with ``Answer:``."""
    header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n"
    blocks = [header] + [_helm_block(s) + f" {LETTERS[s.answer]}\n" for s in shots] + [_helm_block(question)]
    return "\n".join(blocks)


def _helm_block(q: Question) -> str:
    return f"Question: {q.question}\n" + "".join(f"{letter}. {choice}\n" for letter, choice in zip(LETTERS, q.choices)) \
        + "Answer:"


def helm_shots(dev: Sequence[Question], k: int, seed: int = 0) -> List[Question]:
    """The ``k`` in-context examples HELM draws from ``dev`` for its train trial ``seed``, in its order.

    The same draw as HELM's ``InContextLearningAdapter.sample_examples`` (``sample_train=True``): group the examples
    by their correct answer's text, order those labels by how many examples have them (most first; equal counts
    sorted by text, then shuffled), and take one random example per label in turn until there are ``k``; all from
    a ``random.Random(seed)`` stream consumed call for call as HELM consumes the global one.
    """
    rng = random.Random(seed)
    wanted = min(len(dev), k)
    by_label: Dict[str, List[Question]] = {}
    for q in dev:
        by_label.setdefault(q.choices[q.answer], []).append(q)
    by_count: Dict[int, List[str]] = {}
    for label in sorted(by_label):
        by_count.setdefault(len(by_label[label]), []).append(label)
    order: List[str] = []
    for count in sorted(by_count, reverse=True):
        labels = by_count[count]
        rng.shuffle(labels)
        order.extend(labels)
    shots: List[Question] = []
    turn = 0
    while wanted > 0 and order:
        label = order[turn % len(order)]
        turn += 1
        if not label:  # HELM stops at an empty label text
            break
        pool = by_label[label]
        if not pool:
            continue
        shots.append(pool.pop(rng.randrange(len(pool))))
        wanted -= 1
    return shots


def _continuation(tokenizer, prompt: str, prompt_ids: List[int], text: str) -> List[int]:
    """Tokens that ``text`` adds after ``prompt`` (encoding the whole, as lm-eval does: " A" alone would get a
    dummy-prefix space of its own)."""
    whole = tokenizer.encode(prompt + text, bos=True).tolist()
    if whole[: len(prompt_ids)] != prompt_ids:
        raise UserError(f"the tokenizer merges {text!r} with the end of the prompt; cannot score the answer letter")
    return whole[len(prompt_ids) :]


def letter_query(tokenizer, prompt: str) -> Tuple[torch.Tensor, List[List[int]]]:
    """BOS + the prompt's token ids, and the tokens each answer " A".." D" adds after it."""
    prompt_ids = tokenizer.encode(prompt, bos=True).tolist()
    return torch.tensor(prompt_ids), [_continuation(tokenizer, prompt, prompt_ids, f" {letter}") for letter in LETTERS]


def letter_logprobs(model: torch.nn.Module, queries: Sequence[Tuple[torch.Tensor, List[List[int]]]],
                    with_greedy: bool = False):
    """``(N, 4)`` log-likelihoods of the four answers after each prompt; ``with_greedy``: also the ``(N,)`` greedy
    next tokens (None when a letter takes several tokens and there is no single next-token distribution)."""
    from lit_adapter.evaluation.perplexity import continuation_logprobs, next_token_logits

    if all(len(c) == 1 for _, conts in queries for c in conts):
        logp = torch.log_softmax(next_token_logits(model, [ids for ids, _ in queries]), dim=-1)  # (N, V)
        letter_ids = torch.tensor([[c[0] for c in conts] for _, conts in queries])  # (N, 4)
        scores = logp.gather(1, letter_ids)
        return (scores, logp.argmax(dim=-1)) if with_greedy else scores
    pairs = [(ids.tolist(), c) for ids, conts in queries for c in conts]
    scores = torch.tensor([logp for logp, _ in continuation_logprobs(model, pairs)]).view(len(queries), len(LETTERS))
    return (scores, None) if with_greedy else scores


# ----------------------------------------------------------------------------------------------------------------------
# evaluation


@dataclass
class SubjectResult:
    subject: str
    correct: int
    total: int
    accuracy: float
    shots: int
    """Dev examples in the prompt (fewer than k when a prompt had to be shortened to fit; the smallest used)."""
    greedy_exact_match: Optional[float] = None
    """HELM's metric where it can be read off one forward pass: the share of questions whose greedy next token is
    the correct letter (none when a letter takes several tokens)."""


def evaluate_subject(
    model: torch.nn.Module,
    tokenizer,
    subject: str,
    dev: Sequence[Question],
    test: Sequence[Question],
    k: int = 5,
    batch_size: int = 8,
    max_questions: Optional[int] = None,
    style: str = "hendrycks",
) -> Tuple[SubjectResult, List[Dict]]:
    """Accuracy on ``test`` with the first ``k`` of ``dev`` as shots (``style="helm"``: HELM's prompt and shots);
    also the per-question records."""
    if style not in PROMPT_STYLES:
        raise UserError(f"--style must be one of {', '.join(PROMPT_STYLES)}, got {style!r}")
    if k < 0:
        raise UserError(f"--k must be >= 0, got {k}")
    if k > len(dev):
        raise UserError(f"MMLU subject {subject}: --k {k} but only {len(dev)} dev examples")
    from lit_adapter.generation.decode import real_window

    block_size = real_window(model)  # virtual tokens take their positions first
    questions = list(test)[:max_questions] if max_questions is not None else list(test)
    # both drop the last shots first while a prompt does not fit (Hendrycks' loop; HELM's _make_prompt_fit)
    examples, build = (helm_shots(dev, k), build_helm_prompt) if style == "helm" else (list(dev), build_prompt)
    queries, min_shots = [], k
    for q in questions:
        shots = k
        ids, conts = letter_query(tokenizer, build(subject, examples[:shots], q))
        longest = max(len(c) for c in conts)
        while ids.numel() + longest - 1 > block_size and shots > 0:
            shots -= 1
            ids, conts = letter_query(tokenizer, build(subject, examples[:shots], q))
        if ids.numel() + longest - 1 > block_size:  # even 0-shot is too long: keep the end, the question's
            ids = ids[-(block_size - longest + 1):]
        min_shots = min(min_shots, shots)
        queries.append((ids, conts))

    records, correct, greedy_hits = [], 0, 0
    single = all(len(c) == 1 for _, conts in queries for c in conts)
    for start in range(0, len(queries), batch_size):
        chunk = queries[start : start + batch_size]
        scores, greedy = letter_logprobs(model, chunk, with_greedy=True)  # (B, 4), (B,) or None
        for i, (row, (ids, conts), q) in enumerate(zip(scores, chunk, questions[start : start + batch_size])):
            pred = int(row.argmax())
            correct += pred == q.answer
            record = {"answer": q.answer, "prediction": pred, "logprobs": row.tolist(), "prompt_tokens": ids.numel()}
            if greedy is not None:
                record["greedy_token"] = int(greedy[i])
                greedy_hits += int(greedy[i]) == conts[q.answer][0]
            records.append(record)
    total = len(questions)
    exact = greedy_hits / total if single and total else None
    return SubjectResult(subject, correct, total, correct / total if total else 0.0, min_shots, exact), records


def run_mmlu(
    checkpoint_dir: Path,
    adapter_dir: Optional[Path] = None,
    k: int = 5,
    subjects: Union[str, Sequence[str]] = "all",
    max_questions_per_subject: Optional[int] = None,
    data_dir: Optional[Path] = None,
    batch_size: int = 8,
    out_dir: Optional[Path] = None,
    quantize: Optional[str] = None,
    precision: Optional[str] = None,
    device: Optional[str] = None,
    cot: str = "none",
    cot_file: Optional[Path] = None,
    rationale_tokens: int = 128,
    style: str = "hendrycks",
) -> Dict:
    """Evaluates the chosen subjects, prints per-subject and average accuracies, writes ``out_dir/mmlu.json``.

    ``cot`` (``few_shot`` with the rationales of ``cot_file``, or ``zero_shot``) answers by generation with a chain
    of thought instead of by the letters' likelihood; unreadable answers count as wrong and are reported.
    """
    from lit_adapter.evaluation import describe_model, load_model, run_info, split_names, write_json
    from lit_adapter.evaluation.cot import check_style

    if style not in PROMPT_STYLES:  # before the model loads
        raise UserError(f"--style must be one of {', '.join(PROMPT_STYLES)}, got {style!r}")
    names = split_names(subjects, "subjects")
    if names == ["all"]:
        if data_dir is None:
            names = list(SUBJECTS)
        else:
            names = local_subjects(Path(data_dir))
            if not names:
                raise UserError(f"no MMLU test CSVs (*_test.csv) in {Path(data_dir) / 'test'}")
    unknown = [n for n in names if n not in SUBJECTS]
    if unknown and data_dir is None:
        raise UserError(f"unknown MMLU subjects: {', '.join(unknown)}; known: {', '.join(SUBJECTS)}")
    data = {name: load_subject(name, Path(data_dir) if data_dir is not None else None) for name in names}
    demos = {n: load_mmlu_demos(cot_file, n) for n in names} if check_style(cot) == "few_shot" else {}
    config, model, tokenizer, spec, dev = load_model(checkpoint_dir, adapter_dir, quantize, precision, device)

    t0 = time.perf_counter()
    results, records, no_answer = [], {}, 0
    for name in names:
        if cot != "none":
            questions = data[name][1][:max_questions_per_subject]
            correct, none, recs = evaluate_subject_cot(model, tokenizer, name, questions, cot, demos.get(name, ()),
                                                       rationale_tokens)
            result = SubjectResult(name, correct, len(questions), correct / max(len(questions), 1),
                                   len(demos.get(name, ())))
            no_answer += none
        else:
            result, recs = evaluate_subject(model, tokenizer, name, *data[name], k=k, batch_size=batch_size,
                                            max_questions=max_questions_per_subject, style=style)
        print(f"{name}: {result.accuracy:.4f} ({result.correct}/{result.total}, {result.shots}-shot"
              f"{', ' + cot.replace('_', '-') + ' CoT' if cot != 'none' else ''})")
        results.append(result)
        records[name] = recs
    seconds = time.perf_counter() - t0
    total = sum(r.total for r in results)
    macro = sum(r.accuracy for r in results) / len(results)
    micro = sum(r.correct for r in results) / total if total else 0.0
    mode = f"{cot.replace('_', '-')} CoT" if cot != "none" else f"{k}-shot"
    print(f"MMLU {mode} over {len(results)} subjects, {total} questions: macro {macro:.4f}, micro {micro:.4f} "
          f"({seconds:.1f} s, {total / max(seconds, 1e-9):.1f} questions/s)")
    if cot != "none":
        print(f"no answer (counted wrong): {no_answer} of {total}")
    greedy = [r for r in results if r.greedy_exact_match is not None]
    greedy_micro = (sum(r.greedy_exact_match * r.total for r in greedy) / sum(r.total for r in greedy)
                    if greedy and len(greedy) == len(results) and total else None)
    if greedy_micro is not None and style == "helm":
        print(f"greedy next token = the answer letter (HELM's exact match, one token): {greedy_micro:.4f}")
    report = {
        **describe_model(checkpoint_dir, adapter_dir, spec),
        "k": k, "style": style, "data": str(data_dir) if data_dir is not None else "hub: cais/mmlu",
        "cot": cot, "cot_file": str(cot_file) if cot_file else None, "no_answer": no_answer if cot != "none" else None,
        "max_questions_per_subject": max_questions_per_subject,
        "macro_accuracy": macro, "micro_accuracy": micro, "greedy_exact_match_micro": greedy_micro,
        "questions": total, "seconds": seconds,
        "subjects": {r.subject: asdict(r) for r in results},
        "predictions": records,
        "run": run_info(dev),
    }
    if out_dir is not None:
        print(f"wrote {write_json(Path(out_dir) / 'mmlu.json', report)}")
    return report


# ----------------------------------------------------------------------------------------------------------------------
# chain of thought (lit_adapter.evaluation.cot)


def load_mmlu_demos(path: Optional[Path], subject: str):
    """``(question, rationale)`` demonstrations of ``path`` for ``subject`` (rows without a subject serve all)."""
    from lit_adapter.evaluation.cot import read_rows

    if path is None:
        raise UserError("few-shot CoT on MMLU needs demonstrations with rationales (its dev split has none): pass "
                        "--cot_file (JSON lines: question, choices, answer, rationale[, subject]), or use --cot zero_shot")
    demos = []
    for where, row in read_rows(Path(path)):
        if row.get("subject", subject) != subject:
            continue
        choices, answer = row.get("choices"), str(row.get("answer", "")).strip()
        if not isinstance(choices, list) or len(choices) != 4 or "question" not in row or "rationale" not in row:
            raise UserError(f"{where}: an MMLU CoT demonstration needs question, 4 choices, answer and rationale")
        if answer not in LETTERS and answer not in ("0", "1", "2", "3"):
            raise UserError(f"{where}: answer {answer!r} is neither a letter A-D nor an index 0-3")
        index = LETTERS.index(answer) if answer in LETTERS else int(answer)
        demos.append((Question(str(row["question"]), tuple(str(c) for c in choices), index),
                      str(row["rationale"]).strip()))
    return demos


def mmlu_prompt(subject: str, demos, question) -> str:
    """Hendrycks' header, demonstrations ending "... The answer is (X).", the question ending "Let's think step by
    step."."""
    from lit_adapter.evaluation.cot import STEP_BY_STEP

    header = f"The following are multiple choice questions (with answers) about {format_subject(subject)}.\n\n"
    shots = "".join(f"{format_question(q, False)} {STEP_BY_STEP} {rationale} The answer is ({LETTERS[q.answer]}).\n\n"
                    for q, rationale in demos)
    return header + shots + f"{format_question(question, False)} {STEP_BY_STEP}"


def evaluate_subject_cot(model, tokenizer, subject: str, questions, style: str, demos=(), rationale_tokens: int = 128,
                         answer_tokens: int = 5, temperature: float = 0.0):
    """``(correct, no_answer, records)`` of ``questions`` answered by generation with CoT."""
    from lit_adapter.evaluation.cot import TRIGGERS, extract_letter, generate_text

    correct, none, records = 0, 0, []
    for q in questions:
        prompt = mmlu_prompt(subject, demos if style == "few_shot" else (), q)
        rationale = generate_text(model, tokenizer, prompt, rationale_tokens, temperature, stop=("\n\n",))
        if style == "few_shot":
            text, prediction = rationale, extract_letter(rationale, q.choices)
        else:
            answer = generate_text(model, tokenizer, f"{prompt}{rationale}\n{TRIGGERS['mmlu']}", answer_tokens,
                                   temperature, stop=("\n",))
            text, prediction = f"{rationale}\n{TRIGGERS['mmlu']}{answer}", extract_letter(answer, q.choices)
        correct += prediction == q.answer
        none += prediction is None
        records.append({"answer": q.answer, "prediction": prediction, "generation": text})
    return correct, none, records
