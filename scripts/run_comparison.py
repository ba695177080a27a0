"""Run a grid of fine-tuning runs (methods x attention x base quantization x context x seeds) on the same data and
write one comparison table."""

import inspect
import sys
from pathlib import Path
from typing import List, Optional

from lit_adapter.errors import UserError, run_cli

OVERRIDES_HELP = """Any value of the grid file can be set from the command line with its dotted key, for every cell:
  --common.train.learning_rate 3e-3      an option of every cell (also --train.learning_rate 3e-3)
  --quantize '[none, bnb.nf4]'           an axis: quantize, attention, context_lengths, seeds
  --seeds '[1337, 1338]'                 (values are read as JSON or YAML)
  --data.max_records 400                 the data preparation
  --common.logger.logger_name wandb      every cell one WandB run of the grid's group
Misspelled options are one error line naming the closest option before anything runs."""


def main(
    config: Path,
    checkpoint_dir: Optional[Path] = None,
    out_dir: Optional[Path] = None,
    only: Optional[List[str]] = None,
    timeout_s: Optional[float] = None,
    resume: bool = False,
    print_cells: bool = False,
    dry_run: bool = False,
    model_name: Optional[str] = None,
    overrides: Optional[dict] = None,
) -> None:
    """Run every cell of a comparison grid in its own process and write results.md (seed 001's Table 3 layout: a
    column per cell, mean ± std over the seeds), results.csv and results.json (every seed's row), loss_curves.png,
    dashboard.png and report.html.

    Every cell's config is checked before the first one runs. An out-of-memory error in one cell is recorded as OOM
    and the grid goes on; a cell that fails for a user error or a crash is recorded too, and the command then ends
    with one error line listing the failed cells and a non-zero exit status. Ctrl-C or SIGTERM stops the grid after
    the running cell has written a resumable checkpoint.
    """
    from lit_adapter.grid.runner import failed_cells, grid_cells, load_grid, run_grid

    overrides = dict(overrides or {})
    if checkpoint_dir is not None:
        overrides["checkpoint_dir"] = str(checkpoint_dir)
    if out_dir is not None:
        overrides["out_dir"] = str(out_dir)
    grid = load_grid(config, overrides)
    if print_cells or dry_run:
        from lit_adapter.grid.listing import list_cells

        print(list_cells(grid, grid_cells(grid, only), dry_run=dry_run, model_name=model_name))
        return
    if model_name is not None:
        raise UserError("--model_name is for --print_cells / --dry_run without weights; a run needs the checkpoint")
    rows = run_grid(grid, only=only, timeout_s=timeout_s, resume=resume)
    print((grid.out_dir / "results.md").read_text())
    heatmap = ", category_heatmap.png" if (grid.out_dir / "category_heatmap.png").is_file() else ""
    print(f"wrote results.csv, results.json, loss_curves.png, dashboard.png{heatmap} and report.html in {grid.out_dir}")
    failed = failed_cells(rows)
    if failed:
        listed = "; ".join(f"{r['name']} ({r['status']}: {r.get('reason', '')})" for r in failed)
        raise UserError(f"{len(failed)} of {len(rows)} cells failed: {listed}; logs in {grid.out_dir}/*/run.log")
    if not any(r["status"] == "completed" for r in rows):
        raise SystemExit(1)


def split_overrides(argv: List[str]):
    """The command line's own options, and the ``--<grid key>.<...>`` overrides of the grid file."""
    own = {"--" + name for name in ("config", "checkpoint_dir", "out_dir", "only", "timeout_s", "resume",
                                    "print_cells", "dry_run", "model_name", "help")} | {"-h"}
    args, rest = [], []
    tokens = list(argv)
    while tokens:
        token = tokens.pop(0)
        target = args if token.split("=")[0] in own or not token.startswith("--") else rest
        target.append(token)
        if target is rest and "=" not in token and tokens:
            rest.append(tokens.pop(0))
    return args, rest


def parse_args(argv=None):
    # A plain parser: jsonargparse's CLI() reserves --config for its own config files, but here --config *is* the
    # grid file.
    from jsonargparse import ArgumentParser

    from lit_adapter.grid.spec import parse_overrides
    from lit_adapter.cli.parser import OneLineParser

    own, rest = split_overrides(sys.argv[1:] if argv is None else argv)
    parser = OneLineParser(description=inspect.cleandoc(main.__doc__), epilog=OVERRIDES_HELP,
                           formatter_class=_raw_epilog_formatter())
    assert isinstance(parser, ArgumentParser)
    parser.add_argument("--config", type=Path, required=True, help="The grid file (see configs/dolly_comparison_512.yaml).")
    parser.add_argument("--checkpoint_dir", type=Optional[Path], default=None, help="Override the grid's base checkpoint.")
    parser.add_argument("--out_dir", type=Optional[Path], default=None, help="Override the grid's output folder.")
    parser.add_argument("--only", type=str, nargs="+", default=None,
                        help="Run only these cells: cell names (adapter_v2+sparse/nf4/s1337), cell names without the "
                             "seed (all its seeds), run names (adapter_v2), or shell patterns ('*/nf4/*').")
    parser.add_argument("--timeout_s", type=Optional[float], default=None,
                        help="Stop a cell after this many seconds (it writes a resumable checkpoint) and record it "
                             "as a timeout.")
    parser.add_argument("--resume", type=bool, default=False,
                        help="Continue a stopped grid: skip the cells that completed (their recorded results go into "
                             "the table), continue interrupted ones from their last.ckpt, run the others.")
    parser.add_argument("--print_cells", type=bool, nargs="?", const=True, default=False,
                        help="List the cells (name, method, attention, quantize, context, seed) and exit.")
    parser.add_argument("--dry_run", type=bool, nargs="?", const=True, default=False,
                        help="List the cells with each one's trainable parameters and estimated peak memory "
                             "(analytic, nothing allocated) and exit.")
    parser.add_argument("--model_name", type=Optional[str], default=None,
                        help="With --print_cells/--dry_run: a known configuration (Llama-2-7b, 7B) in place of the "
                             "grid's checkpoint, which then need not exist.")
    args = vars(parser.parse_args(own))
    args["overrides"] = parse_overrides(rest)
    return args


def _raw_epilog_formatter():
    from jsonargparse import DefaultHelpFormatter

    class Formatter(DefaultHelpFormatter):
        def _fill_text(self, text, width, indent):  # keep the epilog's examples on their own lines
            return "".join(indent + line for line in text.splitlines(keepends=True))

    return Formatter


if __name__ == "__main__":
    run_cli(lambda: main(**parse_args()))
