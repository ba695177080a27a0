"""Chain-of-thought evaluation: answer extraction on messy generations (labels and MMLU letters), the few-shot and
zero-shot CoT prompts, and both evaluations end to end with a scripted model whose reasoning ends in known answers."""

import json

import pytest
import torch

from lit_adapter.errors import UserError
from lit_adapter.evaluation.classification import Example, evaluate_classification, load_sentiment
from lit_adapter.evaluation.cot import (
    BUILTIN_DEMOS, STEP_BY_STEP, TRIGGERS, Rationale, extract_label, extract_letter, few_shot_prompt,
    load_classification_demos, zero_shot_prompt,
)
from lit_adapter.evaluation.mmlu import Question, evaluate_subject_cot, load_mmlu_demos, mmlu_prompt
from lit_adapter.data.tokenizer import Tokenizer
from test_classification import ScriptedModel


@pytest.mark.parametrize("text, label", [
    (" The reviewer loves it.\nSentiment: positive", "positive"),
    (" It starts well but sags.\nSentiment: Negative.\nReview: next one", "negative"),  # the answer line, not later
    (" sounds positive at first, but the final verdict is harsh. Sentiment: negative", "negative"),  # the last
    (" Positive words, yet the answer is negative.", "negative"),
    (" the sentiment is mixed", None),  # an answer statement that names no label is no answer
    (" The answer is not positive", None),  # negated
    (" Sentiment: positive or negative", None),  # both
    (" Sentiment:", None),
    (" positive.", "positive"),  # a zero-shot second stage continues "... is" with the bare label
    (" blah blah blah", None),
    ("", None),
    (" it is positive. Sentiment: ??? \n", None),  # the last statement is garbage: wrong, not the earlier word
])
def test_extract_label_from_messy_sentiment(text, label):
    assert extract_label(text, "sentiment") == label


@pytest.mark.parametrize("text, label", [
    (" The man looks at a uniform, so he looks at something.\nRelation: entailment", "entailment"),
    (" Playing is not sleeping. Relation: contradiction", "contradiction"),
    (" We cannot tell. The answer is maybe.", "neutral"),
    (" yes", "entailment"),
])
def test_extract_label_from_messy_nli(text, label):
    assert extract_label(text, "nli") == label


@pytest.mark.parametrize("text, index", [
    (" Water boils at 100 C at sea level. The answer is (B).", 1),
    ("A molecule of water has three atoms, so the answer is C", 2),  # "A molecule": the article is not an answer
    (" Let's see: (A) is wrong, (D) is wrong too, so the answer is (B).", 1),  # the answer statement wins
    (" I would go with (D)", 3),
    (" Answer: c", 2),
    (" B.", 1),
    (" D) because the rest are false", 3),
    (" A", 0),  # a bare letter ending the text
    (" A long and winding explanation with no conclusion", None),
    (" the mitochondria", 1),  # no letter, but exactly one choice's text
    (" nucleus or mitochondria", None),  # two choices named: no answer
    ("", None),
])
def test_extract_letter_from_messy_generations(text, index):
    assert extract_letter(text, ("nucleus", "mitochondria", "ribosome", "membrane")) == index


def test_cot_prompts():
    demo = Rationale(Example(("a joy",), "positive"), "Joy is praise.")
    query = Example(("dull",), "negative")
    assert few_shot_prompt("sentiment", [demo], query) == (
        "Classify the sentiment of each movie review as positive or negative, reasoning first.\n\n"
        "Review: a joy\nReasoning: Joy is praise.\nSentiment: positive\n\nReview: dull\nReasoning:")
    assert zero_shot_prompt("sentiment", query) == (
        "Review: dull\nQuestion: Is the sentiment of the review positive or negative?\n"
        f"Answer: {STEP_BY_STEP}")
    q = Question("2 + 2 =", ("3", "4", "5", "6"), 1)
    prompt = mmlu_prompt("elementary_mathematics", [(q, "Two and two make four.")], q)
    assert prompt == ("The following are multiple choice questions (with answers) about  elementary mathematics.\n\n"
                      "2 + 2 =\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer: Let's think step by step. Two and two make four. "
                      "The answer is (B).\n\n2 + 2 =\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer: Let's think step by step.")
    assert len(BUILTIN_DEMOS["sentiment"]) == 4 and len(BUILTIN_DEMOS["nli"]) == 3


def test_demonstration_files_and_their_mistakes(tmp_path):
    good = tmp_path / "demos.jsonl"
    good.write_text(json.dumps({"text": "great", "rationale": "praise", "label": "Positive"}) + "\n")
    assert load_classification_demos(good, "sentiment")[0].example.label == "positive"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "great", "label": "positive"}) + "\n")
    with pytest.raises(UserError, match="bad.jsonl, line 1: a CoT demonstration needs text, rationale and label"):
        load_classification_demos(bad, "sentiment")
    with pytest.raises(UserError, match="--cot_file"):
        load_mmlu_demos(None, "anatomy")
    mmlu = tmp_path / "mmlu.jsonl"
    mmlu.write_text(json.dumps({"subject": "anatomy", "question": "q", "choices": ["a", "b", "c", "d"],
                                "answer": "C", "rationale": "r"}) + "\n"
                    + json.dumps({"subject": "virology", "question": "q", "choices": ["a", "b", "c", "d"],
                                  "answer": 0, "rationale": "r"}) + "\n")
    assert [q.answer for q, _ in load_mmlu_demos(mmlu, "anatomy")] == [2]


@pytest.fixture(scope="module")
def llama_tokenizer(shared_data):
    return Tokenizer(shared_data / "tokenizers" / "llama" / "tokenizer.model")


@pytest.mark.parametrize("style", ["few_shot", "zero_shot"])
def test_classification_with_cot_counts_what_the_reasoning_concludes(style, shared_data, llama_tokenizer):
    examples = load_sentiment(shared_data)
    gold = {e.fields[0]: e.label for e in examples}
    stage2 = TRIGGERS["sentiment"]

    def respond(prompt):
        review = prompt.rsplit("Review: ", 1)[1].split("\n", 1)[0]
        truth, h = gold[review], len(review) % 3
        if style == "zero_shot" and not prompt.endswith(stage2):
            return " The reviewer weighs it up.\n\nReview: something else"  # the rationale stops at the blank line
        answer = [truth, "positive" if truth == "negative" else "negative", "undecided"][h]  # right, wrong, garbage
        return (f" The words are telling.\nSentiment: {answer}\n\n" if style == "few_shot" else f" {answer}.")

    model = ScriptedModel(llama_tokenizer, respond)
    result, records = evaluate_classification(model, llama_tokenizer, "sentiment", examples, max_examples=24,
                                              max_new_tokens=6, cot=style, rationale_tokens=24)
    lengths = [len(r) % 3 for r in (p.rsplit("Review: ", 1)[1].split("\n", 1)[0] for p in model.prompts
                                    if style == "few_shot" or p.endswith(stage2))]
    assert result.examples == 24 == len(lengths)
    assert result.correct == lengths.count(0) and result.no_answer == lengths.count(2)
    if style == "few_shot":
        assert all(p.count("Reasoning: ") == 4 and p.endswith("Reasoning:") for p in model.prompts)
        assert result.shots == 4
    else:  # stage 1 asked to think step by step, stage 2 fed the rationale back before the trigger
        assert len(model.prompts) == 48 and model.prompts[0].endswith(STEP_BY_STEP)
        assert model.prompts[1].endswith(f"{STEP_BY_STEP} The reviewer weighs it up.\n{stage2}")


def test_mmlu_zero_shot_cot(llama_tokenizer):
    questions = [Question(f"Question {i}?", ("w", "x", "y", "z"), i % 4) for i in range(8)]

    def respond(prompt):
        i = int(prompt.rsplit("Question ", 1)[1].split("?", 1)[0])
        if not prompt.endswith(TRIGGERS["mmlu"]):
            return " Think about it.\n\nQuestion 99?"
        return [f" ({'ABCD'[i % 4]}).", " (A).", " none of them"][i % 3]

    model = ScriptedModel(llama_tokenizer, respond)
    correct, none, records = evaluate_subject_cot(model, llama_tokenizer, "anatomy", questions, "zero_shot",
                                                  rationale_tokens=16)
    expected = [i % 3 == 0 or (i % 3 == 1 and i % 4 == 0) for i in range(8)]
    assert correct == sum(expected) and none == sum(i % 3 == 2 for i in range(8))
    assert records[0]["generation"].startswith(" Think about it.\n" + TRIGGERS["mmlu"])
