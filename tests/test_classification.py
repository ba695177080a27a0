"""In-context classification: label parsing, prompts, demonstrations from a disjoint pool, and accuracy / no-answer /
per-label counts equal to what a scripted model was made to answer, on the real Rotten Tomatoes files."""

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lit_adapter.convert import lit_to_hf_state_dict
from lit_adapter.errors import UserError
from lit_adapter.evaluation import load_model
from lit_adapter.evaluation.classification import (
    Example, build_prompt, evaluate_classification, load_nli_file, load_sentiment, parse_label, run_classification,
)
from lit_adapter.data.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("text,label", [
    ("Positive!", "positive"),
    (" positive", "positive"),
    ("the sentiment is negative.", "negative"),
    ("it's positive", "positive"),
    ("It\u2019s NEGATIVE...", "negative"),
    ("Negative\nReview: a fine film\nSentiment: positive", "negative"),  # only the first line is the answer
    ("\n\npositive", "positive"),
    ("pos", "positive"),
    ("positive or negative", None),  # both: not an answer
    ("it is not positive", None),  # negated: not read as its opposite
    ("it isn't negative", None),
    ("When it was", None),
    ("positively", "positive"),
    ("posit", None),  # a cut-off word is not a label
    ("", None),
    ("!!!", None),
])
def test_parse_sentiment(text, label):
    assert parse_label(text, "sentiment") == label


@pytest.mark.parametrize("text,label", [
    ("Entailment", "entailment"),
    ("yes.", "entailment"),
    ("Maybe", "neutral"),
    ("It is neutral", "neutral"),
    ("No, the hypothesis contradicts the premise", "contradiction"),
    ("contradiction!", "contradiction"),
    ("True", "entailment"),
    ("yes and no", None),
    ("entailment or contradiction", None),
    ("The premise", None),
])
def test_parse_nli(text, label):
    assert parse_label(text, "nli") == label


def test_real_rotten_tomatoes_files(shared_data):
    examples = load_sentiment(shared_data)
    assert len(examples) == 10662
    assert sum(e.label == "positive" for e in examples) == 5331
    assert examples[0].fields[0].startswith("the rock is destined to be the 21st century's new")
    # Latin-1 file: accented characters decode (no replacement characters)
    assert any("\u00e9" in e.fields[0] for e in examples) and not any("\ufffd" in e.fields[0] for e in examples)


def test_prompts():
    demo = Example(("a joy to watch",), "positive")
    query = Example(("dull and long",), "negative")
    assert build_prompt("sentiment", [demo], query, "plain") == (
        "Classify the sentiment of each movie review as positive or negative.\n\n"
        "Review: a joy to watch\nSentiment: positive\n\nReview: dull and long\nSentiment:"
    )
    prompt = build_prompt("sentiment", [demo], query, "instruction")
    assert prompt.startswith("Below is an instruction that describes a task, paired with an input")
    expected_input = "Review: a joy to watch\nSentiment: positive\n\nReview: dull and long"
    assert f"### Input:\n{expected_input}\n\n### Response:\n" in prompt
    nli = build_prompt("nli", [], Example(("A man sleeps.", "A person rests."), "entailment"), "plain")
    assert nli.endswith("Premise: A man sleeps.\nHypothesis: A person rests.\nRelation:")


class ScriptedModel(torch.nn.Module):
    """A stand-in for GPT that answers each prompt with ``respond(prompt_text)``, token by token, via the same
    KV-cache interface ``generate_tokens`` uses; it records every prompt it sees."""

    def __init__(self, tokenizer, respond, block_size=4096):
        super().__init__()
        self.config = SimpleNamespace(block_size=block_size)
        self.num_virtual_tokens = 0
        self.tokenizer, self.respond = tokenizer, respond
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.prompts, self.queue = [], []

    def set_kv_cache(self, batch_size, max_seq_length=None, device=None, dtype=None):
        self.queue = []

    def clear_kv_cache(self):
        pass

    def forward(self, idx, input_pos=None):
        if input_pos[0] == 0:
            prompt = self.tokenizer.decode(idx[0].tolist())
            self.prompts.append(prompt)
            self.queue = self.tokenizer.encode(self.respond(prompt), bos=False).tolist() + [self.tokenizer.eos_id]
        logits = torch.zeros(1, idx.shape[1], self.tokenizer.vocab_size)
        logits[0, -1, self.queue.pop(0)] = 1.0
        return logits


@pytest.fixture(scope="module")
def llama_tokenizer(shared_data):
    return Tokenizer(shared_data / "tokenizers" / "llama" / "tokenizer.model")


def last_review(prompt):
    return prompt.rsplit("Review: ", 1)[1].split("\nSentiment:")[0].split("\n\n###")[0].strip()


def test_sentiment_accuracy_equals_scripted_answers(shared_data, llama_tokenizer):
    examples = load_sentiment(shared_data)
    gold = {e.fields[0]: e.label for e in examples}
    styles = [" Positive!", " the sentiment is {}.", " it's {}", " I have no idea", " {}"]

    def respond(prompt):
        review = last_review(prompt)
        truth = gold[review]
        wrong = "negative" if truth == "positive" else "positive"
        h = zlib.crc32(review.encode())
        if h % 5 == 0:
            return styles[0] if truth == "positive" else " Negative!"
        label = truth if h % 3 else wrong  # every third (by hash) answered wrongly
        return styles[h % 4 + 1].format(label)

    model = ScriptedModel(llama_tokenizer, respond)
    result, records = evaluate_classification(model, llama_tokenizer, "sentiment", examples, shots=3,
                                              max_examples=60, max_new_tokens=12)
    # the expected outcome of every answer, recomputed from the script
    expected_correct = expected_none = 0
    per_label = {"positive": [0, 0], "negative": [0, 0]}
    for prompt in model.prompts:
        review = last_review(prompt)
        h = zlib.crc32(review.encode())
        none = h % 5 != 0 and h % 4 + 1 == 3  # " I have no idea"
        right = not none and (h % 5 == 0 or h % 3 != 0)
        expected_correct += right
        expected_none += none
        per_label[gold[review]][0] += 1
        per_label[gold[review]][1] += right
    assert result.examples == len(model.prompts) == 60
    assert result.correct == expected_correct and result.accuracy == pytest.approx(expected_correct / 60)
    assert result.no_answer == expected_none and result.no_answer_rate == pytest.approx(expected_none / 60)
    assert 0 < expected_none < 60 and 0 < expected_correct < 60
    for label, (n, right) in per_label.items():
        assert result.per_label[label]["n"] == n and result.per_label[label]["correct"] == right
        assert sum(result.per_label[label][k] for k in ("positive", "negative", "none")) == n

    # demonstrations: 3 per prompt, labelled correctly, never one of the evaluated reviews
    evaluated = {last_review(p) for p in model.prompts}
    for prompt in model.prompts:
        demos = prompt.split("Review: ")[1:-1]
        assert len(demos) == 3
        for d in demos:
            text, label = d.split("\nSentiment: ")
            assert text not in evaluated and gold[text] == label.strip()
    # the same seed gives the same prompts; another seed other examples
    again = ScriptedModel(llama_tokenizer, respond)
    evaluate_classification(again, llama_tokenizer, "sentiment", examples, shots=3, max_examples=60, max_new_tokens=12)
    assert again.prompts == model.prompts
    other = ScriptedModel(llama_tokenizer, respond)
    evaluate_classification(other, llama_tokenizer, "sentiment", examples, shots=3, max_examples=60, seed=7,
                            max_new_tokens=12)
    assert other.prompts != model.prompts


def test_zero_shot_and_instruction_template(shared_data, llama_tokenizer):
    examples = load_sentiment(shared_data)
    model = ScriptedModel(llama_tokenizer, lambda prompt: " positive")
    result, _ = evaluate_classification(model, llama_tokenizer, "sentiment", examples, shots=0, max_examples=40,
                                        template="instruction")
    assert all(p.count("Review: ") == 1 and p.endswith("### Response:\n") for p in model.prompts)
    assert result.correct == result.per_label["positive"]["n"] and result.no_answer == 0
    assert result.per_label["negative"]["positive"] == result.per_label["negative"]["n"]


def test_nli_from_local_files(tmp_path, llama_tokenizer):
    rows = [
        {"premise": f"P{i}.", "hypothesis": f"H{i}.", "label": ["entailment", 1, "2", "-"][i % 4]} for i in range(40)
    ]
    jsonl = tmp_path / "nli.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows))
    tsv = tmp_path / "dev_matched.tsv"  # MultiNLI's own column names
    tsv.write_text("sentence1\tsentence2\tgold_label\n" + "".join(
        f"{r['premise']}\t{r['hypothesis']}\t{r['label']}\n" for r in rows))
    examples = load_nli_file(jsonl)
    assert examples == load_nli_file(tsv)
    assert len(examples) == 30  # the "-" (no gold label) rows are dropped
    assert [e.label for e in examples[:3]] == ["entailment", "neutral", "contradiction"]

    answer = {"entailment": " Yes", "neutral": " maybe", "contradiction": " No."}
    gold = {e.fields[0]: e.label for e in examples}

    def respond(prompt):
        premise = prompt.rsplit("Premise: ", 1)[1].split("\n")[0]
        return answer[gold[premise]] if int(premise[1:-1]) % 2 else " unclear"

    model = ScriptedModel(llama_tokenizer, respond)
    result, _ = evaluate_classification(model, llama_tokenizer, "nli", examples, shots=1)
    odd = sum(int(p.rsplit("Premise: ", 1)[1].split("\n")[0][1:-1]) % 2 for p in model.prompts)
    assert result.examples == 15  # 30 examples: 15 go to the demonstration pool
    assert result.correct == odd and result.no_answer == 15 - odd


def test_long_prompts_drop_demonstrations(shared_data, llama_tokenizer):
    examples = load_sentiment(shared_data)
    model = ScriptedModel(llama_tokenizer, lambda p: " negative", block_size=160)
    result, _ = evaluate_classification(model, llama_tokenizer, "sentiment", examples, shots=4, max_examples=10)
    assert result.truncated_prompts > 0
    assert all(len(llama_tokenizer.encode(p)) <= 160 - 5 for p in model.prompts)


def test_real_model_answers_are_greedy_generations(stories260k, shared_data, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    report = run_classification(stories260k, task="sentiment", shots=1, max_examples=3, max_new_tokens=6,
                                data_dir=shared_data, out_file=tmp_path / "cls.json")
    config, model, tokenizer, _, _ = load_model(stories260k, device="cpu")
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.n_embd, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.n_layer, num_attention_heads=config.n_head,
        num_key_value_heads=config.n_query_groups, max_position_embeddings=config.block_size,
        rms_norm_eps=config.norm_eps, rope_theta=config.rope_base, tie_word_embeddings=True,
        attn_implementation="eager",
    ))
    hf.load_state_dict(lit_to_hf_state_dict(model.state_dict()), strict=False)
    hf.tie_weights()
    scripted = ScriptedModel(tokenizer, lambda p: "")
    evaluate_classification(scripted, tokenizer, "sentiment", load_sentiment(shared_data), shots=1, max_examples=3)
    for prompt, record in zip(scripted.prompts, report["answers"]):
        ids = tokenizer.encode(prompt)
        with torch.no_grad():
            for _ in range(6):  # greedy decoding, recomputing the whole sequence each step
                ids = torch.cat([ids, hf(ids[None]).logits[0, -1].argmax()[None]])
        assert record["answer"] == tokenizer.decode(ids[-6:].tolist())
    saved = json.loads((tmp_path / "cls.json").read_text())
    assert saved["accuracy"] == report["accuracy"] and saved["examples"] == 3 and saved["template"] == "plain"


def test_missing_data_is_a_clear_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "evaluate" / "classification.py"), "--checkpoint_dir", str(tmp_path),
         "--task", "sentiment", "--data_dir", str(tmp_path)],
        capture_output=True, text=True, cwd=REPO, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: sentiment dataset:") and "rt-polarity.pos not found" in proc.stderr
    with pytest.raises(UserError, match="NLI file not found"):
        load_nli_file(tmp_path / "nope.jsonl")


# ----------------------------------------------------------------------------------------------------------------------
# scripts/compare_generations.py: the same instructions answered by the base and by fine-tuned checkpoints


def _compare_generations_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("compare_generations", REPO / "scripts" / "compare_generations.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compare_generations_table(stories260k, tmp_path):
    from lit_adapter.tuners.adapter import AdapterConfig
    from lit_adapter.model.config import Config
    from lit_adapter.data.instructions import InstructionRecord
    from lit_adapter.generation.decode import generate
    from lit_adapter.tuners.registry import MethodSpec, prepare_model, save_adapter
    from lit_adapter.data.prompts import generate_prompt

    # a fine-tuned adapter whose gates and prompts are non-zero, so that it answers differently from the base
    spec = MethodSpec("adapter", AdapterConfig(prompt_length=4, start_layer=1))
    config = Config.from_checkpoint_dir(stories260k)
    tuned = prepare_model(spec, config, stories260k, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        for name, param in tuned.named_parameters():
            if "adapter_wte" in name or "gating_factor" in name:
                param.copy_(torch.randn_like(param))
    save_adapter(tuned, spec, config, stories260k, tmp_path / "run1" / "final")

    instructions = tmp_path / "instructions.jsonl"
    instructions.write_text("\n".join(json.dumps(r) for r in [
        {"instruction": "Tell me a story about a cat."},
        {"instruction": "Summarize the text.", "context": "Lily | Tom went to the park.\nThey played."},
        {"id": "seed_task_0", "instruction": "Name a color.", "instances": [{"input": "", "output": "red"}]},
        {"instruction": "Not answered: past --limit."},
    ]))
    module = _compare_generations_module()
    out = tmp_path / "gen" / "generations.md"
    report = module.main(stories260k, adapter_dirs=str(tmp_path / "run1" / "final"), instructions=instructions,
                         limit=3, max_new_tokens=8, out=out)

    _, base, tokenizer, _, _ = load_model(stories260k, device="cpu")
    tuned.eval()
    records = module.load_instructions(instructions, 3)
    for model, column in ((base, report["models"][0]), (tuned, report["models"][1])):
        for record, answer in zip(records, column["answers"]):
            ids = tokenizer.encode(generate_prompt(InstructionRecord(record["instruction"], record["input"])))
            expected = generate(model, ids, 8, temperature=0.0, eos_id=tokenizer.eos_id)[ids.numel():]
            assert answer == tokenizer.decode([t for t in expected.tolist() if t != tokenizer.eos_id]).strip()
    assert report["models"][0]["answers"] != report["models"][1]["answers"]
    assert [m["name"] for m in report["models"]] == ["base", "adapter (run1)"]

    lines = out.read_text().splitlines()
    table = [line for line in lines if line.startswith("|")]
    assert table[0] == "| # | instruction | base | adapter (run1) |"
    assert len(table) == 2 + 3  # header, rule, one row per instruction
    assert all(row.count(" | ") == 3 for row in table[2:])  # the "|" inside the input is escaped
    assert "Lily \\| Tom went to the park.<br>They played." in table[3]
    assert json.loads(out.with_suffix(".json").read_text())["models"][1]["answers"] == report["models"][1]["answers"]
