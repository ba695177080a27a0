"""Re-render a finished comparison grid's pictures and report from its results."""

from pathlib import Path



def main(out_dir: Path) -> None:
    """Re-render dashboard.png, loss_curves.png and report.html of a finished (or stopped) grid from its
    results.json and each cell's summary.json (the loss curves are re-read from there), without running anything;
    results.md, results.csv and results.json are left as the grid wrote them.

    Args:
        out_dir: The grid's output folder (its out_dir), holding results.json.
    """
    from lit_adapter.grid.report import render, rows_from_results

    rows, title, meta = rows_from_results(out_dir)
    render(rows, title, meta, Path(out_dir))
    print(f"wrote {Path(out_dir) / 'dashboard.png'}, {Path(out_dir) / 'loss_curves.png'} and "
          f"{Path(out_dir) / 'report.html'} ({len(rows)} cells)")


if __name__ == "__main__":
    from lit_adapter.cli.finetune import cli

    cli(main)
