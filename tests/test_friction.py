"""The first hour with nothing to forgive, and every entry point's bad input (issue 26, parts 3 and 4): each case is
one ``error:`` line naming the file, line, record or option, a non-zero exit, no traceback, and nothing lost or
half-written, in ``tests/test_reliability.py``'s style (whose helpers these reuse)."""

import json
import shutil
import sys
from pathlib import Path

import pytest

from lit_adapter.errors import UserError
from test_reliability import REPO, assert_one_error_line, cli, finetune_args, snapshot  # noqa: F401  (cli: fixture)

# ---------------------------------------------------------------------------------------------- resume


def test_resume_without_a_checkpoint_is_refused_before_the_model_is_built(cli, tmp_path, stories_checkpoint,
                                                                          instruction_data):
    result = cli(*finetune_args(stories_checkpoint, instruction_data, tmp_path / "run", "--resume", "true"))
    assert_one_error_line(result, "--resume", "no checkpoint at", "last.ckpt")
    assert "trainable parameters" not in result.stdout  # the start-up checks, not after the model


@pytest.mark.parametrize("option,value,named", [
    ("--lora.alpha", 32, "lora.alpha: 16.0 -> 32.0"),
    ("--lora.r", 4, "lora.r: 8 -> 4"),
    ("--attention.pattern", "local", "attention.pattern: \"dense\" -> \"local\""),
    ("--train.learning_rate", 0.5, "train.learning_rate"),
])
def test_resume_refuses_a_changed_setting_naming_it(cli, tmp_path, stories_checkpoint, instruction_data, option,
                                                    value, named):
    out = tmp_path / "run"
    first = cli(*finetune_args(stories_checkpoint, instruction_data, out, "--train.save_interval", 1,
                               "--lora.r", 8, "--lora.alpha", 16))
    assert first.returncode == 0, first.stderr[-3000:]
    before = snapshot(out)
    again = cli(*finetune_args(stories_checkpoint, instruction_data, out, "--train.save_interval", 1,
                               "--lora.r", 8, "--lora.alpha", 16, "--resume", "true", option, value))
    line = assert_one_error_line(again, "--resume", "other settings", named)
    assert "shape" not in line
    assert snapshot(out) == before


def test_resume_may_train_longer_and_names_quantize_and_rope_changes():
    from lit_adapter.train.resume_check import changed_settings

    recorded = {"method": {"method": "lora", "settings": {"r": 8}, "quantize": None},
                "train": {"max_steps": 2, "learning_rate": 1e-3}, "model": {"rope_scaling": None},
                "eval": {"interval": 1}, "out_dir": "a"}
    longer = {**recorded, "train": {"max_steps": 10, "learning_rate": 1e-3}, "eval": {"interval": 5}, "out_dir": "b"}
    assert changed_settings(recorded, longer, "lora") == []
    quantized = {**recorded, "method": {**recorded["method"], "quantize": "bnb.nf4"},
                 "model": {"rope_scaling": {"type": "linear", "factor": 2}}}
    changes = changed_settings(recorded, quantized, "lora")
    assert changes[0].startswith("quantize: null -> \"bnb.nf4\"") and changes[1].startswith("model.rope_scaling")


# ---------------------------------------------------------------------------------------------- generation


def test_generate_names_a_misspelled_or_file_checkpoint_dir(cli, tmp_path, stories_checkpoint):
    missing = cli("generate/base.py", "--checkpoint_dir", tmp_path / "stories260k_typo", "--device", "cpu")
    assert_one_error_line(missing, "checkpoint directory not found", "stories260k_typo")
    a_file = Path(stories_checkpoint) / "model_config.json"
    for script in ("generate/base.py", "finetune/lora.py"):
        result = cli(script, "--checkpoint_dir", a_file, *(("--device", "cpu") if "generate" in script else ()))
        assert_one_error_line(result, "is a file, not a folder", str(a_file))


def test_a_non_utf8_prompts_file_names_its_line(cli, tmp_path, stories_checkpoint):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("Once upon a time\nLily said caf\xe9\n".encode("latin-1"))
    result = cli("generate/base.py", "--checkpoint_dir", stories_checkpoint, "--prompts_file", prompts,
                 "--device", "cpu")
    assert_one_error_line(result, "--prompts_file", "line 2", "not UTF-8")


# ---------------------------------------------------------------------------------------------- options


def test_perplexity_out_dir_that_is_a_file(cli, tmp_path, stories_checkpoint):
    target = tmp_path / "report"
    target.write_text("keep me")
    result = cli("evaluate/perplexity.py", "--checkpoint_dir", stories_checkpoint, "--datasets", "wikitext2",
                 "--out_dir", target, "--device", "cpu", "--max_windows", 1)
    assert_one_error_line(result, "--out_dir", "is a file")
    assert target.read_text() == "keep me"


def test_precision_help_and_error_list_the_same_values(cli, tmp_path, stories_checkpoint, instruction_data):
    from lit_adapter.train.preflight import PRECISIONS

    shown = cli("finetune/lora.py", "--help")
    help_text = " ".join(shown.stdout.split())
    start = help_text.rindex("--fabric.precision")
    for precision in PRECISIONS:
        assert precision in help_text[start:start + 400], precision
    wrong = cli(*finetune_args(stories_checkpoint, instruction_data, tmp_path / "run", "--fabric.precision", "8-true"))
    line = assert_one_error_line(wrong, "fabric.precision")
    assert all(p in line for p in PRECISIONS)


# ---------------------------------------------------------------------------------------------- tokenizers


def test_tokenizer_format_is_read_from_the_content_not_the_name(tmp_path):
    from family_fixtures import gpt2_tokenizer_dir

    from lit_adapter.data.tokenizer import Tokenizer

    folder = gpt2_tokenizer_dir(tmp_path / "tok")
    renamed = tmp_path / "my_tokenizer.model"
    shutil.copy(folder / "tokenizer.json", renamed)
    assert Tokenizer(renamed).encode("hello world", bos=False).tolist() == \
        Tokenizer(folder / "tokenizer.json").encode("hello world", bos=False).tolist()


def test_a_truncated_merges_file_is_named_not_the_vocabulary(tmp_path):
    from family_fixtures import gpt2_tokenizer_dir

    from lit_adapter.data.tokenizer import Tokenizer

    folder = gpt2_tokenizer_dir(tmp_path / "tok", files="vocab")
    merges = (folder / "merges.txt").read_text(encoding="utf-8")
    cut = merges[: len(merges) // 2].rsplit(" ", 1)[0]  # cut inside a line: its second piece is gone
    (folder / "merges.txt").write_text(cut, encoding="utf-8")
    with pytest.raises(UserError, match=r"merges\.txt line \d+ is not a merge of two pieces") as err:
        Tokenizer(folder)
    assert "vocab.json" not in str(err.value)


# ---------------------------------------------------------------------------------------------- meaningless data


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("bad,fragment", [
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "chosen and rejected are the same text"),
    ({"prompt": "  ", "chosen": "good", "rejected": "bad"}, "prompt is empty"),
])
def test_dpo_refuses_pairs_that_prefer_nothing_naming_the_line(cli, tmp_path, stories_checkpoint, bad, fragment):
    rows = [{"prompt": f"q{i}", "chosen": "good", "rejected": "bad"} for i in range(5)]
    path = _jsonl(tmp_path / "prefs.jsonl", rows[:3] + [bad] + rows[3:])
    result = cli("finetune/dpo.py", "lora", "--checkpoint_dir", stories_checkpoint, "--data.source", path,
                 "--out_dir", tmp_path / "run", "--fabric.accelerator", "cpu")
    assert_one_error_line(result, f"{path}, line 4", fragment)
    assert not (tmp_path / "run").exists()


def test_dpo_refuses_a_reference_with_another_tokenizer(cli, tmp_path, stories_checkpoint):
    from family_fixtures import gpt2_tokenizer_dir

    from lit_adapter.data.tokenizer import Tokenizer

    reference = tmp_path / "reference"
    shutil.copytree(stories_checkpoint, reference)
    (reference / "tokenizer.model").unlink()
    gpt2_tokenizer_dir(reference, vocab_size=Tokenizer(stories_checkpoint).vocab_size - 1)  # 511 + <|endoftext|>
    assert Tokenizer(reference).vocab_size == Tokenizer(stories_checkpoint).vocab_size
    rows = [{"prompt": f"Once upon a time {i}", "chosen": " a cat", "rejected": " a dog"} for i in range(8)]
    result = cli("finetune/dpo.py", "lora", "--checkpoint_dir", stories_checkpoint, "--data.source",
                 _jsonl(tmp_path / "prefs.jsonl", rows), "--data.val_size", 2, "--dpo.reference_dir", reference,
                 "--out_dir", tmp_path / "run", "--fabric.accelerator", "cpu")
    assert_one_error_line(result, "--dpo.reference_dir", "another tokenizer", "pair 1")


def test_dolly_preferences_refuse_too_many_pairs_and_a_single_category(cli, tmp_path, shared_data):
    dolly = tmp_path / "dolly"
    dolly.mkdir()
    records = [{"instruction": f"Say {i}.", "context": "", "response": f"{i}", "category": "open_qa"}
               for i in range(6)]
    (dolly / "part.json").write_text(json.dumps(records))
    out = tmp_path / "prefs.jsonl"
    too_many = cli("scripts/make_dolly_preferences.py", "--out", out, "--n", 100000,
                   "--dolly_dir", shared_data / "dolly")
    assert_one_error_line(too_many, "--n 100000", "records")
    one_category = cli("scripts/make_dolly_preferences.py", "--out", out, "--n", 3, "--dolly_dir", dolly)
    assert_one_error_line(one_category, "'open_qa'", "two")  # was an endless loop
    assert not out.exists()


def _classify(cli, checkpoint, source, out, *extra):
    return cli("finetune/classify.py", "lora", "--checkpoint_dir", checkpoint, "--data.source", source,
               "--out_dir", out, "--head.pad_id", 0, "--train.max_steps", 1, "--train.global_batch_size", 2,
               "--train.micro_batch_size", 2, "--fabric.accelerator", "cpu", *extra)


def test_classification_refuses_one_class_an_empty_test_split_and_a_pad_id_past_the_vocabulary(
        cli, tmp_path, stories_checkpoint):
    one_class = _jsonl(tmp_path / "one.jsonl", [{"text": f"review {i}", "label": "positive"} for i in range(40)])
    assert_one_error_line(_classify(cli, stories_checkpoint, one_class, tmp_path / "a"), str(one_class),
                          "every training example has the label 'positive'")
    folder = tmp_path / "folder"
    folder.mkdir()
    rows = [{"text": f"review {i}", "label": ["negative", "positive"][i % 2]} for i in range(8)]
    _jsonl(folder / "train.jsonl", rows)
    _jsonl(folder / "validation.jsonl", rows[:2])
    (folder / "test.jsonl").write_text("")
    assert_one_error_line(_classify(cli, stories_checkpoint, folder, tmp_path / "b"), "test split is empty")
    two = _jsonl(tmp_path / "two.jsonl", rows * 5)
    past = _classify(cli, stories_checkpoint, two, tmp_path / "c", "--head.pad_id", 512)
    assert_one_error_line(past, "--head.pad_id 512", "vocabulary", "0 to 511")
    for out in "abc":
        assert not (tmp_path / out / "last.ckpt").exists()


def test_a_classification_dry_run_needs_no_data_nor_pad_token(cli, tmp_path):
    result = cli("finetune/classify.py", "lora", "--model_name", "stories260K", "--dry_run", "true",
                 "--data.source", tmp_path / "not_there.jsonl", "--data.labels", "[a, b, c]")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trainable" in (result.stdout + result.stderr).lower()


def test_a_classification_study_without_a_test_split_is_refused(tmp_path):
    from lit_adapter.grid.classification_study import load_settings

    config = tmp_path / "study.yaml"
    config.write_text("study:\n  test_fraction: 0\n")
    with pytest.raises(UserError, match=r"study.test_fraction=0.*held out"):
        load_settings(config)


# ---------------------------------------------------------------------------------------------- errors in place


def test_a_broken_nli_line_is_named_by_its_line(tmp_path):
    from lit_adapter.evaluation.classification import load_nli_file

    rows = [json.dumps({"premise": "a", "hypothesis": "b", "label": "neutral"})] * 4
    path = tmp_path / "nli.jsonl"
    path.write_text("\n".join(rows) + '\n{"premise": "a", "hypothesis": "b", "label": "neutral"\n')
    with pytest.raises(UserError, match=r"nli\.jsonl, line 5: invalid JSON"):
        load_nli_file(path)


def test_a_truncated_gzip_is_one_line_and_writes_nothing(cli, tmp_path, stories_checkpoint):
    import gzip

    whole = gzip.compress("".join(json.dumps({"text": f"Once upon a time {i}."}) + "\n"
                                  for i in range(2000)).encode())
    cut = tmp_path / "c4.json.gz"
    cut.write_bytes(whole[: len(whole) // 2])
    result = cli("scripts/prepare_text.py", "--checkpoint_dir", stories_checkpoint, "--source", cut,
                 "--destination_path", tmp_path / "data", "--seq_length", 64)
    assert_one_error_line(result, str(cut), "cut short")
    assert not (tmp_path / "data" / "train.pt").exists()


# ---------------------------------------------------------------------------------------------- the grid


def _grid(tmp_path, stories260k, shared_data, contexts=(160,)):
    from test_comparison import write_grid

    from lit_adapter.grid.runner import load_grid

    path = write_grid(tmp_path / "grid.yaml", stories260k, shared_data, tmp_path / "out")
    import yaml

    raw = yaml.safe_load(path.read_text())
    raw["context_lengths"] = list(contexts)
    path.write_text(yaml.safe_dump(raw))
    return load_grid(path)


def _finished_child(summary_status="completed", returncode=130, interrupted=True):
    """Stands in for a cell's process that finished its last step and saved, then got the Ctrl-C."""
    from lit_adapter.grid.cell_process import ChildResult

    def child(command, log_path, tag, timeout_s, append=False):
        folder = Path(log_path).parent
        (folder / "final").mkdir(exist_ok=True)
        (folder / "summary.json").write_text(json.dumps({
            "status": summary_status, "trainable_params": 10, "total_params": 100, "avg_train_loss": 1.0,
            "initial_val_loss": 2.0, "final_val_loss": 1.5, "best_val_loss": 1.5, "train_time_s": 1.0,
            "tokens_per_s": 10.0, "peak_memory_gb": 0.1, "peak_memory_kind": "process_peak_rss", "steps": 2,
            "train_losses": [[1, 1.0]], "val_losses": [[0, 2.0], [2, 1.5]]}))
        Path(log_path).write_text("received SIGINT\n")
        return ChildResult(returncode, interrupted=interrupted)

    return child


def test_a_ctrl_c_on_a_cells_last_step_keeps_it_completed_and_timings_say_their_load(
        tmp_path, stories260k, shared_data, monkeypatch):
    from lit_adapter.grid import runner

    grid = _grid(tmp_path, stories260k, shared_data)
    monkeypatch.setattr(runner, "run_child", _finished_child())
    monkeypatch.setattr(runner, "machine_load", lambda: 9.0)  # a shared machine: others' work on its cores
    with pytest.raises(KeyboardInterrupt):
        runner.run_grid(grid, only=["adapter"])
    cells = json.loads((grid.out_dir / "results.json").read_text())["cells"]
    assert [c["status"] for c in cells] == ["completed"]
    assert cells[0]["load_average"] == 9.0 and cells[0]["threads"] >= 1 and cells[0]["contended"] is True
    assert "under contention" in (grid.out_dir / "results.md").read_text()
    assert not (grid.out_dir / ".lock").exists()


def test_the_grid_owns_its_folder_and_resumes_only_a_grid(tmp_path, stories260k, shared_data, monkeypatch):
    import subprocess

    from lit_adapter.grid import runner
    from lit_adapter.train.preflight import LOCK_FILE

    grid = _grid(tmp_path, stories260k, shared_data)
    with pytest.raises(UserError, match="holds no grid"):
        runner.run_grid(grid, resume=True)
    assert not grid.out_dir.exists()
    grid.out_dir.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (grid.out_dir / LOCK_FILE).write_text(f"{sleeper.pid}\n")
        monkeypatch.setattr(runner, "run_child", _finished_child(returncode=0, interrupted=False))
        with pytest.raises(UserError, match=f"in use by another run \\(process {sleeper.pid}\\)"):
            runner.run_grid(grid)
        assert not (grid.out_dir / "results.md").exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_every_cells_context_is_checked_before_the_first_runs(tmp_path, stories260k, shared_data):
    from lit_adapter.grid import runner

    grid = _grid(tmp_path, stories260k, shared_data, contexts=(160, 1024))
    with pytest.raises(UserError, match=r"cell adapter/fp32/1024/s1337: --data.max_seq_length=1024 exceeds"):
        runner.run_grid(grid)
    assert not grid.out_dir.exists()


def test_data_prepared_longer_than_the_window_is_refused_not_cut(cli, tmp_path, stories_checkpoint):
    from lit_adapter.data.instructions import prepare

    data = tmp_path / "data"
    prepare(data, stories_checkpoint, source="synthetic", max_records=200, val_size=20, seed=1, max_seq_length=2048,
            mask_inputs=True, progress=False)
    examples = torch_load(data / "train.pt")
    longest = max(len(e["input_ids"]) for e in examples)
    short = tmp_path / "short"
    shutil.copytree(stories_checkpoint, short)
    config = json.loads((short / "model_config.json").read_text())
    window = longest - 4
    (short / "model_config.json").write_text(json.dumps({**config, "block_size": window}))
    out = tmp_path / "run"
    refused = cli(*finetune_args(short, data, out))
    assert_one_error_line(refused, "longer than the model's", f"--max_seq_length {window}", "--data.max_seq_length")
    assert not (out / "last.ckpt").exists() and not (out / "final").exists()
    asked = cli(*finetune_args(short, data, out, "--data.max_seq_length", window, "--overwrite", "true"))
    assert asked.returncode == 0, asked.stderr[-3000:]  # a cut the user asked for is the user's


def torch_load(path):
    import torch

    return torch.load(path, weights_only=True)


def test_the_preparation_counts_what_it_keeps(tmp_path, stories_checkpoint, shared_data, capsys):
    from lit_adapter.data.instructions import prepare

    source = str(shared_data / "dolly" / "local_training_1.json")
    metadata = prepare(tmp_path / "data", stories_checkpoint, source=source, schema="dolly", max_records=200,
                       val_size=20, seed=1, max_seq_length=128, mask_inputs=True, truncation="context",
                       progress=False)
    out = capsys.readouterr().out + capsys.readouterr().err
    kept = f"using {metadata['train_records']:,} for training and {metadata['val_records']:,} for validation"
    assert kept in out and metadata["train_records"] < 180 and "dropped by the truncation policy" in out


# ---------------------------------------------------------------------------------------------- the first hour


def test_the_quickstart_runs_twice_in_a_row(cli, tmp_path, shared_data):
    args = ("scripts/quickstart.py", "--shared_data", shared_data, "--out_dir", tmp_path / "qs", "--max_steps", 2,
            "--records", 300)
    first = cli(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    again = cli(*args)  # LitGPT's recipes replace their out_dir; so does the demo
    assert again.returncode == 0, again.stderr[-3000:]
    assert "validation loss" in again.stdout
    kept = cli(*args, "--overwrite", "false")
    assert_one_error_line(kept, "already holds a run", "--overwrite true")
