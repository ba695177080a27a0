"""A comparison grid's results: ``results.csv`` / ``results.json`` (one row per cell, every seed),
``results.md`` (seed 001's Table 3 layout: a column per cell, the seeds of a cell as mean ± std), ``loss_curves.png``,
``dashboard.png`` (loss curves; peak memory, training time and final validation loss by cell, OOM cells marked;
the heatmap of cells by task categories when the data have several, also alone as ``category_heatmap.png``)
and ``report.html`` (the table and the pictures in one self-contained file). The per-category parts are
:mod:`lit_adapter.grid.categories`'.

The numbers are measurements of the machine the grid ran on; ``results.json`` and the table say which machine,
when, and at which commit.
"""

from __future__ import annotations

import base64
import csv
import datetime
import html
import json
import platform
import subprocess
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from lit_adapter.grid import categories as by_category
from lit_adapter.grid.stats import METRICS, group_rows, group_status

COLUMNS = ("name", "run", "method", "attention", "quantize", "context", "seed", "status", "trainable_params",
           "avg_train_loss", "initial_val_loss", "avg_val_loss", "val_loss", "best_val_loss", "train_time_s",
           "tokens_per_s", "peak_memory_gb", "peak_memory_kind", "steps", "load_average", "threads", "contended",
           "reason")
def provenance() -> Dict[str, str]:
    """Where and when the results were measured: the machine, the date (UTC) and the repository's commit."""
    import torch

    from lit_adapter.runtime import cpu_model

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"{cpu_model('CPU')}, {cpu_count()} cores"
    repo = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        commit = (commit + ("+uncommitted changes" if dirty else "")) or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return {"machine": f"{platform.node()}: {device}, {platform.system()} {platform.machine()}, torch "
                       f"{torch.__version__}",
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": commit}


def cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _format(value: Optional[float], kind: str) -> str:
    if value is None:
        return "—"
    if kind == "count":
        return f"{value:,.0f}"
    if kind == "loss":
        return f"{value:.4f}"
    if kind == "duration":
        minutes, seconds = divmod(int(round(value)), 60)
        return f"{minutes}m {seconds:02d}s" if minutes else f"{value:.1f}s"
    if kind == "rate":
        return f"{value:,.0f}"
    return f"{value:.2f} GB"


def format_cell(stat: Optional[Tuple[float, Optional[float]]], kind: str, completed: int, seeds: int) -> str:
    if stat is None:
        return "—"
    mean, std = stat
    text = _format(mean, kind)
    if std is not None and not (kind == "count" and std == 0):  # the seeds train the same tensors
        text += " ± " + (_format(std, kind) if kind != "duration" else f"{std:.1f}s")
    if completed < seeds:
        text += f" (n={completed})"
    return text


def table(rows: List[Dict[str, Any]]) -> Tuple[List[str], List[List[str]]]:
    """Table 3's header (the cells) and rows (the metrics, then the status)."""
    groups = group_rows(rows)
    header = [""] + [g["group"] for g in groups]
    body = [[label] + [format_cell(g[key], kind, g["completed"], len(g["seeds"])) for g in groups]
            for label, key, kind in METRICS]
    body.append(["Status"] + [group_status(g) for g in groups])
    return header, body


def markdown(rows: List[Dict[str, Any]], title: str, meta: Dict[str, str]) -> str:
    header, body = table(rows)
    lines = [f"# {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    lines += by_category.markdown(rows)
    lines += ["", *_notes(rows, meta)]
    return "\n".join(lines) + "\n"


def _notes(rows: List[Dict[str, Any]], meta: Dict[str, str]) -> List[str]:
    seeds = sorted({r.get("seed") for r in rows if r.get("seed") is not None})
    notes = [f"Seeds {', '.join(map(str, seeds))}: each value is the mean ± sample std over the seeds that completed "
             "((n=k) when fewer did); the per-seed rows are in results.csv and results.json."
             if len(seeds) > 1 else f"Seed {seeds[0] if seeds else 'default'}; one run per cell."]
    notes.append("Train loss (avg.) is the mean over the steps of each step's loss: the sum over all of the step's "
                 "target tokens, on every micro-batch and device, divided by their count. Val loss (avg.) is the mean "
                 "of the validation losses measured during training (step 0 excluded); Val loss (final) the last one.")
    kinds = sorted({r.get("peak_memory_kind") for r in rows if r.get("peak_memory_kind")})
    if kinds:
        notes.append(f"Peak memory is {' and '.join(kinds)} (process_peak_rss: the CPU process's resident peak, "
                     "Python and the frozen base included; cuda_max_allocated: the CUDA allocator's peak).")
    for r in rows:
        if r["status"] != "completed" and r.get("reason"):
            notes.append(f"{r['name']}: {r['status']}: {r['reason']}")
    contended = [r for r in rows if r.get("contended")]
    if contended:
        notes.append(f"Timings taken under contention (load average above the {contended[0].get('cores')} cores: "
                     "other work shared them), so slower than on a quiet machine: " + ", ".join(
                         f"{r['name']} (load {r['load_average']}, {r['threads']} threads)" for r in contended) + ".")
    notes.append(f"Measured on {meta['machine']}, {meta['date']}, commit {meta['commit']}.")
    return [n + "  " if i < len(notes) - 1 else n for i, n in enumerate(notes)]


def write_results(rows: List[Dict[str, Any]], out_dir: Path, title: str,
                  meta: Optional[Dict[str, str]] = None, pictures: bool = True) -> Dict[str, Path]:
    """Writes every results file into ``out_dir`` and returns their paths; without ``pictures`` only the tables
    (the grid's update after each cell: the pictures take seconds, and plot_comparison.py draws them any time)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = meta or provenance()
    paths = {"csv": out_dir / "results.csv", "json": out_dir / "results.json", "md": out_dir / "results.md",
             "png": out_dir / "loss_curves.png", "dashboard": out_dir / "dashboard.png",
             "html": out_dir / "report.html"}
    if by_category.categories(rows):
        paths["heatmap"] = out_dir / "category_heatmap.png"
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*COLUMNS, *by_category.columns(rows)], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(by_category.flat(row) for row in rows)
    groups = group_rows(rows)
    for group, per_category in zip(groups, by_category.group_categories(rows)):
        group.update({by_category.FINAL: per_category[by_category.FINAL],
                      "val_loss_change_by_category": per_category["change"]})
    paths["json"].write_text(json.dumps({"title": title, **meta, "cells": rows, "groups": groups}, indent=2) + "\n")
    paths["md"].write_text(markdown(rows, title, meta))
    if pictures:
        render(rows, title, meta, out_dir)
    return paths


def render(rows: List[Dict[str, Any]], title: str, meta: Dict[str, str], out_dir: Path) -> None:
    """The pictures and the HTML report (what ``scripts/plot_comparison.py`` re-renders)."""
    from lit_adapter.grid.plots import plot_category_heatmap, plot_dashboard, plot_losses

    plot_losses(rows, out_dir / "loss_curves.png")
    plot_dashboard(rows, out_dir / "dashboard.png", title)
    if by_category.categories(rows):
        plot_category_heatmap(rows, out_dir / "category_heatmap.png", title)
    else:  # not a stale one of an earlier grid in the same folder
        (out_dir / "category_heatmap.png").unlink(missing_ok=True)
    (out_dir / "report.html").write_text(report_html(rows, title, meta, out_dir))


def report_html(rows: List[Dict[str, Any]], title: str, meta: Dict[str, str], out_dir: Path) -> str:
    header, body = table(rows)
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    lines = "".join("<tr>" + "".join(f"<{'th' if i == 0 else 'td'}>{html.escape(v)}</{'th' if i == 0 else 'td'}>"
                                     for i, v in enumerate(r)) + "</tr>" for r in body)
    images = "".join(
        f'<h2>{caption}</h2><img alt="{caption}" src="data:image/png;base64,'
        f'{base64.b64encode((out_dir / name).read_bytes()).decode()}">'
        for caption, name in (("Dashboard", "dashboard.png"), ("Loss curves", "loss_curves.png"),
                              ("Final validation loss by task category", "category_heatmap.png"))
        if (out_dir / name).is_file())
    notes = "".join(f"<p>{html.escape(n.strip())}</p>" for n in _notes(rows, meta))
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
            "body{font-family:sans-serif;margin:2em} table{border-collapse:collapse} td,th{border:1px solid #ccc;"
            "padding:4px 8px;text-align:right} img{max-width:100%}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><table><tr>{cells}</tr>{lines}</table>{notes}{images}</body></html>\n")


def rows_from_results(out_dir: Path) -> Tuple[List[Dict[str, Any]], str, Dict[str, str]]:
    """A finished grid's rows (``results.json``, with each completed cell's curves re-read from its
    ``summary.json``), title and provenance."""
    from lit_adapter.errors import UserError

    path = Path(out_dir) / "results.json"
    try:
        results = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"no grid results in {out_dir} ({path}: {err}); run scripts/run_comparison.py first") from None
    rows = results["cells"]
    for row in rows:
        summary = Path(row.get("folder") or "") / "summary.json"
        if row.get("folder") and summary.is_file():
            recorded = json.loads(summary.read_text())
            row["train_losses"], row["val_losses"] = recorded["train_losses"], recorded["val_losses"]
    meta = {k: results.get(k, "unknown") for k in ("machine", "date", "commit")}
    return rows, results.get("title", "comparison"), meta
