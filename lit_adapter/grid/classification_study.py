"""Fine-tuning for classification *by generation*, as a grid: seed 004's LoRA rank study on Rotten Tomatoes.

Each training example is the Alpaca-template prompt the generation evaluation uses
(:func:`lit_adapter.evaluation.classification.build_prompt` with ``template="instruction"``: the task as the
instruction, ``Review: ...`` as the input) followed by the verbalised label (``positive`` / ``negative``) and EOS; the
prompt is masked, so the loss covers the label's tokens and the EOS that ends the answer (which is what makes the
fine-tuned model stop after it). The cells are ordinary ``finetune/<method>.py`` runs of
:mod:`lit_adapter.grid.runner` (each in its own process, an OOM recorded and the grid going on), all on the same
prepared data and shared hyper-parameters.

The test split is held out before anything is prepared (Rotten Tomatoes is split train/validation/test with a seed,
:mod:`lit_adapter.data.classification`); the validation examples that choose ``best/`` are drawn from the rest. After
training every cell's ``best/`` (the lowest validation loss after step 0; ``final/`` when there is none) is
evaluated on the test split by greedy generation: an answer that names no label, or both, is *wrong* and counted in
the no-answer rate. The base model is evaluated the same way (zero-shot, the same prompt) as the "no fine-tuning"
row. Outputs in ``out_dir``: ``study.md`` (the table), ``study.json`` (every number and answer count),
``val_loss_curves.png`` (the validation loss of every cell against the step), and the grid's own files.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

from lit_adapter.errors import UserError

RECORDS_FILE = "train_val_records.jsonl"


@dataclass
class StudySettings:
    """The ``study:`` section of the grid file."""

    task: str = "sentiment"
    """Only sentiment (Rotten Tomatoes) for now: its labels are what the generation evaluation parses."""
    data_dir: Optional[str] = None
    """The folder holding rotten_tomatoes/ (default: ../shared/data beside the checkout)."""
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 42
    max_train_examples: Optional[int] = None
    """Train and validate on at most this many of the non-test examples (a miniature)."""
    max_test_examples: Optional[int] = None
    """Evaluate on the first N test examples (a miniature)."""
    max_new_tokens: int = 8
    """Tokens generated per answer (enough for the label and EOS: stories260K's vocabulary spells "positive" in 6)."""
    evaluate_base: bool = True
    """Also evaluate the base model zero-shot with the same prompt (the no-fine-tuning row)."""


def load_settings(path: Path) -> StudySettings:
    raw = yaml.safe_load(Path(path).read_text()) or {}
    section = raw.get("study") or {}
    try:
        settings = StudySettings(**section)
    except TypeError as err:
        raise UserError(f"{path}: the study section does not fit ({err})") from None
    if not 0 < settings.test_fraction < 1:  # else the "test" accuracy would be on reviews it trained on
        raise UserError(f"{path}: study.test_fraction={settings.test_fraction}; it must lie in (0, 1): the study's "
                        "accuracy is measured on reviews held out from training")
    if settings.max_test_examples is not None and settings.max_test_examples < 1:
        raise UserError(f"{path}: study.max_test_examples={settings.max_test_examples}; evaluate at least 1")
    if settings.task != "sentiment":
        raise UserError(f"{path}: study.task={settings.task!r}; only sentiment (Rotten Tomatoes) is supported")
    return settings


def write_records(settings: StudySettings, out_dir: Path) -> Dict[str, Any]:
    """Splits Rotten Tomatoes, writes the train+validation records (Alpaca format) and returns the test split."""
    from lit_adapter.data.classification import ClassifyData, load_splits
    from lit_adapter.evaluation import DEFAULT_DATA_DIR
    from lit_adapter.evaluation.classification import INSTRUCTIONS, build_prompt

    data = ClassifyData(data_dir=Path(settings.data_dir) if settings.data_dir else None,
                        val_fraction=settings.val_fraction, test_fraction=settings.test_fraction, seed=settings.seed)
    splits = load_splits(data, DEFAULT_DATA_DIR)
    trainval = splits.train + splits.val
    if settings.max_train_examples is not None:
        trainval = trainval[: settings.max_train_examples]
    test = splits.test[: settings.max_test_examples] if settings.max_test_examples else splits.test
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / RECORDS_FILE
    lines = []
    for example in trainval:
        # the input is the evaluation prompt's input exactly (build_prompt's "instruction" template)
        record = {"instruction": INSTRUCTIONS[settings.task], "input": f"Review: {example.fields[0]}",
                  "output": example.label}
        lines.append(json.dumps(record, ensure_ascii=False))
    path.write_text("\n".join(lines) + "\n")
    probe = build_prompt(settings.task, [], test[0], "instruction")
    assert f"Review: {test[0].fields[0]}" in probe  # the records and the evaluation share one prompt
    val_size = max(1, round(len(trainval) * settings.val_fraction / (1 - settings.test_fraction)))
    return {"records": path, "val_size": val_size, "test": test, "trainval": len(trainval),
            "source": splits.source}


def evaluate_folder(checkpoint_dir: Path, folder: Optional[Path], test, settings: StudySettings) -> Dict[str, Any]:
    """Accuracy and no-answer rate by greedy generation of ``folder`` (``None``: the base) on ``test``."""
    from lit_adapter.evaluation import load_model
    from lit_adapter.evaluation.classification import evaluate_classification

    _, model, tokenizer, _, _ = load_model(checkpoint_dir, folder, device="cpu" if not _cuda() else None)
    result, _ = evaluate_classification(model, tokenizer, settings.task, test, shots=0, template="instruction",
                                        max_new_tokens=settings.max_new_tokens, pool=[], seed=settings.seed)
    return {"accuracy": result.accuracy, "correct": result.correct, "examples": result.examples,
            "no_answer": result.no_answer, "no_answer_rate": result.no_answer_rate, "per_label": result.per_label}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def run_study(config: Path, checkpoint_dir: Optional[Path] = None, out_dir: Optional[Path] = None,
              only: Optional[List[str]] = None, timeout_s: Optional[float] = None) -> Dict[str, Any]:
    """Prepares the data, runs the grid, evaluates every ``best/`` on the test split and writes the study table."""
    from lit_adapter.grid.runner import load_grid, run_grid

    settings = load_settings(config)
    overrides: Dict[str, Any] = {}
    if checkpoint_dir is not None:
        overrides["checkpoint_dir"] = str(checkpoint_dir)
    if out_dir is not None:
        overrides["out_dir"] = str(out_dir)
    grid = load_grid(config, overrides, extra_keys=("study",))
    prepared = write_records(settings, grid.out_dir)
    grid.data = {**grid.data, "source": str(prepared["records"]), "schema": "alpaca",
                 "val_size": prepared["val_size"], "mask_inputs": True}
    print(f"{prepared['source']}: {prepared['trainval']} train+validation records ({prepared['val_size']} for "
          f"validation), {len(prepared['test'])} test examples held out", file=sys.stderr)
    import shutil

    for context in grid.context_lengths:  # the grid reuses prepared data by length alone: these records are new
        shutil.rmtree(grid.out_dir / f"data-{context}", ignore_errors=True)
    rows = run_grid(grid, only=only, timeout_s=timeout_s)
    base = None
    if settings.evaluate_base:
        base = evaluate_folder(grid.checkpoint_dir, None, prepared["test"], settings)
    cells = []
    for row in rows:
        cell_dir = Path(row["folder"])
        run = next(r for r in grid.runs if r.name == row["run"])
        cell = {"name": row["run"], "script": run.script, "settings": run.args.get(run.script) or {},
                "context": row["context"], "status": row["status"], "trainable_params": row.get("trainable_params"),
                "val_losses": row.get("val_losses") or []}
        summary_path = cell_dir / "summary.json"
        if row["status"] == "completed" and summary_path.is_file():
            summary = json.loads(summary_path.read_text())
            folder = cell_dir / ("best" if (cell_dir / "best").is_dir() else "final")
            cell.update(best_val_step=summary.get("best_val_step"), best_val_loss=summary.get("best_val_loss"),
                        initial_val_loss=summary.get("initial_val_loss"), evaluated=folder.name,
                        test=evaluate_folder(grid.checkpoint_dir, folder, prepared["test"], settings))
        cells.append(cell)
    report = {"settings": asdict(settings), "checkpoint_dir": str(grid.checkpoint_dir), "base": base, "cells": cells,
              "test_examples": len(prepared["test"]), "source": prepared["source"]}
    (grid.out_dir / "study.json").write_text(json.dumps(report, indent=2) + "\n")
    (grid.out_dir / "study.md").write_text(format_table(report) + "\n")
    plot_val_losses(cells, grid.out_dir / "val_loss_curves.png")
    return report


def format_table(report: Dict[str, Any]) -> str:
    """The study as a markdown table: one row per cell, the base model first."""
    def pct(x):
        return "—" if x is None else f"{100 * x:.1f}%"

    lines = ["| method | r | alpha | parameters tuned | best step | best val loss | test accuracy (best/) | "
             "no answer |", "|---|---|---|---|---|---|---|---|"]
    base = report.get("base")
    if base:
        lines.append(f"| base model, zero-shot (no fine-tuning) | — | — | 0 | — | — | {pct(base['accuracy'])} | "
                     f"{pct(base['no_answer_rate'])} |")
    for cell in report["cells"]:
        test = cell.get("test") or {}
        r, alpha = cell["settings"].get("r", "—"), cell["settings"].get("alpha", "—")
        loss = cell.get("best_val_loss")
        lines.append(
            f"| {cell['name']} | {r} | {alpha if alpha == '—' else f'{alpha:g}'} | "
            f"{cell['trainable_params'] or '—':,} | {cell.get('best_val_step', '—')} | "
            f"{'—' if loss is None else f'{loss:.4f}'} | "
            f"{pct(test.get('accuracy')) if cell['status'] == 'completed' else cell['status']} | "
            f"{pct(test.get('no_answer_rate'))} |")
    return "\n".join(lines)


def plot_val_losses(cells: List[Dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for cell in cells:
        if cell["val_losses"]:
            steps, losses = zip(*cell["val_losses"])
            ax.plot(steps, losses, "o-", markersize=3, label=cell["name"])
            if cell.get("best_val_step") is not None:
                ax.plot([cell["best_val_step"]], [cell["best_val_loss"]], "k*", markersize=9)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation loss (label tokens + EOS)")
    ax.set_title("validation loss per cell (* = best/, evaluated on test)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
