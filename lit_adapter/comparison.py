"""Runs a grid of fine-tuning runs (methods x context lengths) on the same data and tabulates them.

Each cell is a separate ``finetune/<script>.py`` process with a generated YAML config, so an out-of-memory error
(or any crash) in one cell is recorded and the grid goes on. Every cell of one context length trains on the same
prepared split with the same shared hyper-parameters; only the method's own settings differ.

Before any cell runs, every cell's config is checked (:mod:`lit_adapter.grid_validation`): a misspelled option is
an error naming the cell. A grid can be stopped (Ctrl-C, SIGTERM, a cell's time limit: the running cell writes its
``last.ckpt``) and continued with ``resume=True``: cells whose folder holds a completed run (``summary.json`` with
status completed, and ``final/``) are skipped and keep their recorded results, cells with a ``last.ckpt`` continue
from it (``--resume true``), the others run. A cell whose config changed since it ran starts afresh.

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
import inspect
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import yaml

from lit_adapter.cell_process import run_child
from lit_adapter.errors import UserError, looks_like_out_of_memory
from lit_adapter.methods import METHODS

REPO_ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT_NAME = "last.ckpt"  # what lit_adapter.training writes and --resume reads
# Grid `data` keys that are the grid's to set per context, not prepare()'s options
_PREPARE_FIXED = ("destination_path", "tokenizer_path", "max_seq_length", "progress", "log")
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
    _check_data_settings(path, raw["data"])
    contexts = [int(c) for c in raw["context_lengths"]]
    if not contexts or any(c < 8 for c in contexts):
        raise UserError(f"{path}: context_lengths must be a non-empty list of lengths >= 8")
    return Grid(Path(raw["checkpoint_dir"]), Path(raw["out_dir"]), raw["data"], contexts, runs, raw.get("common") or {})


def _check_data_settings(path: Path, data: Any) -> None:
    from lit_adapter.data import prepare

    if not isinstance(data, dict):
        raise UserError(f"{path}: data must be a mapping of prepare options (source, val_size, ...)")
    allowed = [name for name in inspect.signature(prepare).parameters if name not in _PREPARE_FIXED]
    for key in data:
        if key not in allowed:
            raise UserError(f"{path}: unknown data option {key!r}; the data options are {', '.join(allowed)}"
                            + (" (max_seq_length comes from context_lengths)" if key == "max_seq_length" else ""))


def run_config(grid: Grid, run: GridRun, context: int, data_dir: Path, out_dir: Path) -> Dict[str, Any]:
    """The finetune script's config for one cell: common args, then the run's own, then the cell's paths."""
    cfg = deep_merge(grid.common, run.args)
    return deep_merge(cfg, {
        "checkpoint_dir": str(grid.checkpoint_dir),
        "out_dir": str(out_dir),
        "data": {"data_dir": str(data_dir), "max_seq_length": context},
    })


def data_dir_for(grid: Grid, context: int) -> Path:
    """The prepared split every cell of ``context`` tokens trains on."""
    return grid.out_dir / f"data-{context}"


def cell_config(grid: Grid, run: GridRun, context: int) -> Dict[str, Any]:
    """The config a cell's finetune script gets, with the grid's own folders."""
    return run_config(grid, run, context, data_dir_for(grid, context), cell_dir(grid, run, context))


def prepare_data(grid: Grid, context: int) -> Path:
    from lit_adapter.data import prepare

    data_dir = data_dir_for(grid, context)
    if (data_dir / "metadata.json").is_file() and _prepared_as(grid, context, json.loads(
            (data_dir / "metadata.json").read_text())):
        return data_dir
    settings = dict(grid.data)
    source = settings.pop("source", "databricks/databricks-dolly-15k")
    schema = settings.pop("schema", "dolly")
    prepare(data_dir, grid.checkpoint_dir, source=source, schema=schema, max_seq_length=context, **settings)
    return data_dir


def _prepared_as(grid: Grid, context: int, meta: Dict[str, Any]) -> bool:
    """Whether already prepared data (its metadata) was made with the grid's settings at ``context`` tokens."""
    from lit_adapter.data import DEFAULT_TRUNCATION

    if meta.get("max_seq_length") != context:
        return False
    # data prepared before the truncation policies existed has no policy: prepare it again
    if (meta.get("truncation") or {}).get("policy") != grid.data.get("truncation", DEFAULT_TRUNCATION):
        return False
    return all(meta.get(key) == grid.data[key] for key in ("val_size", "seed", "mask_inputs", "max_records")
               if key in grid.data)


def classify_failure(returncode: Optional[int], log_text: str) -> str:
    """``OOM``, ``error`` (a user error: the command's one-line ``error:``), ``interrupted``, ``timeout`` or
    ``failed``."""
    if returncode is None:
        return "timeout"
    if returncode in (-9, 137) or looks_like_out_of_memory(log_text):
        return "OOM"
    if returncode == 130:
        return "interrupted"
    if returncode == 2 and _error_line(log_text):
        return "error"
    return "failed"


def _error_line(log_text: str) -> str:
    """The message of the last ``error: ...`` line a command printed (``run_cli``'s one-line user errors)."""
    line = next((line for line in reversed(log_text.splitlines()) if line.startswith("error:")), "")
    return line[len("error:"):].strip()


def cell_dir(grid: Grid, run: GridRun, context: int) -> Path:
    return grid.out_dir / f"{run.name}-{context}"


def cell_state(folder: Path, config: Dict[str, Any]) -> str:
    """What a cell's folder holds for ``config``: ``completed``, ``resumable`` (a ``last.ckpt``), ``changed`` (outputs
    of another config) or ``new``."""
    config_path = folder / "run_config.yaml"
    if not config_path.is_file():
        return "new"
    try:
        same = yaml.safe_load(config_path.read_text()) == config
    except yaml.YAMLError:
        same = False
    if not same:
        return "changed"
    summary = _read_summary(folder)
    if summary is not None and summary.get("status") == "completed" and (folder / "final").is_dir():
        return "completed"
    return "resumable" if (folder / CHECKPOINT_NAME).is_file() else "new"


def _read_summary(folder: Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads((folder / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _row_from_summary(run: GridRun, context: int, summary: Dict[str, Any], log_path: Path) -> Dict[str, Any]:
    row: Dict[str, Any] = {"method": run.name, "context": context, "log": str(log_path)}
    row.update(
        status=summary["status"], trainable_params=summary["trainable_params"],
        avg_train_loss=summary["avg_train_loss"], initial_val_loss=summary["initial_val_loss"],
        val_loss=summary["final_val_loss"], train_time_s=summary["train_time_s"],
        tokens_per_s=summary["tokens_per_s"], peak_memory_gb=summary["peak_memory_gb"],
        peak_memory_kind=summary["peak_memory_kind"], steps=summary["steps"],
        train_losses=summary["train_losses"], val_losses=summary["val_losses"],
    )
    return row


def run_cell(grid: Grid, run: GridRun, context: int, data_dir: Path, timeout_s: Optional[float],
             tag: str = "", resume: bool = False) -> Dict[str, Any]:
    """Runs one cell in its own process (continuing from its ``last.ckpt`` with ``resume``) and returns its row.

    The row's ``status`` is the run's (``completed``) or :func:`classify_failure`'s; a failure's row has the
    log's last line as ``reason``."""
    folder = cell_dir(grid, run, context)
    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / "run_config.yaml"
    config_path.write_text(yaml.safe_dump(run_config(grid, run, context, data_dir, folder), sort_keys=False))
    (folder / "summary.json").unlink(missing_ok=True)
    if not resume:
        # A fresh run must not leave an older run's checkpoint behind: a later --resume would continue from it.
        (folder / CHECKPOINT_NAME).unlink(missing_ok=True)
        shutil.rmtree(folder / "final", ignore_errors=True)
    command = [sys.executable, str(REPO_ROOT / "finetune" / f"{run.script}.py"), "--config", str(config_path)]
    if resume:
        command += ["--resume", "true"]
    log_path = folder / "run.log"
    start = time.perf_counter()
    result = run_child(command, log_path, tag or f"[{run.name} @ {context}]", timeout_s, append=resume)
    summary = _read_summary(folder)
    if result.returncode == 0 and summary is not None:
        row = _row_from_summary(run, context, summary, log_path)
    else:
        log_text = log_path.read_text(errors="replace")
        status = classify_failure(result.returncode, log_text)
        tail = _error_line(log_text) or (log_text.strip().splitlines()[-1:] or [""])[0]
        row = {"method": run.name, "context": context, "log": str(log_path), "status": status,
               "train_time_s": time.perf_counter() - start, "reason": tail[:200]}
        if summary is not None:  # an interrupted run still says how far it got
            row.update(steps=summary.get("steps"), train_losses=summary.get("train_losses"),
                       val_losses=summary.get("val_losses"))
    row["interrupted"] = result.interrupted
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


def grid_cells(grid: Grid, only: Optional[List[str]] = None) -> List[Tuple[GridRun, int]]:
    """The cells to run, in order (context by context), restricted to the runs named in ``only``."""
    if only:
        unknown = [name for name in only if name not in {r.name for r in grid.runs}]
        if unknown:
            raise UserError(f"--only names no run {', '.join(map(repr, unknown))}; the grid's runs are "
                            f"{', '.join(r.name for r in grid.runs)}")
    cells = [(run, context) for context in grid.context_lengths for run in grid.runs if not only or run.name in only]
    if not cells:
        raise UserError("the grid has no runs")
    return cells


def check_cells(grid: Grid, cells: List[Tuple[GridRun, int]]) -> None:
    """Raises :class:`UserError` naming the first cell whose config its finetune script would reject."""
    from lit_adapter.config import Config
    from lit_adapter.grid_validation import CellChecker

    checker = CellChecker(Config.from_checkpoint_dir(grid.checkpoint_dir))
    for run, context in cells:
        checker.check(run.script, cell_config(grid, run, context), f"{run.name} @ {context}")


def run_grid(grid: Grid, only: Optional[List[str]] = None, timeout_s: Optional[float] = None,
             resume: bool = False) -> List[Dict[str, Any]]:
    """Checks every cell, then runs them (see the module docstring for ``resume``) and writes the results after
    each one. Returns the rows; raises ``KeyboardInterrupt`` once the results are written if the grid was stopped."""
    cells = grid_cells(grid, only)
    check_cells(grid, cells)
    rows: List[Dict[str, Any]] = []
    data_dirs: Dict[int, Path] = {}
    states = [cell_state(cell_dir(grid, run, context), cell_config(grid, run, context)) for run, context in cells]
    if not resume and "completed" in states:
        print(f"note: {states.count('completed')} of {len(cells)} cells already hold completed runs, which are run "
              "again; --resume true keeps them", file=sys.stderr)
    for index, ((run, context), state) in enumerate(zip(cells, states), 1):
        tag = f"[{index}/{len(cells)} {run.name} @ {context}]"
        folder = cell_dir(grid, run, context)
        if resume and state == "completed":
            rows.append(_row_from_summary(run, context, _read_summary(folder), folder / "run.log"))
            print(f"{tag} completed earlier: skipped (val loss {_fmt_loss(rows[-1])})", file=sys.stderr, flush=True)
            continue
        if context not in data_dirs:
            data_dirs[context] = prepare_data(grid, context)
        continuing = resume and state == "resumable"
        if resume and state == "changed":
            print(f"{tag} its config changed since it ran: running it afresh", file=sys.stderr, flush=True)
        print(f"{tag} {'resuming from ' + CHECKPOINT_NAME if continuing else 'running'} ...", file=sys.stderr,
              flush=True)
        row = run_cell(grid, run, context, data_dirs[context], timeout_s, tag, resume=continuing)
        rows.append(row)
        stopped = row.pop("interrupted")
        done = f" (val loss {_fmt_loss(row)})" if row["status"] == "completed" else f": {row.get('reason', '')}"
        print(f"{tag} {row['status']}{done}", file=sys.stderr, flush=True)
        write_results(rows, grid.out_dir, "Fine-tuning comparison")
        if stopped:
            print(f"grid stopped at cell {index} of {len(cells)}; run the same command with --resume true to "
                  "continue it", file=sys.stderr, flush=True)
            raise KeyboardInterrupt
    write_results(rows, grid.out_dir, "Fine-tuning comparison")
    return rows


def _fmt_loss(row: Dict[str, Any]) -> str:
    before, after = row.get("initial_val_loss"), row.get("val_loss")
    fmt = lambda x: "n/a" if x is None else f"{x:.4f}"  # noqa: E731
    return f"{fmt(before)} -> {fmt(after)}"


def failed_cells(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The rows of cells that failed for a user error or a crash (an out-of-memory cell or a time limit is a
    result of the grid, not a failure of it)."""
    return [r for r in rows if r["status"] in ("error", "failed")]
