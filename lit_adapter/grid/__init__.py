"""The comparison grid: its spec, runner, per-cell processes, statistics, reports, plots and WandB runs."""
