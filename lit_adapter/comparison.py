"""Runs a grid of fine-tuning runs (methods x context lengths) on the same data and tabulates them.

Each cell is a separate ``finetune/<script>.py`` process with a generated YAML config, so an out-of-memory error
(or any crash) in one cell is recorded and the grid goes on. Every cell of one context length trains on the same
prepared split with the same shared hyper-parameters; only the method's own settings differ.

Grid file (see ``configs/comparison_*.yaml``)::

    checkpoint_dir: checkpoints/Llama-2-7b
    out_dir: out/comparison
    data: {source: databricks/databricks-dolly-15k, val_size: 2000, seed: 42, mask_inputs: true}
    context_lengths: [512, 1024]
    common: {train: {...}, eval: {...}, quantize: null}     # passed to every run
    runs:
      - {name: adapter_v2+sparse, script: adapter_v2, args: {attention: {pattern: shifted}}}
"""

from __future__ import annotations

import copy
import csv
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

from lit_adapter.errors import UserError, looks_like_out_of_memory
from lit_adapter.methods import METHODS

REPO_ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ("method", "context", "status", "trainable_params", "avg_train_loss", "initial_val_loss", "val_loss",
           "train_time_s", "tokens_per_s", "peak_memory_gb", "peak_memory_kind", "steps")


@dataclass
class GridRun:
    name: str
    script: str
    args: Dict[str, Any] = field(default_factory=dict)


@dataclass
class Grid:
    checkpoint_dir: Path
    out_dir: Path
    data: Dict[str, Any]
    context_lengths: List[int]
    runs: List[GridRun]
    common: Dict[str, Any] = field(default_factory=dict)


def deep_merge(base: Dict[str, Any], update: Dict[str, Any]) -> Dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in (update or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_grid(path: Path, overrides: Optional[Dict[str, Any]] = None) -> Grid:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"grid config not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{path} is not valid YAML: {err}") from None
    raw = deep_merge(raw, overrides or {})
    missing = [k for k in ("checkpoint_dir", "out_dir", "data", "context_lengths", "runs") if k not in raw]
    if missing:
        raise UserError(f"{path} misses {', '.join(missing)}")
    runs = []
    for i, run in enumerate(raw["runs"]):
        if not isinstance(run, dict) or "name" not in run or "script" not in run:
            raise UserError(f"{path}: runs[{i}] needs a name and a script")
        if run["script"] not in METHODS:  # every registered method has its finetune/<method>.py
            raise UserError(f"{path}: runs[{i}].script={run['script']!r}; choose one of {', '.join(METHODS)}")
        runs.append(GridRun(run["name"], run["script"], run.get("args") or {}))
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise UserError(f"{path}: run names must be unique, got {names}")
    contexts = [int(c) for c in raw["context_lengths"]]
    if not contexts or any(c < 8 for c in contexts):
        raise UserError(f"{path}: context_lengths must be a non-empty list of lengths >= 8")
    return Grid(Path(raw["checkpoint_dir"]), Path(raw["out_dir"]), raw["data"], contexts, runs, raw.get("common") or {})


def run_config(grid: Grid, run: GridRun, context: int, data_dir: Path, out_dir: Path) -> Dict[str, Any]:
    """The finetune script's config for one cell: common args, then the run's own, then the cell's paths."""
    cfg = deep_merge(grid.common, run.args)
    return deep_merge(cfg, {
        "checkpoint_dir": str(grid.checkpoint_dir),
        "out_dir": str(out_dir),
        "data": {"data_dir": str(data_dir), "max_seq_length": context},
    })


def prepare_data(grid: Grid, context: int) -> Path:
    from lit_adapter.data import prepare

    data_dir = grid.out_dir / f"data-{context}"
    if (data_dir / "metadata.json").is_file():
        meta = json.loads((data_dir / "metadata.json").read_text())
        if meta.get("max_seq_length") == context:
            return data_dir
    settings = dict(grid.data)
    source = settings.pop("source", "databricks/databricks-dolly-15k")
    schema = settings.pop("schema", "dolly")
    prepare(data_dir, grid.checkpoint_dir, source=source, schema=schema, max_seq_length=context, **settings)
    return data_dir


def classify_failure(returncode: int, log_text: str) -> str:
    if returncode in (-9, 137) or looks_like_out_of_memory(log_text):
        return "OOM"
    return "failed"


def run_cell(grid: Grid, run: GridRun, context: int, data_dir: Path, timeout_s: Optional[float]) -> Dict[str, Any]:
    cell_dir = grid.out_dir / f"{run.name}-{context}"
    cell_dir.mkdir(parents=True, exist_ok=True)
    config_path = cell_dir / "run_config.yaml"
    config_path.write_text(yaml.safe_dump(run_config(grid, run, context, data_dir, cell_dir), sort_keys=False))
    (cell_dir / "summary.json").unlink(missing_ok=True)
    command = [sys.executable, str(REPO_ROOT / "finetune" / f"{run.script}.py"), "--config", str(config_path)]
    log_path = cell_dir / "run.log"
    start = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
            returncode = proc.returncode
        except subprocess.TimeoutExpired:
            returncode = None
    row: Dict[str, Any] = {"method": run.name, "context": context, "log": str(log_path)}
    summary_path = cell_dir / "summary.json"
    if returncode == 0 and summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        row.update(
            status=summary["status"], trainable_params=summary["trainable_params"],
            avg_train_loss=summary["avg_train_loss"], initial_val_loss=summary["initial_val_loss"],
            val_loss=summary["final_val_loss"], train_time_s=summary["train_time_s"],
            tokens_per_s=summary["tokens_per_s"], peak_memory_gb=summary["peak_memory_gb"],
            peak_memory_kind=summary["peak_memory_kind"], steps=summary["steps"],
            train_losses=summary["train_losses"], val_losses=summary["val_losses"],
        )
    else:
        status = "timeout" if returncode is None else classify_failure(returncode, log_path.read_text())
        row.update(status=status, train_time_s=time.perf_counter() - start)
        tail = log_path.read_text().strip().splitlines()[-1:] or [""]
        print(f"  {run.name} @ {context}: {status} (exit {returncode}): {tail[0][:200]}", file=sys.stderr)
    return row


def write_results(rows: List[Dict[str, Any]], out_dir: Path, title: str) -> Dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path, png_path = out_dir / "results.csv", out_dir / "results.md", out_dir / "loss_curves.png"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)

    def fmt(value: Any, spec: str) -> str:
        return "—" if value is None else format(value, spec)

    lines = [
        f"# {title}", "",
        "| method | context | status | parameters tuned | avg train loss | val loss (before → after) | "
        "training time (s) | tokens/s | peak memory (GB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        before, after = r.get("initial_val_loss"), r.get("val_loss")
        val = f"{fmt(before, '.4f')} → {fmt(after, '.4f')}" if after is not None else "—"
        lines.append(
            f"| {r['method']} | {r['context']} | {r['status']} | {fmt(r.get('trainable_params'), ',')} | "
            f"{fmt(r.get('avg_train_loss'), '.4f')} | {val} | {fmt(r.get('train_time_s'), '.1f')} | "
            f"{fmt(r.get('tokens_per_s'), ',.0f')} | {fmt(r.get('peak_memory_gb'), '.2f')} |"
        )
    kinds = {r.get("peak_memory_kind") for r in rows if r.get("peak_memory_kind")}
    if kinds:
        lines += ["", f"Peak memory: {', '.join(sorted(kinds))} (process_peak_rss on CPU includes the Python "
                      "process and the frozen base; cuda_max_allocated is the CUDA allocator's peak)."]
    md_path.write_text("\n".join(lines) + "\n")
    plot_losses(rows, png_path)
    return {"csv": csv_path, "md": md_path, "png": png_path}


def plot_losses(rows: List[Dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = sorted({r["context"] for r in rows})
    fig, axes = plt.subplots(1, len(contexts), figsize=(6 * len(contexts), 4.2), squeeze=False)
    for ax, context in zip(axes[0], contexts):
        for r in (r for r in rows if r["context"] == context and r.get("train_losses")):
            steps, losses = zip(*r["train_losses"])
            (line,) = ax.plot(steps, losses, label=f"{r['method']} (train)", alpha=0.8)
            if r.get("val_losses"):
                vs, vl = zip(*r["val_losses"])
                ax.plot(vs, vl, "o--", color=line.get_color(), label=f"{r['method']} (val)", markersize=4)
        failed = [f"{r['method']}: {r['status']}" for r in rows if r["context"] == context and not r.get("train_losses")]
        if failed:
            ax.text(0.02, 0.02, "\n".join(failed), transform=ax.transAxes, fontsize=8, color="red")
        ax.set_title(f"context {context}")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_grid(grid: Grid, only: Optional[List[str]] = None, timeout_s: Optional[float] = None) -> List[Dict[str, Any]]:
    rows = []
    for context in grid.context_lengths:
        data_dir = prepare_data(grid, context)
        for run in grid.runs:
            if only and run.name not in only:
                continue
            print(f"[{run.name} @ {context}] running ...", file=sys.stderr, flush=True)
            row = run_cell(grid, run, context, data_dir, timeout_s)
            print(f"[{run.name} @ {context}] {row['status']}", file=sys.stderr, flush=True)
            rows.append(row)
            write_results(rows, grid.out_dir, "Fine-tuning comparison")
    return rows
