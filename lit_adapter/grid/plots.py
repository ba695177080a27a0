"""The comparison grid's pictures: loss curves by context (``loss_curves.png``) and the local dashboard
(``dashboard.png``): every cell's curves, then peak memory, training time and final validation loss by cell, the
seeds' mean with their std as error bars, and cells that ran out of memory or failed marked where their bar would be.
When the data have task categories, the dashboard's last row (and ``category_heatmap.png``) is the heatmap of cells
by categories: the final validation loss, and its change from step 0 (what the method did to each task).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _curves(ax, rows: List[Dict[str, Any]], colors: Dict[str, Any]) -> None:
    labelled = set()
    for r in rows:
        if not r.get("train_losses"):
            continue
        group = r.get("group") or r["name"]
        label = None if group in labelled else group
        labelled.add(group)
        steps, losses = zip(*r["train_losses"])
        ax.plot(steps, losses, color=colors[group], alpha=0.7, label=label, linewidth=1)
        if r.get("val_losses"):
            vs, vl = zip(*r["val_losses"])
            ax.plot(vs, vl, "o--", color=colors[group], markersize=3, linewidth=1)
    failed = [f"{r['name']}: {r['status']}" for r in rows if not r.get("train_losses")]
    if failed:
        ax.text(0.02, 0.02, "\n".join(failed), transform=ax.transAxes, fontsize=7, color="red", va="bottom")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (train: lines, validation: dashed)")
    ax.grid(alpha=0.3)
    if labelled:
        ax.legend(fontsize=6, ncol=2)


def _colors(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    plt = _pyplot()
    groups = list(dict.fromkeys(r.get("group") or r["name"] for r in rows))
    cmap = plt.get_cmap("tab20" if len(groups) > 10 else "tab10")
    return {g: cmap(i % cmap.N) for i, g in enumerate(groups)}


def plot_losses(rows: List[Dict[str, Any]], path: Path) -> None:
    plt = _pyplot()
    contexts = sorted({r["context"] for r in rows})
    colors = _colors(rows)
    fig, axes = plt.subplots(1, len(contexts), figsize=(6 * len(contexts), 4.2), squeeze=False)
    for ax, context in zip(axes[0], contexts):
        _curves(ax, [r for r in rows if r["context"] == context], colors)
        ax.set_title(f"context {context}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _heatmap(fig, ax, cells: List[str], names: List[str], values: List[List[Optional[float]]], title: str,
             diverging: bool, cell_labels: bool = True) -> None:
    """One cells x categories heatmap, every value written in its square; blank where a cell has none."""
    import numpy as np

    data = np.array([[np.nan if v is None else v for v in row] for row in values], dtype=float)
    finite = data[np.isfinite(data)]
    if diverging:  # centred on 0: blue where the loss fell, red where it rose
        bound = float(np.abs(finite).max()) if finite.size else 1.0
        image = ax.imshow(data, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto")
    else:
        image = ax.imshow(data, cmap="viridis_r", aspect="auto")
    fig.colorbar(image, ax=ax, fraction=0.04)
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            if np.isfinite(data[i, j]):
                ax.text(j, i, f"{data[i, j]:+.2f}" if diverging else f"{data[i, j]:.2f}", ha="center", va="center",
                        fontsize=6)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(cells)))
    ax.set_yticklabels(cells if cell_labels else [], fontsize=7)
    ax.set_title(title, fontsize=9)


def _category_panels(fig, axes, rows: List[Dict[str, Any]]) -> None:
    from lit_adapter.grid.categories import matrix

    cells, names, final = matrix(rows)
    _, _, change = matrix(rows, "change")
    _heatmap(fig, axes[0], cells, names, final, "final validation loss by task category", diverging=False)
    # the same rows as the left panel: their names once
    _heatmap(fig, axes[1], cells, names, change, "change from step 0 (negative: the task improved)", diverging=True,
             cell_labels=False)


def plot_category_heatmap(rows: List[Dict[str, Any]], path: Path, title: str) -> None:
    """``category_heatmap.png``: cells (their seeds' mean) by task categories, the final loss and its change."""
    from lit_adapter.grid.categories import categories, group_categories

    plt = _pyplot()
    height = max(3.0, 0.3 * len(group_categories(rows)) + 1.8)
    fig, axes = plt.subplots(1, 2, figsize=(max(10, 1.4 * len(categories(rows)) + 6), height))
    _category_panels(fig, axes, rows)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_dashboard(rows: List[Dict[str, Any]], path: Path, title: str) -> None:
    from lit_adapter.grid.categories import categories
    from lit_adapter.grid.stats import group_rows, group_status

    plt = _pyplot()
    colors = _colors(rows)
    groups = group_rows(rows)
    tasks = bool(categories(rows))
    fig = plt.figure(figsize=(max(12, 0.9 * len(groups) + 4), 9 + (0.3 * len(groups) + 2 if tasks else 0)))
    grid = fig.add_gridspec(3 if tasks else 2, 3, height_ratios=[1.1, 1] + ([0.25 * len(groups) + 1] if tasks else []))
    if tasks:
        sub = grid[2, :].subgridspec(1, 2)
        _category_panels(fig, [fig.add_subplot(sub[0, 0]), fig.add_subplot(sub[0, 1])], rows)
    _curves(fig.add_subplot(grid[0, :]), rows, colors)
    names = [g["group"] for g in groups]
    contended = {r.get("group") or r["name"] for r in rows if r.get("contended")}
    for column, (key, label) in enumerate((("peak_memory_gb", "peak memory (GB)"),
                                           ("train_time_s", "training time (s)"), ("val_loss", "final val loss"))):
        ax = fig.add_subplot(grid[1, column])
        for i, g in enumerate(groups):
            if g[key] is None:  # no completed seed: mark the cell with its status in place of a bar
                ax.bar(i, 0, color="none")
                ax.annotate(group_status(g), (i, 0), xytext=(0, 4), textcoords="offset points", ha="center",
                            va="bottom", rotation=90, fontsize=8, color="red", fontweight="bold")
                continue
            mean, std = g[key]
            bar = ax.bar(i, mean, yerr=std, capsize=3, color=colors[g["group"]])
            if key == "train_time_s" and g["group"] in contended:  # a time measured while others used the cores
                bar[0].set_hatch("xx")
                ax.annotate("contended", (i, mean), xytext=(0, 4), textcoords="offset points", ha="center",
                            rotation=90, fontsize=7, color="darkorange")
            if g["completed"] < len(g["seeds"]):  # some seeds ran out of memory or failed
                bar[0].set_hatch("//")
                ax.annotate(group_status(g), (i, mean), xytext=(0, 4), textcoords="offset points", ha="center",
                            rotation=90, fontsize=7, color="red")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
        ax.set_title(label)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
