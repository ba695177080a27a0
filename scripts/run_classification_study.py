"""Fine-tune for classification over a grid of runs and report test accuracy from each best/: by generation (seed
004's rank study, configs/rt_lora_rank_study.yaml) or with a classification head (a study: section with
objective: head; seed 002's RoBERTa MNLI study, configs/roberta_mnli_study.yaml)."""

import sys
from pathlib import Path
from typing import List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lit_adapter.errors import run_cli  # noqa: E402


def main(config: Path, checkpoint_dir: Optional[Path] = None, out_dir: Optional[Path] = None,
         only: Optional[List[str]] = None, timeout_s: Optional[float] = None) -> None:
    """A classification study as one command. By generation (seed 004's): prepare Rotten Tomatoes with verbalised
    labels (the test split held out), run every cell of the grid in its own process, evaluate each cell's best/ on
    the test split by generation (garbage counted wrong, no-answer rate reported) and write study.md, study.json
    and val_loss_curves.png. With a head (study.objective: head, seed 002's): run every cell as
    finetune/classify.py <method>, each scoring its own best/ on every test split, and write study.md and
    study.json with each row's trainable parameters, training time, accuracy and macro-F1.

    Args:
        config: The grid file with a study: section (configs/rt_lora_rank_study.yaml, configs/roberta_mnli_study.yaml).
        checkpoint_dir: Override the grid's base checkpoint.
        out_dir: Override the grid's output folder.
        only: Run only the runs with these names.
        timeout_s: Stop a cell after this many seconds and record it as a timeout.
    """
    from lit_adapter.grid import head_study
    from lit_adapter.grid.classification_study import format_table, run_study

    if head_study.is_head_study(config):
        report = head_study.run_head_study(config, checkpoint_dir, out_dir, only, timeout_s)
        print(head_study.format_table(report))
        if not any(c["status"] == "completed" for c in report["cells"]):
            raise SystemExit(1)
        return
    report = run_study(config, checkpoint_dir, out_dir, only, timeout_s)
    print(format_table(report))
    if not any(c["status"] == "completed" for c in report["cells"]):
        raise SystemExit(1)


def parse_args(argv=None):
    # --config is the grid file here, not jsonargparse's own config option (as in scripts/run_comparison.py)
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(description=main.__doc__.split("Args:")[0].strip())
    parser.add_argument("--config", type=Path, required=True, help="The grid file with a study: section.")
    parser.add_argument("--checkpoint_dir", type=Optional[Path], default=None, help="Override the base checkpoint.")
    parser.add_argument("--out_dir", type=Optional[Path], default=None, help="Override the output folder.")
    parser.add_argument("--only", type=Optional[List[str]], default=None, help="Run only these runs.")
    parser.add_argument("--timeout_s", type=Optional[float], default=None, help="Per-cell timeout in seconds.")
    return vars(parser.parse_args(argv))


if __name__ == "__main__":
    run_cli(lambda: main(**parse_args()))
