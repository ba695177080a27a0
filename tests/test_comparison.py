"""The comparison grid: every cell checked before any runs, per-cell progress, and a stopped grid resumed without
re-running what completed. A tiny real grid: stories260K, 40 Dolly records, 2 cells of 2 optimizer steps."""

import csv
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lit_adapter.grid import runner as comparison
from lit_adapter.grid.cell_process import ChildResult, _Relay
from lit_adapter.grid.runner import grid_cells, load_grid, run_grid
from lit_adapter.errors import UserError

REPO = Path(__file__).resolve().parents[1]
CONTEXT = 160


def write_grid(path: Path, checkpoint: Path, shared_data: Path, out_dir: Path, lora_train=None) -> Path:
    grid = {
        "checkpoint_dir": str(checkpoint),
        "out_dir": str(out_dir),
        "data": {"source": str(shared_data / "dolly" / "local_training_1.json"), "val_size": 8, "max_records": 40,
                 "seed": 1},
        "context_lengths": [CONTEXT],
        "common": {"train": {"global_batch_size": 4, "micro_batch_size": 4, "max_steps": 2, "warmup_steps": 1,
                             "save_interval": 1},
                   "eval": {"interval": 1, "max_batches": 1},
                   "fabric": {"accelerator": "cpu", "precision": "32-true"}},
        "runs": [{"name": "adapter", "script": "adapter", "args": {"adapter": {"start_layer": 0}}},
                 {"name": "lora", "script": "lora", "args": {"lora": {"r": 2, "alpha": 4},
                                                              **({"train": lora_train} if lora_train else {})}}],
    }
    path.write_text(yaml.safe_dump(grid))
    return path


def _stamp(folder: Path):
    return {p.relative_to(folder): p.stat().st_mtime_ns for p in [folder / "summary.json", *folder.glob("final/*")]}


def test_stopped_grid_resumes_without_rerunning_completed_cells(tmp_path, stories260k, shared_data, capsys,
                                                                 monkeypatch):
    grid = load_grid(write_grid(tmp_path / "grid.yaml", stories260k, shared_data, tmp_path / "out"))
    first, second = grid.out_dir / "adapter-fp32-s1337", grid.out_dir / "lora-fp32-s1337"

    # the grid stopped after its first cell
    rows = run_grid(grid, only=["adapter"])
    assert [r["status"] for r in rows] == ["completed"]
    err = capsys.readouterr().err
    assert "[1/1 adapter/fp32/s1337] running" in err
    assert "[1/1 adapter/fp32/s1337] step 2/2, loss " in err  # the child's progress, relayed
    assert "[1/1 adapter/fp32/s1337] step 1: validation loss" in err
    completed = _stamp(first)

    # --resume: the completed cell is skipped and its recorded result reported; the other one runs
    rows = run_grid(grid, resume=True)
    err = capsys.readouterr().err
    assert "[1/2 adapter/fp32/s1337] completed earlier: skipped" in err
    assert "[2/2 lora/fp32/s1337] running" in err and "[2/2 lora/fp32/s1337] step 2/2" in err
    assert [(r["name"], r["status"]) for r in rows] == [("adapter/fp32/s1337", "completed"),
                                                        ("lora/fp32/s1337", "completed")]
    assert _stamp(first) == completed

    # the second cell interrupted (a summary saying so and its last.ckpt, no final/): continued from its checkpoint.
    # The child is stood in for here (tests/test_training.py checks that --resume continues a run exactly).
    summary = json.loads((second / "summary.json").read_text())
    (second / "summary.json").write_text(json.dumps({**summary, "status": "interrupted"}))
    shutil.rmtree(second / "final")
    commands = []

    def resumed_child(command, log_path, tag, timeout_s, append=False):
        commands.append((command, append))
        (second / "final").mkdir()
        (second / "summary.json").write_text(json.dumps(summary))
        return ChildResult(0)

    monkeypatch.setattr(comparison, "run_child", resumed_child)
    rows = run_grid(grid, resume=True)
    err = capsys.readouterr().err
    assert "[1/2 adapter/fp32/s1337] completed earlier: skipped" in err
    assert "[2/2 lora/fp32/s1337] resuming from last.ckpt" in err
    assert [command[-2:] for command, _ in commands] == [["--resume", "true"]] and commands[0][1]  # log appended
    assert (second / "last.ckpt").is_file()  # a resumed cell keeps its checkpoint
    assert _stamp(first) == completed
    with open(grid.out_dir / "results.csv") as f:  # the table holds the skipped cell's recorded result
        table = list(csv.DictReader(f))
    assert [(r["run"], r["status"], r["steps"]) for r in table] == [("adapter", "completed", "2"),
                                                                    ("lora", "completed", "2")]
    assert float(table[0]["val_loss"]) == json.loads((first / "summary.json").read_text())["final_val_loss"]


def test_a_misspelled_option_is_one_error_before_anything_runs(tmp_path, stories260k, shared_data):
    config = write_grid(tmp_path / "grid.yaml", stories260k, shared_data, tmp_path / "out",
                        lora_train={"learnig_rate": 0.01})
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "run_comparison.py"), "--config", str(config)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: cell lora/fp32/s1337: unknown option train.learnig_rate (did you mean "
                      "train.learning_rate?) for finetune/lora.py"], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()  # no data prepared, no cell run


def test_grid_level_mistakes(tmp_path, stories260k, shared_data):
    grid = load_grid(write_grid(tmp_path / "grid.yaml", stories260k, shared_data, tmp_path / "out"))
    with pytest.raises(UserError, match="--only 'lroa' matches no cell of the grid; its cells are adapter/fp32/s1337, "
                                        "lora/fp32/s1337"):
        grid_cells(grid, ["lroa"])
    raw = yaml.safe_load((tmp_path / "grid.yaml").read_text())
    raw["data"]["val_sise"] = 3
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(UserError, match="unknown data option 'val_sise'"):
        load_grid(tmp_path / "bad.yaml")


def test_progress_relay_parses_the_tqdm_bar_and_keeps_the_raw_log():
    log, console = io.StringIO(), io.StringIO()
    relay = _Relay("[2/5 lora @ 256]", log, console)
    chunks = ["  0%|          | 0/120 [00:00<?, ?step/s]\r 45%|####5     | 54/1",
              "20 [00:10<00:12,  5.12step/s, loss=3.4521, tok_s=12,345]\rstep 54: validation loss 3.3000\n",
              " 46%|####6     | 55/120 [00:10<00:12,  5.12step/s, loss=3.4000, tok_s=12,345]\n"
              "validation loss: before 4.0000, after 3.3000\n"]
    for chunk in chunks:
        relay.feed(chunk)
    relay.finish()
    assert log.getvalue() == "".join(chunks)
    lines = console.getvalue().splitlines()
    assert lines == ["[2/5 lora @ 256] step 0/120, ETA ?",  # the first bar is shown at once, later ones throttled
                     "[2/5 lora @ 256] step 54: validation loss 3.3000",
                     "[2/5 lora @ 256] step 55/120, loss 3.4000, ETA 00:12"]  # and the last one at the end
