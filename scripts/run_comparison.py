"""Run a grid of fine-tuning runs (methods x context lengths) on the same data and write one comparison table."""

from pathlib import Path
from typing import List, Optional

from lit_adapter.errors import UserError, run_cli


def main(
    config: Path,
    checkpoint_dir: Optional[Path] = None,
    out_dir: Optional[Path] = None,
    only: Optional[List[str]] = None,
    timeout_s: Optional[float] = None,
    resume: bool = False,
) -> None:
    """Run every cell of a comparison grid in its own process and write results.md, results.csv and loss_curves.png.

    Every cell's config is checked before the first one runs. An out-of-memory error in one cell is recorded as OOM
    and the grid goes on; a cell that fails for a user error or a crash is recorded too, and the command then ends
    with one error line listing the failed cells and a non-zero exit status. Ctrl-C or SIGTERM stops the grid after
    the running cell has written a resumable checkpoint.

    Args:
        config: The grid file (see configs/dolly_comparison_512.yaml and lit_adapter/comparison.py).
        checkpoint_dir: Override the grid's base checkpoint.
        out_dir: Override the grid's output folder.
        only: Run only the runs with these names.
        timeout_s: Stop a cell after this many seconds (it writes a resumable checkpoint) and record it as a timeout.
        resume: Continue a stopped grid: skip the cells that completed (their recorded results go into the table),
            continue interrupted ones from their last.ckpt, run the others.
    """
    from lit_adapter.comparison import failed_cells, load_grid, run_grid

    overrides = {}
    if checkpoint_dir is not None:
        overrides["checkpoint_dir"] = str(checkpoint_dir)
    if out_dir is not None:
        overrides["out_dir"] = str(out_dir)
    grid = load_grid(config, overrides)
    rows = run_grid(grid, only=only, timeout_s=timeout_s, resume=resume)
    print((grid.out_dir / "results.md").read_text())
    print(f"wrote {grid.out_dir / 'results.csv'} and {grid.out_dir / 'loss_curves.png'}")
    failed = failed_cells(rows)
    if failed:
        listed = "; ".join(f"{r['method']} @ {r['context']} ({r['status']}: {r.get('reason', '')})" for r in failed)
        raise UserError(f"{len(failed)} of {len(rows)} cells failed: {listed}; logs in {grid.out_dir}/*/run.log")
    if not any(r["status"] == "completed" for r in rows):
        raise SystemExit(1)


def parse_args(argv=None):
    # A plain parser: jsonargparse's CLI() reserves --config for its own config files, but here --config *is* the
    # grid file.
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(description=main.__doc__.split("Args:")[0].strip())
    parser.add_argument("--config", type=Path, required=True, help="The grid file (see configs/dolly_comparison_512.yaml).")
    parser.add_argument("--checkpoint_dir", type=Optional[Path], default=None, help="Override the grid's base checkpoint.")
    parser.add_argument("--out_dir", type=Optional[Path], default=None, help="Override the grid's output folder.")
    parser.add_argument("--only", type=Optional[List[str]], default=None, help="Run only the runs with these names.")
    parser.add_argument("--timeout_s", type=Optional[float], default=None,
                        help="Stop a cell after this many seconds (it writes a resumable checkpoint) and record it "
                             "as a timeout.")
    parser.add_argument("--resume", type=bool, default=False,
                        help="Continue a stopped grid: skip the cells that completed (their recorded results go into "
                             "the table), continue interrupted ones from their last.ckpt, run the others.")
    return vars(parser.parse_args(argv))


if __name__ == "__main__":
    run_cli(lambda: main(**parse_args()))
