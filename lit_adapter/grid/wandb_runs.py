"""A comparison grid on WandB: every cell is one run of the grid's group, and a cell that ran out of memory or
failed is a run too, with its status.

With ``common.logger.logger_name: wandb`` each cell's config gets the grid's name as its ``group``, the cell's name
as its ``run_name`` and ``job_type``, tags for each axis (``method:adapter_v2``, ``quantize:bnb.nf4``, ...) and a
``run_id`` derived from the grid's and the cell's names, so a resumed cell, and the record the grid writes for a
failed one, continue the same run. A cell that dies (OOM, a crash) never closes its run with a status, so the grid
process opens that run (``resume="allow"``), sets ``summary.status`` and ``summary.reason`` and finishes it.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from lit_adapter.grid.spec import Cell, Grid


def run_id(grid_name: str, cell_name: str) -> str:
    """A WandB run id ([A-Za-z0-9_-], at most 64 characters) that is the same whenever the grid runs this cell:
    readable, with a hash so that names differing only in replaced characters stay distinct."""
    digest = hashlib.sha1(f"{grid_name}\0{cell_name}".encode()).hexdigest()[:8]
    readable = re.sub(r"[^A-Za-z0-9_-]+", "-", f"{grid_name}-{cell_name}").strip("-")[:55]
    return f"{readable}-{digest}"


def cell_tags(cell: Cell) -> List[str]:
    return [f"method:{cell.run.script}", f"attention:{cell.attention_tag}", f"quantize:{cell.quantize or 'none'}",
            f"context:{cell.context}", f"seed:{cell.seed}"]


def cell_logger(grid: Grid, cell: Cell, logger: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The logger settings the grid adds to a cell's config; ``None`` unless the cell logs to WandB."""
    if logger.get("logger_name") != "wandb":
        return None
    return {"group": grid.name, "run_name": cell.name, "job_type": cell.name, "tags": cell_tags(cell),
            "run_id": run_id(grid.name, cell.name)}


def record_failed_cell(config: Dict[str, Any], folder: Path, status: str, reason: str) -> None:
    """Opens (or continues) the WandB run of a cell that did not complete and records its status; does nothing
    unless the cell logs to WandB."""
    logger = config.get("logger") or {}
    if logger.get("logger_name") != "wandb":
        return
    import wandb

    if not sys.stderr.isatty():
        os.environ.setdefault("WANDB_SILENT", "true")
    from lit_adapter.tracking.loggers import LoggerArgs

    run = wandb.init(project=logger.get("project", LoggerArgs.project), group=logger.get("group"),
                     name=logger.get("run_name"), job_type=logger.get("job_type"), tags=logger.get("tags") or None,
                     id=logger.get("run_id"), dir=str(folder), config=config, resume="allow")
    run.summary["status"] = status
    run.summary["reason"] = reason
    run.finish(exit_code=1)
