"""scripts/prepare_dolly.py and scripts/prepare_alpaca.py run as a user runs them (subprocesses)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _run(script: str, *args, env=None):
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / script), *map(str, args)],
        capture_output=True, text=True, cwd=REPO, timeout=120, env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="module")
def tokenizer_path(shared_data):
    return shared_data / "tokenizers" / "llama" / "tokenizer.model"


def test_prepare_dolly_script_on_real_file(tmp_path, shared_data, tokenizer_path):
    source = shared_data / "dolly" / "local_training_1.json"
    n_source = len(json.loads(source.read_text()))
    out = tmp_path / "dolly"
    result = _run("prepare_dolly.py", "--tokenizer_path", tokenizer_path, "--destination_path", out,
                  "--source", source, "--max_records", 200, "--val_size", 20, "--seed", 3, "--max_seq_length", 512,
                  "--truncation", "response")
    assert result.returncode == 0, result.stderr
    assert "using 180 for training and 20 for validation" in result.stdout
    assert "records/s" in result.stderr  # the tokenization progress bar
    train = torch.load(out / "train.pt", weights_only=True)
    val = torch.load(out / "val.pt", weights_only=True)
    meta = json.loads((out / "metadata.json").read_text())
    assert (len(train), len(val)) == (180, 20)
    assert (meta["train_records"], meta["val_records"], meta["records_loaded"]) == (180, 20, n_source)
    assert meta["source"] == str(source.resolve()) and meta["schema"] == "dolly" and meta["seed"] == 3
    assert meta["tokenizer"]["path"] == str(tokenizer_path.resolve())
    assert all(ex["input_ids"][0] == 1 and len(ex["input_ids"]) <= 512 for ex in train + val)
    truncated = sum(1 for ex in train + val if ex["input_ids"][-1] != 2)  # lost their EOS
    assert meta["truncation"]["examples_truncated"] == truncated and meta["truncation"]["policy"] == "response"
    assert f"truncation policy 'response' at max_seq_length 512: {truncated} of 200 examples did not fit" in (
        result.stdout)


def test_prepare_alpaca_script(tmp_path, shared_data, tokenizer_path):
    # Alpaca-format records built from the Self-Instruct seed tasks' first instances
    seeds = [json.loads(line) for line in (shared_data / "instructions" / "self_instruct_seed_tasks.jsonl").open()]
    rows = [{"instruction": t["instruction"], "input": t["instances"][0]["input"],
             "output": t["instances"][0]["output"]} for t in seeds]
    source = tmp_path / "alpaca.json"
    source.write_text(json.dumps(rows))
    out = tmp_path / "alpaca"
    result = _run("prepare_alpaca.py", "--checkpoint_dir", tokenizer_path.parent, "--destination_path", out,
                  "--source", source, "--val_size", 25, "--mask_inputs", "false", "--max_seq_length", 256)
    assert result.returncode == 0, result.stderr
    meta = json.loads((out / "metadata.json").read_text())
    assert (meta["train_records"], meta["val_records"]) == (150, 25) and meta["mask_inputs"] is False
    train = torch.load(out / "train.pt", weights_only=True)
    assert all(torch.equal(ex["input_ids"], ex["labels"]) for ex in train)  # nothing masked


def test_scripts_report_user_errors_without_traceback(tmp_path, tokenizer_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "context": "", "response": "b"}\n{"instruction": "c"}\n{oops\n')
    result = _run("prepare_dolly.py", "--tokenizer_path", tokenizer_path, "--destination_path", tmp_path / "o",
                  "--source", bad, "--val_size", 1, "--max_seq_length", 512)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: {bad} line 2: missing field 'response' (pass --skip_invalid true to skip invalid records)"
    ]
    result = _run("prepare_dolly.py", "--tokenizer_path", tokenizer_path, "--destination_path", tmp_path / "o",
                  "--source", bad, "--val_size", 1, "--skip_invalid", "true", "--max_seq_length", 8)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "error: max_seq_length 8 is too short" in result.stderr and "at least 37 tokens" in result.stderr
    # the default Hub source, offline: the message says to pass local files
    result = _run("prepare_alpaca.py", "--tokenizer_path", tokenizer_path, "--destination_path", tmp_path / "o",
                  "--max_seq_length", 512, env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "error: could not load 'tatsu-lab/alpaca'" in result.stderr and "pass local files" in result.stderr
    # a bare tokenizer has no model to take the default length from: say what to pass
    result = _run("prepare_dolly.py", "--tokenizer_path", tokenizer_path, "--destination_path", tmp_path / "o",
                  "--source", bad)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: {tokenizer_path.parent} has no model_config.json to take the model's context length (block_size) "
        "from: pass the model's --checkpoint_dir, or --max_seq_length"
    ]
    result = _run("prepare_dolly.py", "--tokenizer_path", tokenizer_path, "--destination_path", tmp_path / "o",
                  "--source", bad, "--max_seq_length", 512, "--truncation", "tail")
    assert result.returncode == 2 and "Traceback" not in result.stderr and "truncation" in result.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("script, phrase", [
    ("prepare_dolly.py", "Tokenizes Dolly records with the Alpaca prompt template"),
    ("prepare_alpaca.py", "Tokenizes Alpaca-format records with the Alpaca prompt template"),
])
def test_help_shows_docstrings(script, phrase):
    result = _run(script, "--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert phrase in text
    for option in ("--checkpoint_dir", "--tokenizer_path", "--destination_path", "--source", "--val_size", "--seed",
                   "--mask_inputs", "--max_seq_length", "--truncation", "--skip_invalid", "--max_records"):
        assert option in text
    assert "Leave the prompt tokens out of the loss" in text and "Use only this many randomly chosen records" in text
    assert "default: the model's context length" in text and "only then cut the response's tail" in text
