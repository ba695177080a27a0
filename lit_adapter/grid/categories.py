"""A grid's multi-task view: each cell's final validation loss per task category (Dolly's open QA, closed QA,
creative writing, ...), so a comparison shows which tasks a method helps or hurts, not only the overall loss.

Each completed run's ``summary.json`` holds ``initial_val_loss_by_category`` and ``final_val_loss_by_category``
(:mod:`lit_adapter.train.trainer`'s validation, token-weighted per category). Here they become the results'
``val_loss/<category>`` columns (CSV), the cells' and groups' dicts (JSON), a table of categories by cells
(``results.md``) and the heatmap of cells by categories (:func:`lit_adapter.grid.plots.plot_category_heatmap`).
The change from step 0 is shown beside the absolute loss because the categories differ in how hard they are before
any training: a method's effect on a task is its change, not its level.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from lit_adapter.grid.stats import group_rows, mean_std

COLUMN_PREFIX = "val_loss/"
FINAL = "val_loss_by_category"
INITIAL = "initial_val_loss_by_category"


def categories(rows: List[Dict[str, Any]]) -> List[str]:
    """Every category any cell reports, in the order the runs report them (the validation split's largest first)."""
    seen: Dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(row.get(FINAL) or {}))
    return list(seen)


def columns(rows: List[Dict[str, Any]]) -> List[str]:
    """The CSV's per-category columns: ``val_loss/<category>`` (the final validation loss of that category)."""
    return [COLUMN_PREFIX + name for name in categories(rows)]


def flat(row: Dict[str, Any]) -> Dict[str, Any]:
    """``row`` with its final per-category losses as ``val_loss/<category>`` keys (for the CSV)."""
    return {**row, **{COLUMN_PREFIX + name: loss for name, loss in (row.get(FINAL) or {}).items()}}


def group_categories(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per cell (its seeds together): ``{"group", FINAL: {category: (mean, std)}, "change": {category: (mean,
    std)}}``, the change being final minus step 0, each over the seeds that completed and measured it."""
    out = []
    for group in group_rows(rows):
        members = [r for r in rows if (r.get("group") or r["name"]) == group["group"] and r["status"] == "completed"]
        final: Dict[str, Tuple[float, Optional[float]]] = {}
        change: Dict[str, Tuple[float, Optional[float]]] = {}
        for name in categories(rows):
            values = [r[FINAL][name] for r in members if name in (r.get(FINAL) or {})]
            deltas = [r[FINAL][name] - r[INITIAL][name] for r in members
                      if name in (r.get(FINAL) or {}) and name in (r.get(INITIAL) or {})]
            if values:
                final[name] = mean_std(values)
            if deltas:
                change[name] = mean_std(deltas)
        out.append({"group": group["group"], FINAL: final, "change": change})
    return out


def _cell(stat: Optional[Tuple[float, Optional[float]]], signed: bool = False) -> str:
    if stat is None:
        return "—"
    mean, std = stat
    text = f"{mean:+.4f}" if signed else f"{mean:.4f}"
    return text + (f" ± {std:.4f}" if std is not None else "")


def markdown(rows: List[Dict[str, Any]]) -> List[str]:
    """``results.md``'s per-category section: a row per category, a column per cell; empty without categories."""
    names = categories(rows)
    if not names:
        return []
    groups = group_categories(rows)
    header = "| Category | " + " | ".join(g["group"] for g in groups) + " |"
    rule = "|" + "---|" * (len(groups) + 1)
    lines = ["", "## Final validation loss by task category", "",
             "Each category's loss is weighted by its own target tokens; the categories' token-weighted mean is the "
             "overall Val loss (final). In brackets: the change from the same cell's step-0 loss (negative: the "
             "method helped that task).", "", header, rule]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(
            f"{_cell(g[FINAL].get(name))} ({_cell(g['change'].get(name), signed=True)})" for g in groups) + " |")
    return lines


def matrix(rows: List[Dict[str, Any]], key: str = FINAL) -> Tuple[List[str], List[str], List[List[Optional[float]]]]:
    """``(cells, categories, values)`` for the heatmap: the seeds' mean of ``key`` (``FINAL`` or ``"change"``), None
    where a cell has no value (it ran out of memory, failed, or its data lack the category)."""
    groups = group_categories(rows)
    names = categories(rows)
    values = [[(g[key][n][0] if n in g[key] else None) for n in names] for g in groups]
    return [g["group"] for g in groups], names, values
