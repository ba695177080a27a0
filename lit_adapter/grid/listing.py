"""``run_comparison.py --print_cells`` / ``--dry_run``: the grid's cells as a table, checked as a run would check
them, with (dry run) each cell's trainable parameters and analytic peak-memory estimate. Nothing is allocated and
no weights are read: ``--model_name`` stands in for a checkpoint that is not there."""

from __future__ import annotations

from typing import List, Optional

from lit_adapter.errors import UserError
from lit_adapter.grid.spec import Cell, Grid


def _base_config(grid: Grid, model_name: Optional[str], required: bool):
    from lit_adapter.model.config import Config

    if model_name is not None:
        return Config.from_name(model_name)
    if (grid.checkpoint_dir / "model_config.json").is_file():
        return Config.from_checkpoint_dir(grid.checkpoint_dir)
    if required:
        raise UserError(f"no checkpoint in {grid.checkpoint_dir} (model_config.json); for a dry run without weights "
                        "pass --model_name (e.g. Llama-2-7b)")
    return None


def list_cells(grid: Grid, cells: List[Cell], dry_run: bool = False, model_name: Optional[str] = None) -> str:
    from lit_adapter.grid.runner import cell_config, cell_dir
    from lit_adapter.grid.validation import CellChecker, dry_run_cell

    config = _base_config(grid, model_name, required=dry_run)
    checker = CellChecker(config)
    header = ["name", "method", "attention", "quantize", "context", "seed"]
    if dry_run:
        header += ["trainable params", "estimated peak (GB)"]
    header.append("folder")
    lines = []
    notes = set()
    for cell in cells:
        parsed = checker.check(cell.run.script, cell_config(grid, cell), cell.name)
        row = [cell.name, cell.run.script, cell.attention_tag, cell.quantize or "none", str(cell.context), str(cell.seed)]
        if dry_run:
            counts = dry_run_cell(cell.run.script, parsed, config)
            peak = counts["estimated_peak_gb"]
            row += [f"{counts['trainable_params']:,}",
                    f"{peak:.2f} ({counts['estimate_device']})" if peak is not None else "n/a"]
            if counts.get("estimate_note"):
                notes.add(f"{cell.run.script}: {counts['estimate_note']}")
        row.append(str(cell_dir(grid, cell)))
        lines.append(row)
    widths = [max(len(r[i]) for r in [header] + lines) for i in range(len(header))]
    text = [" | ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in [header] + lines]
    text.insert(1, "-+-".join("-" * w for w in widths))
    source = f"model {model_name}" if model_name else str(grid.checkpoint_dir)
    text.append(f"{len(cells)} cells of grid {grid.name!r} ({source})")
    if dry_run:
        text.append("estimated peak: analytic estimate of one training step's live tensors (lit_adapter.memory), "
                    "not a measurement; the device it assumes in brackets")
        text += sorted(f"note: {n}" for n in notes)
    return "\n".join(text)
