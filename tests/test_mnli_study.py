"""Seed 002's RoBERTa study in miniature: configs/roberta_mnli_study.yaml's three rows (full fine-tuning, LoRA r 8 on
every linear, P-tuning with 20 virtual tokens and an encoder of 128) on a random tiny RoBERTa made with transformers
and converted, with a local MultiNLI-shaped folder written here. Each row's trainable parameters equal PEFT's count
on the same HF model, each accuracy is that of the cell's best/ reloaded, on the matched and mismatched splits."""

import json
import random
from pathlib import Path

import pytest
import torch
import yaml

from lit_adapter.grid.head_study import format_table, run_head_study

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

REPO = Path(__file__).resolve().parents[1]
NLI = ("entailment", "neutral", "contradiction")
MARKERS = {"entailment": "yes", "neutral": "maybe", "contradiction": "never"}
WORDS = "the a dog cat man woman runs sleeps eats big small red park house tree sees".split()


def _hf_config():
    return transformers.RobertaConfig(vocab_size=400, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64, max_position_embeddings=66, type_vocab_size=1,
                                      pad_token_id=1, num_labels=3)


@pytest.fixture(scope="module")
def tiny_roberta(tmp_path_factory):
    """A random RobertaForSequenceClassification, saved with a RoBERTa tokenizer and converted."""
    from family_fixtures import roberta_tokenizer_dir

    from lit_adapter.convert import convert_hf_checkpoint

    torch.manual_seed(0)
    hf = transformers.RobertaForSequenceClassification(_hf_config())
    source = tmp_path_factory.mktemp("hf_tiny_roberta")
    hf.save_pretrained(source)
    roberta_tokenizer_dir(source)
    out = tmp_path_factory.mktemp("tiny-roberta")
    convert_hf_checkpoint(source, out)
    return out


def _pairs(n: int, seed: int, genre: str):
    """Pairs whose label a word of the hypothesis tells (something even a tiny model learns in a few steps)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = NLI[i % 3]
        premise = " ".join(rng.choice(WORDS) for _ in range(5))
        rows.append({"premise": premise, "hypothesis": f"{MARKERS[label]} {' '.join(premise.split()[:2])}",
                     "label": label, "genre": genre})
    return rows


def _peft_count(settings) -> int:
    torch.manual_seed(0)
    model = transformers.RobertaForSequenceClassification(_hf_config())
    if settings is None:
        return sum(p.numel() for p in model.parameters())
    return peft.get_peft_model(model, settings).get_nb_trainable_parameters()[0]


def test_the_seed002_study_in_miniature(tiny_roberta, tmp_path):
    data = tmp_path / "mnli"
    data.mkdir()
    for name, rows in (("train", _pairs(96, 0, "fiction")), ("dev_matched", _pairs(24, 1, "fiction")),
                       ("dev_mismatched", _pairs(21, 2, "travel"))):
        (data / f"multinli_1.0_{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    study = yaml.safe_load((REPO / "configs" / "roberta_mnli_study.yaml").read_text())
    # the study's own runs (the seed's method settings), on the tiny model, its local data and a CPU budget
    study.update(checkpoint_dir=str(tiny_roberta), out_dir=str(tmp_path / "out"), context_lengths=[40], common={
        "data": {"source": str(data), "val_fraction": 0.125, "seed": 3},
        "train": {"learning_rate": 1e-2, "global_batch_size": 8, "micro_batch_size": 8, "max_steps": 36,
                  "warmup_steps": 0, "weight_decay": 0.0, "seed": 1337, "log_interval": 4},
        "eval": {"interval": 12}, "fabric": {"accelerator": "cpu", "precision": "32-true"}})
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(study))

    report = run_head_study(config)

    cells = {cell["run"]: cell for cell in report["cells"]}
    assert list(cells) == ["full", "lora", "p-tuning"] and all(c["status"] == "completed" for c in cells.values())
    lora = cells["lora"]["settings"]
    assert {cell: cells[cell]["trainable_params"] for cell in cells} == {  # PEFT's counts on the same HF model
        "full": _peft_count(None),
        "lora": _peft_count(peft.LoraConfig(task_type="SEQ_CLS", r=lora["r"], lora_alpha=lora["alpha"],
                                            lora_dropout=lora["dropout"], target_modules="all-linear")),
        "p-tuning": _peft_count(peft.PromptEncoderConfig(task_type="SEQ_CLS", num_virtual_tokens=20,
                                                         encoder_hidden_size=128))}
    for name, cell in cells.items():
        folder = Path(cell["folder"])
        assert cell["evaluated"] == "best" and cell["best_val_step"] in (12, 24, 36)
        assert {k: v["examples"] for k, v in cell["test"].items()} == {"validation_matched": 24,
                                                                     "validation_mismatched": 21}
        saved = json.loads((folder / "test_metrics.json").read_text())
        assert saved["checkpoint"] == str(folder / "best")
        for split, scores in cell["test"].items():  # the table's numbers are best/'s, from its confusion matrix
            confusion = torch.tensor(saved["splits"][split]["confusion"])
            assert scores["accuracy"] == pytest.approx(float(confusion.diagonal().sum() / confusion.sum()))
        assert cell["train_time_s"] > 0
    _check_best_is_what_was_scored(tiny_roberta, cells["lora"], data)
    # full fine-tuning learns the marker words, far above chance (1/3) on both splits (1.0 and 0.95 when written)
    assert min(s["accuracy"] for s in cells["full"]["test"].values()) > 0.6, cells["full"]["test"]
    table = format_table(report)
    assert table.splitlines()[0] == ("| method | trainable parameters | training time | best step | accuracy "
                                     "validation_matched | accuracy validation_mismatched | macro-F1 "
                                     "validation_matched | macro-F1 validation_mismatched |")
    assert f"| full | {cells['full']['trainable_params']:,} |" in table
    assert (tmp_path / "out" / "study.md").read_text().strip() == table
    print(table)


def _check_best_is_what_was_scored(checkpoint_dir, cell, data):
    """best/ reloaded here gives the cell's reported matched accuracy."""
    from lit_adapter.data.classification import ClassifyData, load_splits
    from lit_adapter.data.tokenizer import Tokenizer
    from lit_adapter.train.classification import evaluate_head, scores, tokenize_examples
    from lit_adapter.tuners.registry import load_finetuned

    splits = load_splits(ClassifyData(source=str(data), val_fraction=0.125, seed=3), data)
    tokenizer = Tokenizer.from_checkpoint_dir(checkpoint_dir)
    _, model, spec = load_finetuned(checkpoint_dir, Path(cell["folder"]) / "best", torch.device("cpu"),
                                    torch.float32)
    matched = tokenize_examples(tokenizer, splits.test_sets()["validation_matched"], splits.labels, 40)
    confusion, _ = evaluate_head(model, matched, spec.head, max_len=40)
    assert scores(confusion, spec.head.labels)["accuracy"] == pytest.approx(cell["test"]["validation_matched"]
                                                                               ["accuracy"])
