"""Runs a grid of fine-tuning runs (methods x attention x base quantization x context x seeds) on the same data and
tabulates them. The grid file and its cells' names: :mod:`lit_adapter.grid.spec`; the results files:
:mod:`lit_adapter.grid.report`; WandB: :mod:`lit_adapter.grid.wandb_runs`.

Each cell is a separate ``finetune/<script>.py`` process with a generated YAML config, so an out-of-memory error
(or any crash) in one cell is recorded and the grid goes on. Every cell of one context length trains on the same
prepared split with the same shared hyper-parameters; only the method's own settings and the cell's axes differ.

Before any cell runs, every cell's config is checked (:mod:`lit_adapter.grid.validation`): a misspelled option is
an error naming the cell. A grid can be stopped (Ctrl-C, SIGTERM, a cell's time limit: the running cell writes its
``last.ckpt``) and continued with ``resume=True``: cells whose folder holds a completed run (``summary.json`` with
status completed, and ``final/``) are skipped and keep their recorded results, cells with a ``last.ckpt`` continue
from it (``--resume true``), the others run. A cell whose config changed since it ran starts afresh.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

from lit_adapter.grid.cell_process import run_child
from lit_adapter.errors import UserError, looks_like_out_of_memory
from lit_adapter.grid.report import write_results
from lit_adapter.grid.spec import Cell, Grid, GridRun, deep_merge, expand, load_grid, options_of, select

# the grid's file format lives in lit_adapter.grid.spec; these names stay importable from here
__all__ = ["Cell", "Grid", "GridRun", "deep_merge", "load_grid", "run_grid", "grid_cells", "write_results"]

REPO_ROOT = Path(__file__).resolve().parents[2]
CHECKPOINT_NAME = "last.ckpt"  # what lit_adapter.train.run writes and --resume reads


def run_config(grid: Grid, cell: Cell, data_dir: Path, out_dir: Path) -> Dict[str, Any]:
    """The finetune script's config for one cell: common args, the run's own, the cell's axes, then its paths (and
    with a WandB logger, the cell's run in the grid's group: :func:`lit_adapter.grid.wandb_runs.cell_logger`)."""
    from lit_adapter.grid.wandb_runs import cell_logger

    cfg = options_of(grid, cell.run, cell.attention, cell.quantize, cell.seed)
    cfg = deep_merge(cfg, {
        "checkpoint_dir": str(grid.checkpoint_dir),
        "out_dir": str(out_dir),
        "data": {"data_dir": str(data_dir), "max_seq_length": cell.context},
    })
    logger = cell_logger(grid, cell, cfg.get("logger") or {})
    return deep_merge(cfg, {"logger": logger}) if logger else cfg


def data_dir_for(grid: Grid, context: int) -> Path:
    """The prepared split every cell of ``context`` tokens trains on."""
    return grid.out_dir / f"data-{context}"


def cell_config(grid: Grid, cell: Cell) -> Dict[str, Any]:
    """The config a cell's finetune script gets, with the grid's own folders."""
    return run_config(grid, cell, data_dir_for(grid, cell.context), cell_dir(grid, cell))


def prepare_data(grid: Grid, context: int) -> Path:
    from lit_adapter.data.instructions import prepare

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
    from lit_adapter.data.instructions import DEFAULT_TRUNCATION

    if meta.get("max_seq_length") != context:
        return False
    # data prepared before the truncation policies existed has no policy: prepare it again
    if (meta.get("truncation") or {}).get("policy") != grid.data.get("truncation", DEFAULT_TRUNCATION):
        return False
    # nor task categories: prepare it again (the same examples, now with their categories) for the per-task view
    if "categories" not in meta:
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


def cell_dir(grid: Grid, cell: Cell) -> Path:
    return grid.out_dir / cell.folder_name


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


def _row_from_summary(cell: Cell, summary: Dict[str, Any], folder: Path) -> Dict[str, Any]:
    row = _row_base(cell, folder)
    after_start = [loss for step, loss in summary["val_losses"] if step > 0]
    row.update(
        status=summary["status"], trainable_params=summary["trainable_params"],
        total_params=summary.get("total_params"), avg_train_loss=summary["avg_train_loss"],
        initial_val_loss=summary["initial_val_loss"],
        avg_val_loss=sum(after_start) / len(after_start) if after_start else None,
        val_loss=summary["final_val_loss"], best_val_loss=summary.get("best_val_loss"),
        train_time_s=summary["train_time_s"], tokens_per_s=summary["tokens_per_s"],
        peak_memory_gb=summary["peak_memory_gb"], peak_memory_kind=summary["peak_memory_kind"],
        steps=summary["steps"], train_losses=summary["train_losses"], val_losses=summary["val_losses"],
        # the multi-task view (grid/categories.py); empty for data with one category or runs before it existed
        val_loss_by_category=summary.get("final_val_loss_by_category") or {},
        initial_val_loss_by_category=summary.get("initial_val_loss_by_category") or {},
    )
    return row


def _row_base(cell: Cell, folder: Path) -> Dict[str, Any]:
    return {**cell.axes(), "folder": str(folder), "log": str(folder / "run.log")}


def run_cell(grid: Grid, cell: Cell, data_dir: Path, timeout_s: Optional[float], tag: str = "",
             resume: bool = False) -> Dict[str, Any]:
    """Runs one cell in its own process (continuing from its ``last.ckpt`` with ``resume``) and returns its row.

    The row's ``status`` is the run's (``completed``) or :func:`classify_failure`'s; a failure's row has the
    log's last line as ``reason``."""
    folder = cell_dir(grid, cell)
    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / "run_config.yaml"
    config = run_config(grid, cell, data_dir, folder)
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    (folder / "summary.json").unlink(missing_ok=True)
    if not resume:
        # A fresh run must not leave an older run's checkpoint behind: a later --resume would continue from it.
        (folder / CHECKPOINT_NAME).unlink(missing_ok=True)
        shutil.rmtree(folder / "final", ignore_errors=True)
    command = [sys.executable, str(REPO_ROOT / "finetune" / f"{cell.run.script}.py"), "--config", str(config_path)]
    if resume:
        command += ["--resume", "true"]
    log_path = folder / "run.log"
    start = time.perf_counter()
    load_before = machine_load()
    result = run_child(command, log_path, tag or f"[{cell.name}]", timeout_s, append=resume)
    summary = _read_summary(folder)
    # a stop (Ctrl-C) that lands after the last step's save is a finished cell: its summary says so, not the signal
    finished = summary is not None and summary.get("status") == "completed" and (folder / "final").is_dir()
    if summary is not None and (result.returncode == 0 or finished):
        row = _row_from_summary(cell, summary, folder)
    else:
        log_text = log_path.read_text(errors="replace")
        status = classify_failure(result.returncode, log_text)
        tail = _error_line(log_text) or (log_text.strip().splitlines()[-1:] or [""])[0]
        row = {**_row_base(cell, folder), "status": status, "train_time_s": time.perf_counter() - start,
               "reason": tail[:200]}
        if summary is not None:  # an interrupted run still says how far it got
            row.update(steps=summary.get("steps"), train_losses=summary.get("train_losses"),
                       val_losses=summary.get("val_losses"))
    row.update(contention(load_before, machine_load()))
    row["interrupted"] = result.interrupted
    if row["status"] not in ("completed", "interrupted"):  # a stopped cell closes its own run, and is resumed
        from lit_adapter.grid.wandb_runs import record_failed_cell

        record_failed_cell(config, folder, row["status"], row.get("reason", ""))
    return row


def machine_load() -> Optional[float]:
    """The 1-minute load average (None where the system has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def cell_threads() -> int:
    """The intra-op threads a cell's process runs with: ``OMP_NUM_THREADS`` if set (it inherits this environment),
    else torch's default (the cores this process may use)."""
    import torch

    try:
        return int(os.environ["OMP_NUM_THREADS"])
    except (KeyError, ValueError):
        return torch.get_num_threads()


def contention(load_before: Optional[float], load_after: Optional[float]) -> Dict[str, Any]:
    """What a cell's timing ran under: the higher load average of its start and end, its threads, and whether
    the machine was contended (more runnable work than cores beyond half a core's noise: other processes shared
    the cores, and the cell's time says more about them than about the method)."""
    from lit_adapter.grid.report import cpu_count

    loads = [x for x in (load_before, load_after) if x is not None]
    load = round(max(loads), 2) if loads else None
    return {"load_average": load, "threads": cell_threads(), "cores": cpu_count(),
            "contended": load is not None and load > cpu_count() + 0.5}


def grid_cells(grid: Grid, only: Optional[List[str]] = None) -> List[Cell]:
    """The cells to run, in order (context by context), restricted to those ``only`` names
    (:func:`lit_adapter.grid.spec.select`)."""
    return select(expand(grid), only)


def check_cells(grid: Grid, cells: List[Cell], config=None) -> List[Any]:
    """Raises :class:`UserError` naming the first cell whose config its finetune script would reject; returns the
    parsed options of every cell. ``config`` is the base model to check against (default: the checkpoint's)."""
    from lit_adapter.model.config import Config
    from lit_adapter.grid.validation import CellChecker

    checker = CellChecker(config if config is not None else Config.from_checkpoint_dir(grid.checkpoint_dir))
    return [checker.check(cell.run.script, cell_config(grid, cell), cell.name) for cell in cells]


def run_grid(grid: Grid, only: Optional[List[str]] = None, timeout_s: Optional[float] = None,
             resume: bool = False) -> List[Dict[str, Any]]:
    """Checks every cell, then runs them (see the module docstring for ``resume``) and writes the results after
    each one. Returns the rows; raises ``KeyboardInterrupt`` once the results are written if the grid was stopped."""
    from lit_adapter.train.preflight import OutDirLock

    cells = grid_cells(grid, only)
    check_cells(grid, cells)  # every cell, before the first runs
    out_dir = Path(grid.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"the grid's out_dir {out_dir} is a file, not a folder")
    if resume and not holds_grid(out_dir):  # as finetune's --resume: nothing to continue is an error, not a new grid
        raise UserError(f"--resume true: {out_dir} holds no grid (no results.json, no cell's run_config.yaml); "
                        "run without --resume to start it")
    out_dir.mkdir(parents=True, exist_ok=True)
    with OutDirLock(out_dir):  # a second grid into the same folder would mix its cells and results.md
        return _run_cells(grid, cells, timeout_s, resume)


def holds_grid(out_dir: Path) -> bool:
    """Whether ``out_dir`` holds a grid's outputs: its results or a cell folder's generated config."""
    return (out_dir / "results.json").is_file() or any(out_dir.glob("*/run_config.yaml"))


def _run_cells(grid: Grid, cells: List[Cell], timeout_s: Optional[float], resume: bool) -> List[Dict[str, Any]]:
    rows: List[Dict[str, Any]] = []
    data_dirs: Dict[int, Path] = {}
    states = [cell_state(cell_dir(grid, cell), cell_config(grid, cell)) for cell in cells]
    if not resume and "completed" in states:
        print(f"note: {states.count('completed')} of {len(cells)} cells already hold completed runs, which are run "
              "again; --resume true keeps them", file=sys.stderr)
    for index, (cell, state) in enumerate(zip(cells, states), 1):
        context = cell.context
        tag = f"[{index}/{len(cells)} {cell.name}]"
        folder = cell_dir(grid, cell)
        if resume and state == "completed":
            rows.append(_row_from_summary(cell, _read_summary(folder), folder))
            print(f"{tag} completed earlier: skipped (val loss {_fmt_loss(rows[-1])})", file=sys.stderr, flush=True)
            continue
        if context not in data_dirs:
            data_dirs[context] = prepare_data(grid, context)
        continuing = resume and state == "resumable"
        if resume and state == "changed":
            print(f"{tag} its config changed since it ran: running it afresh", file=sys.stderr, flush=True)
        print(f"{tag} {'resuming from ' + CHECKPOINT_NAME if continuing else 'running'} ...", file=sys.stderr,
              flush=True)
        row = run_cell(grid, cell, data_dirs[context], timeout_s, tag, resume=continuing)
        rows.append(row)
        stopped = row.pop("interrupted")
        done = f" (val loss {_fmt_loss(row)})" if row["status"] == "completed" else f": {row.get('reason', '')}"
        print(f"{tag} {row['status']}{done}", file=sys.stderr, flush=True)
        write_results(rows, grid.out_dir, grid.name, pictures=stopped)
        if stopped:
            print(f"grid stopped at cell {index} of {len(cells)}; run the same command with --resume true to "
                  "continue it", file=sys.stderr, flush=True)
            raise KeyboardInterrupt
    write_results(rows, grid.out_dir, grid.name)
    return rows


def _fmt_loss(row: Dict[str, Any]) -> str:
    before, after = row.get("initial_val_loss"), row.get("val_loss")
    fmt = lambda x: "n/a" if x is None else f"{x:.4f}"  # noqa: E731
    return f"{fmt(before)} -> {fmt(after)}"


def failed_cells(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The rows of cells that failed for a user error or a crash (an out-of-memory cell or a time limit is a
    result of the grid, not a failure of it)."""
    return [r for r in rows if r["status"] in ("error", "failed")]
