"""Fine-tuning with a classification head, as a grid: seed 002's study of full fine-tuning, LoRA and P-tuning on
MultiNLI, whose table gives each row's trainable parameters, time and accuracy.

A grid file whose ``study:`` section says ``objective: head`` runs every cell as ``finetune/classify.py <method>``
(:mod:`lit_adapter.train.classification`) in its own process, so an out-of-memory cell is recorded and the study
goes on. The cells share ``common`` (the labelled data under ``common.data``, read by each cell itself: nothing is
prepared for them) and differ in the method and its settings; a context length is the cells' ``data.max_seq_length``.
Every cell is checked against that command before the first one runs.

Each cell chooses ``best/`` by its lowest validation loss after step 0 on the validation split (for MultiNLI a
slice held out of train) and scores ``best/`` itself, reloaded from disk, on every test split (MultiNLI's
``validation_matched`` and ``validation_mismatched``): accuracy and macro-F1 in the cell's ``test_metrics.json``.
The table takes them from there, with the trainable parameters (the head included) and the training time of the
run's ``summary.json``. Outputs in ``out_dir``: ``study.md`` and ``study.json``.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

from lit_adapter.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[2]
CLASSIFY_SCRIPT = "finetune/classify.py {method}"


@dataclass
class HeadStudySettings:
    """The ``study:`` section of a head study's grid file."""

    objective: str = "head"
    """head: each cell is finetune/classify.py <method> (generation: the study by generated labels)."""
    title: str = "classification with a head"
    """The table's caption."""


def is_head_study(path: Path) -> bool:
    """Whether the grid file at ``path`` is a head study (``study.objective: head``)."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(raw.get("study"), dict) and raw["study"].get("objective") == "head"


def load_study(config: Path, checkpoint_dir: Optional[Path] = None, out_dir: Optional[Path] = None):
    """``(settings, grid)`` of a head study's file, with the command line's overrides."""
    from lit_adapter.grid.spec import load_grid

    raw = yaml.safe_load(Path(config).read_text()) or {}
    try:
        settings = HeadStudySettings(**(raw.get("study") or {}))
    except TypeError as err:
        raise UserError(f"{config}: the study section does not fit ({err})") from None
    overrides: Dict[str, Any] = {"data": raw.get("data") or {}}
    if checkpoint_dir is not None:
        overrides["checkpoint_dir"] = str(checkpoint_dir)
    if out_dir is not None:
        overrides["out_dir"] = str(out_dir)
    grid = load_grid(config, overrides, extra_keys=("study",))
    if grid.data:
        raise UserError(f"{config}: a head study prepares no data (data: {{}}); the cells' labelled data are "
                        "common.data (finetune/classify.py's --data.*)")
    return settings, grid


def cell_options(grid, cell) -> Dict[str, Any]:
    """The config ``finetune/classify.py <method>`` gets for ``cell``: common, the run's own, its axes, its paths."""
    from lit_adapter.grid.spec import deep_merge, options_of

    cfg = options_of(grid, cell.run, cell.attention, cell.quantize, cell.seed)
    return deep_merge(cfg, {"checkpoint_dir": str(grid.checkpoint_dir),
                            "out_dir": str(Path(grid.out_dir) / cell.folder_name),
                            "data": {"max_seq_length": cell.context}})


def check_study(grid, cells, config=None) -> None:
    """Every cell's options against ``finetune/classify.py <method>`` (one line naming the first bad cell)."""
    from lit_adapter.grid.validation import CellChecker
    from lit_adapter.model.config import Config
    from lit_adapter.train.classification import command

    if config is None and (Path(grid.checkpoint_dir) / "model_config.json").is_file():
        config = Config.from_checkpoint_dir(grid.checkpoint_dir)
    checker = CellChecker(config, command=command, script=CLASSIFY_SCRIPT)
    for cell in cells:
        checker.check(cell.run.script, cell_options(grid, cell), cell.name)


def run_cell(grid, cell, timeout_s: Optional[float], tag: str) -> Dict[str, Any]:
    """Runs one cell in its own process and returns its row: status, trainable parameters, time, best step and
    each test split's accuracy and macro-F1 of ``best/``."""
    from lit_adapter.grid.cell_process import run_child
    from lit_adapter.grid.runner import classify_failure, contention, machine_load
    from lit_adapter.tuners.registry import get_method

    folder = Path(grid.out_dir) / cell.folder_name
    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / "run_config.yaml"
    config_path.write_text(yaml.safe_dump(cell_options(grid, cell), sort_keys=False))
    for stale in ("summary.json", "test_metrics.json"):
        (folder / stale).unlink(missing_ok=True)
    command = [sys.executable, str(REPO_ROOT / "finetune" / "classify.py"), cell.run.script, "--config",
               str(config_path), "--overwrite", "true"]
    load_before, start = machine_load(), time.perf_counter()
    result = run_child(command, folder / "run.log", tag, timeout_s)
    group = get_method(cell.run.script).settings_group  # the method's own options (lora: {r: 8, ...})
    row: Dict[str, Any] = {**cell.axes(), "folder": str(folder), "settings": cell.run.args.get(group or "") or {},
                           "wall_time_s": time.perf_counter() - start, **contention(load_before, machine_load())}
    summary_path, metrics_path = folder / "summary.json", folder / "test_metrics.json"
    if result.returncode != 0 or not summary_path.is_file() or not metrics_path.is_file():
        log = (folder / "run.log").read_text(errors="replace")
        lines = [line for line in log.strip().splitlines() if line.strip()]
        return {**row, "status": classify_failure(result.returncode, log), "reason": (lines[-1:] or [""])[0][:200]}
    summary, metrics = json.loads(summary_path.read_text()), json.loads(metrics_path.read_text())
    splits = metrics.get("splits") or {"test": metrics}
    return {**row, "status": summary.get("status", "completed"), "trainable_params": summary["trainable_params"],
            "total_params": summary["total_params"], "train_time_s": summary["train_time_s"],
            "steps": summary["steps"], "best_val_step": summary.get("best_val_step"),
            "best_val_loss": summary.get("best_val_loss"), "val_losses": summary.get("val_losses") or [],
            "evaluated": Path(metrics["checkpoint"]).name,
            "test": {name: {"accuracy": s["accuracy"], "macro_f1": s["macro_f1"], "examples": s["examples"]}
                     for name, s in splits.items()}}


def run_head_study(config: Path, checkpoint_dir: Optional[Path] = None, out_dir: Optional[Path] = None,
                   only: Optional[List[str]] = None, timeout_s: Optional[float] = None) -> Dict[str, Any]:
    """Checks every cell, runs them one after another and writes ``study.md`` / ``study.json``."""
    from lit_adapter.grid.spec import expand, select

    settings, grid = load_study(config, checkpoint_dir, out_dir)
    cells = select(expand(grid), only)
    check_study(grid, cells)
    Path(grid.out_dir).mkdir(parents=True, exist_ok=True)
    rows = []
    for index, cell in enumerate(cells, 1):
        tag = f"[{index}/{len(cells)} {cell.name}]"
        print(f"{tag} running finetune/classify.py {cell.run.script} ...", file=sys.stderr, flush=True)
        rows.append(run_cell(grid, cell, timeout_s, tag))
        print(f"{tag} {rows[-1]['status']}", file=sys.stderr, flush=True)
    report = {"settings": asdict(settings), "checkpoint_dir": str(grid.checkpoint_dir), "cells": rows}
    (Path(grid.out_dir) / "study.json").write_text(json.dumps(report, indent=2) + "\n")
    (Path(grid.out_dir) / "study.md").write_text(format_table(report) + "\n")
    return report


def _duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "—"
    if seconds >= 3600:
        return f"{int(seconds // 3600)} h {round(seconds % 3600 / 60):d} min"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"


def format_table(report: Dict[str, Any]) -> str:
    """Seed 002's table: one row per cell with trainable parameters, training time and the accuracy (and
    macro-F1) of ``best/`` on each test split."""
    splits: List[str] = []
    for cell in report["cells"]:
        splits += [name for name in cell.get("test", {}) if name not in splits]
    head = ["method", "trainable parameters", "training time", "best step",
            *(f"accuracy {name}" for name in splits), *(f"macro-F1 {name}" for name in splits)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    runs = [cell["run"] for cell in report["cells"]]
    for cell in report["cells"]:
        name = cell["run"] if len(set(runs)) == len(runs) else cell["name"]  # the cell's name where runs repeat
        if cell["status"] != "completed":
            lines.append(f"| {name} | " + " | ".join([cell["status"]] + ["—"] * (len(head) - 2)) + " |")
            continue
        test = cell["test"]
        accuracy = [f"{100 * test[n]['accuracy']:.2f}%" if n in test else "—" for n in splits]
        f1 = [f"{test[n]['macro_f1']:.4f}" if n in test else "—" for n in splits]
        lines.append(f"| {name} | {cell['trainable_params']:,} | {_duration(cell['train_time_s'])} | "
                     f"{cell.get('best_val_step', '—')} | " + " | ".join(accuracy + f1) + " |")
    return "\n".join(lines)
