"""A grid's cells summarised over their seeds: each metric of Table 3 as the mean and sample std of the seeds that
completed, with the seeds' statuses."""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

# Table 3's rows: (label, row key, how a value is shown)
METRICS: Tuple[Tuple[str, str, str], ...] = (
    ("Parameters tuned", "trainable_params", "count"),
    ("Train loss (avg.)", "avg_train_loss", "loss"),
    ("Val loss (avg.)", "avg_val_loss", "loss"),
    ("Val loss (final)", "val_loss", "loss"),
    ("Training time", "train_time_s", "duration"),
    ("Tokens/s", "tokens_per_s", "rate"),
    ("Peak memory", "peak_memory_gb", "memory"),
)


def mean_std(values: List[float]) -> Tuple[float, Optional[float]]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))  # sample std


def group_rows(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One entry per cell without its seed: every metric as mean and sample std over the seeds that completed,
    and the seeds' statuses."""
    groups: Dict[str, List[Dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row.get("group") or row["name"], []).append(row)
    out = []
    for name, members in groups.items():
        done = [r for r in members if r["status"] == "completed"]
        entry: Dict[str, Any] = {"group": name, "seeds": [r.get("seed") for r in members],
                                 "statuses": [r["status"] for r in members], "completed": len(done),
                                 **{k: members[0].get(k) for k in ("run", "method", "attention", "quantize",
                                                                   "context")}}
        for _, key, _ in METRICS:
            values = [r[key] for r in done if r.get(key) is not None]
            entry[key] = mean_std(values) if values else None
        out.append(entry)
    return out


def group_status(entry: Dict[str, Any]) -> str:
    statuses = entry["statuses"]
    if len(set(statuses)) == 1:
        return statuses[0]
    counts = {s: statuses.count(s) for s in dict.fromkeys(statuses)}
    return ", ".join(f"{s} {n}/{len(statuses)}" for s, n in counts.items())
