"""MMLU on the real CSVs: accuracy equals a brute-force recomputation (Hendrycks' prompt built here, SentencePiece
tokens, HF ``LlamaForCausalLM`` one question at a time); both CSV formats load; bad data gives one clear error."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from lit_adapter.model.config import Config
from lit_adapter.convert import lit_to_hf_state_dict, write_checkpoint_dir
from lit_adapter.errors import UserError
from lit_adapter.evaluation import load_model
from lit_adapter.evaluation.mmlu import Question, read_csv, run_mmlu
from lit_adapter.model.gpt import GPT

REPO = Path(__file__).resolve().parents[1]
SUBJECTS = ("abstract_algebra", "high_school_geography")



@pytest.fixture(scope="module")
def random32k(tmp_path_factory, shared_data):
    """A random tiny model with the LLaMA tokenizer and a context long enough for some 5-shot prompts."""
    torch.manual_seed(7)
    config = Config.from_name("tiny-32k", block_size=420)
    model = GPT(config)
    model.init_weights(std=0.5)  # larger weights: predictions that differ from question to question
    out = tmp_path_factory.mktemp("random32k_mmlu")
    write_checkpoint_dir(out, config, model.state_dict(), shared_data / "tokenizers" / "llama" / "tokenizer.model")
    return out


def hf_model(checkpoint_dir):
    from transformers import LlamaConfig, LlamaForCausalLM

    config, model, _, _, _ = load_model(checkpoint_dir, device="cpu")
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.n_embd, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.n_layer, num_attention_heads=config.n_head,
        num_key_value_heads=config.n_query_groups, max_position_embeddings=config.block_size,
        rms_norm_eps=config.norm_eps, rope_theta=config.rope_base, tie_word_embeddings=config.tie_embeddings,
        attn_implementation="eager",
    ))
    hf.load_state_dict(lit_to_hf_state_dict(model.state_dict()), strict=False)
    if config.tie_embeddings:
        hf.tie_weights()
    return hf.eval(), config.block_size


def rows(path):
    """Rows of a reformatted CSV as Hendrycks' DataFrame rows: question, 4 choices, answer letter."""
    with open(path, newline="", encoding="utf-8") as f:
        body = list(csv.reader(f))[1:]
    return [r[:5] + ["ABCD"[int(r[5])]] for r in body]


def hendrycks_prompt(subject, dev, k, row):
    def example(r, answer):
        text = r[0] + "".join(f"\n{letter}. {choice}" for letter, choice in zip("ABCD", r[1:5])) + "\nAnswer:"
        return text + (f" {r[5]}\n\n" if answer else "")

    header = "The following are multiple choice questions (with answers) about {}.\n\n".format(
        " " + " ".join(subject.split("_")))  # format_subject's leading space: "about  abstract algebra."
    return header + "".join(example(r, True) for r in dev[:k]) + example(row, False)


@torch.no_grad()
def brute_force(hf, block_size, sp, subject, data, k, n, letter_pieces):
    """Predictions one question at a time: the letter whose continuation tokens have the highest log-likelihood."""
    dev, test = rows(data / "dev" / f"{subject}_dev.csv"), rows(data / "test" / f"{subject}_test.csv")[:n]
    predictions = []
    for row in test:
        shots = k
        ids = [sp.bos_id()] + sp.encode(hendrycks_prompt(subject, dev, shots, row))
        longest = max(len(p) for p in letter_pieces)
        while len(ids) + longest - 1 > block_size and shots > 0:
            shots -= 1
            ids = [sp.bos_id()] + sp.encode(hendrycks_prompt(subject, dev, shots, row))
        ids = ids[len(ids) + longest - 1 - block_size :] if len(ids) + longest - 1 > block_size else ids
        if all(len(p) == 1 for p in letter_pieces):  # one pass: the four next-token log-probabilities
            logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0, -1].double(), -1)
            scores = [logp[sp.piece_to_id(p[0])].item() for p in letter_pieces]
            predictions.append((max(range(4), key=scores.__getitem__), "ABCD".index(row[5])))
            continue
        scores = []
        for pieces in letter_pieces:
            cont = [sp.piece_to_id(p) for p in pieces]
            logp = torch.log_softmax(hf(torch.tensor([ids + cont[:-1]])).logits[0].double(), -1)
            scores.append(sum(logp[len(ids) - 1 + j, t].item() for j, t in enumerate(cont)))
        predictions.append((max(range(4), key=scores.__getitem__), "ABCD".index(row[5])))
    return predictions


def test_accuracy_equals_brute_force_llama_tokenizer(random32k, shared_data, tmp_path):
    data = shared_data / "mmlu"
    report = run_mmlu(random32k, k=5, subjects=",".join(SUBJECTS), max_questions_per_subject=8, data_dir=data,
                      batch_size=4, out_dir=tmp_path)
    hf, block_size = hf_model(random32k)
    sp = spm.SentencePieceProcessor(model_file=str(random32k / "tokenizer.model"))
    correct_all, total_all, accuracies = 0, 0, []
    for subject in SUBJECTS:
        expected = brute_force(hf, block_size, sp, subject, data, 5, 8, [["▁A"], ["▁B"], ["▁C"], ["▁D"]])
        got = report["predictions"][subject]
        assert [r["prediction"] for r in got] == [p for p, _ in expected]
        correct = sum(p == a for p, a in expected)
        assert report["subjects"][subject]["correct"] == correct
        assert report["subjects"][subject]["accuracy"] == pytest.approx(correct / 8)
        correct_all, total_all = correct_all + correct, total_all + 8
        accuracies.append(correct / 8)
    assert report["micro_accuracy"] == pytest.approx(correct_all / total_all)
    assert report["macro_accuracy"] == pytest.approx(sum(accuracies) / len(accuracies))
    assert len({r["prediction"] for s in SUBJECTS for r in report["predictions"][s]}) > 1  # not a constant guess
    # the context (420 tokens) holds the 5-shot algebra prompts (368-409 tokens) but not all geography ones
    # (414-455): those lose shots until they fit
    assert report["subjects"]["abstract_algebra"]["shots"] == 5
    assert report["subjects"]["high_school_geography"]["shots"] < 5
    assert 400 < max(r["prompt_tokens"] for r in report["predictions"]["high_school_geography"]) <= 420
    assert json.loads((tmp_path / "mmlu.json").read_text())["micro_accuracy"] == report["micro_accuracy"]


def test_accuracy_with_letters_split_into_pieces(stories260k, shared_data):
    # llama2.c's 512-piece vocabulary has "▁B" but encodes " A" as "▁", "A": continuations of different lengths
    data = shared_data / "mmlu"
    report = run_mmlu(stories260k, k=1, subjects="marketing", max_questions_per_subject=6, data_dir=data)
    hf, block_size = hf_model(stories260k)
    sp = spm.SentencePieceProcessor(model_file=str(stories260k / "tokenizer.model"))
    pieces = [["▁", "A"], ["▁B"], ["▁", "C"], ["▁", "D"]]
    assert [sp.encode("Answer: " + l)[-len(p):] == [sp.piece_to_id(x) for x in p] for l, p in zip("ABCD", pieces)]
    expected = brute_force(hf, block_size, sp, "marketing", data, 1, 6, pieces)
    assert [r["prediction"] for r in report["predictions"]["marketing"]] == [p for p, _ in expected]
    assert report["subjects"]["marketing"]["correct"] == sum(p == a for p, a in expected)


def test_prompts_longer_than_the_context(stories260k, shared_data):
    # With the 512-piece vocabulary the history passages do not fit 512 tokens even 0-shot: the prompt keeps its
    # end (the question's last lines and "Answer:"), up to the context minus the longest answer continuation - 1.
    data = shared_data / "mmlu"
    report = run_mmlu(stories260k, k=5, subjects="high_school_european_history", max_questions_per_subject=3,
                      data_dir=data, batch_size=2)
    assert report["subjects"]["high_school_european_history"]["shots"] == 0
    assert [r["prompt_tokens"] for r in report["predictions"]["high_school_european_history"]] == [511, 511, 511]
    hf, block_size = hf_model(stories260k)
    sp = spm.SentencePieceProcessor(model_file=str(stories260k / "tokenizer.model"))
    expected = brute_force(hf, block_size, sp, "high_school_european_history", data, 5, 3,
                           [["▁", "A"], ["▁B"], ["▁", "C"], ["▁", "D"]])
    assert [r["prediction"] for r in report["predictions"]["high_school_european_history"]] == [p for p, _ in expected]


def test_reads_both_csv_formats(shared_data, tmp_path):
    reformatted = shared_data / "mmlu" / "test" / "high_school_geography_test.csv"
    expected = read_csv(reformatted)
    assert len(expected) == 198  # the official test count of this subject
    original = tmp_path / "high_school_geography_test.csv"
    with open(original, "w", newline="", encoding="utf-8") as f:  # Hendrycks' files: no header, letters
        csv.writer(f).writerows(r for r in rows(reformatted))
    assert read_csv(original) == expected
    assert expected[0] == Question(*rows(reformatted)[0][:1], tuple(rows(reformatted)[0][1:5]),
                                   "ABCD".index(rows(reformatted)[0][5]))
    # a question with a comma and a quote survives the CSV quoting
    tricky = tmp_path / "tricky.csv"
    tricky.write_text('"What is 1, 2, ""3""?",a,b,"c, d",e,C\n')
    assert read_csv(tricky) == [Question('What is 1, 2, "3"?', ("a", "b", "c, d", "e"), 2)]
    bad = tmp_path / "bad.csv"
    bad.write_text("q,a,b,c,d,E\n")
    with pytest.raises(UserError, match="answer 'E'"):
        read_csv(bad)


def test_original_format_folder_gives_same_accuracy(random32k, shared_data, tmp_path):
    for split in ("dev", "test"):
        (tmp_path / split).mkdir()
        source = shared_data / "mmlu" / split / f"high_school_geography_{split}.csv"
        with open(tmp_path / split / source.name, "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows(rows(source))
    args = dict(k=2, subjects="high_school_geography", max_questions_per_subject=6)
    original = run_mmlu(random32k, data_dir=tmp_path, **args)
    reformatted = run_mmlu(random32k, data_dir=shared_data / "mmlu", **args)
    assert original["predictions"] == reformatted["predictions"]


def test_missing_subject_is_a_clear_error(random32k, shared_data):
    proc = subprocess.run(
        [sys.executable, str(REPO / "evaluate" / "mmlu.py"), "--checkpoint_dir", str(random32k),
         "--data_dir", str(shared_data / "mmlu"), "--subjects", "astrology"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: MMLU subject astrology:") and "astrology_dev.csv not found" in proc.stderr
