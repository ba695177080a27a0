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
