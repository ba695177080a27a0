"""Run a grid of fine-tuning runs (methods x context lengths) on the same data and write one comparison table."""

from pathlib import Path
from typing import List, Optional

from lit_adapter.errors import run_cli


def main(
    config: Path,
    checkpoint_dir: Optional[Path] = None,
    out_dir: Optional[Path] = None,
    only: Optional[List[str]] = None,
    timeout_s: Optional[float] = None,
) -> None:
    """Run every cell of a comparison grid in its own process and write results.md, results.csv and loss_curves.png.

    An out-of-memory error in one cell is recorded as OOM and the grid goes on.

    Args:
        config: The grid file (see configs/dolly_comparison_512.yaml and lit_adapter/comparison.py).
        checkpoint_dir: Override the grid's base checkpoint.
        out_dir: Override the grid's output folder.
        only: Run only the runs with these names.
        timeout_s: Stop a cell after this many seconds and record it as a timeout.
    """
    from lit_adapter.comparison import load_grid, run_grid

    overrides = {}
    if checkpoint_dir is not None:
        overrides["checkpoint_dir"] = str(checkpoint_dir)
    if out_dir is not None:
        overrides["out_dir"] = str(out_dir)
    grid = load_grid(config, overrides)
    rows = run_grid(grid, only=only, timeout_s=timeout_s)
    print((grid.out_dir / "results.md").read_text())
    print(f"wrote {grid.out_dir / 'results.csv'} and {grid.out_dir / 'loss_curves.png'}")
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
                        help="Stop a cell after this many seconds and record it as a timeout.")
    return vars(parser.parse_args(argv))


if __name__ == "__main__":
    run_cli(lambda: main(**parse_args()))
