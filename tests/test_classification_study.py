"""Seed 004's study as one command, in miniature: verbalised-label records whose prompt is exactly the generation
evaluation's, the test split held out, the grid's cells run, each best/ evaluated on the test split, the table and
the validation-loss plot written."""

import json

import yaml

from lit_adapter.grid.classification_study import StudySettings, format_table, run_study, write_records
from lit_adapter.data.instructions import prepare
from lit_adapter.evaluation.classification import build_prompt
from lit_adapter.data.tokenizer import Tokenizer


def test_training_prompts_are_the_evaluation_prompts(stories260k, shared_data, tmp_path):
    settings = StudySettings(data_dir=str(shared_data), max_train_examples=40, max_test_examples=10)
    prepared = write_records(settings, tmp_path)
    records = [json.loads(line) for line in prepared["records"].read_text().splitlines()]
    assert len(records) == 40 and {r["output"] for r in records} <= {"positive", "negative"}
    test_texts = {e.fields[0] for e in prepared["test"]}
    assert not test_texts & {r["input"][len("Review: "):] for r in records}  # the test split is held out
    prepare(tmp_path / "data", stories260k, source=str(prepared["records"]), schema="alpaca", val_size=5,
            max_seq_length=384, progress=False, log=lambda *_: None)
    import torch

    tokenizer = Tokenizer.from_checkpoint_dir(stories260k)
    example = torch.load(tmp_path / "data" / "train.pt", weights_only=True)[0]
    n_prompt = int((example["labels"] == -100).sum())
    prompt, answer = tokenizer.decode(example["input_ids"][:n_prompt]), tokenizer.decode(example["input_ids"][n_prompt:])
    record = next(r for r in records if r["input"] in prompt)
    from lit_adapter.evaluation.classification import Example

    assert prompt == build_prompt("sentiment", [], Example((record["input"][len("Review: "):],), "x"), "instruction")
    assert answer == record["output"] and example["input_ids"][-1] == tokenizer.eos_id  # label tokens + EOS


def test_the_study_runs_end_to_end(stories260k, shared_data, tmp_path):
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump({
        "checkpoint_dir": str(stories260k), "out_dir": str(tmp_path / "out"),
        "study": {"data_dir": str(shared_data), "max_train_examples": 48, "max_test_examples": 12},
        "data": {"seed": 1}, "context_lengths": [384],
        "common": {"train": {"global_batch_size": 8, "micro_batch_size": 8, "max_steps": 2, "warmup_steps": 1,
                             "learning_rate": 1e-3, "log_interval": 1},
                   "eval": {"interval": 1, "max_batches": 1}, "fabric": {"accelerator": "cpu", "precision": "32-true"}},
        # one cell (each is a process of its own: seconds of start-up); the full-fine-tuning row is the same path
        "runs": [{"name": "lora-r4", "script": "lora", "args": {"lora": {"r": 4, "alpha": 16}}}],
    }))
    report = run_study(config)
    assert [c["status"] for c in report["cells"]] == ["completed"]
    for cell in report["cells"]:
        assert cell["evaluated"] == "best" and cell["test"]["examples"] == 12
        assert cell["test"]["correct"] + cell["test"]["no_answer"] <= 12  # garbage is counted wrong, not dropped
        assert [s for s, _ in cell["val_losses"]] == [0, 1, 2]
    assert report["base"]["examples"] == 12
    table = format_table(report)
    assert "| lora-r4 | 4 | 16 |" in table and "| base model, zero-shot" in table
    out = tmp_path / "out"
    assert (out / "val_loss_curves.png").stat().st_size > 1000 and (out / "study.md").read_text().strip() == table
