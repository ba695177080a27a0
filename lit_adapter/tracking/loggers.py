"""Experiment loggers: CSV files by default, TensorBoard, or WandB (online, ``WANDB_MODE=offline`` or ``disabled``).

They are the real Lightning Fabric / Lightning loggers, set up so their output stays readable: TensorBoard gets no
placeholder ``hp_metric = -1``; WandB gets no deprecated ``anonymous`` setting (it would warn on every run), and
when stderr is not a terminal (a piped or redirected log) its own console output, which is ANSI-coloured
regardless, is silenced unless ``WANDB_SILENT`` is set; the run's summary then says where the run is and how to
upload it (:func:`logger_summary`).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Literal, Optional


@dataclass
class LoggerArgs:
    """Experiment logging."""

    logger_name: Literal["csv", "tensorboard", "wandb"] = "csv"
    """CSV files by default; wandb honours WANDB_MODE=offline/disabled."""
    project: str = "lit-adapter"
    """WandB project name."""
    run_name: Optional[str] = None
    """Run name for WandB/TensorBoard (default: the output folder's name)."""
    group: Optional[str] = None
    """WandB group: the comparison grid's name, so a grid's runs sit together."""
    job_type: Optional[str] = None
    """WandB job type (the grid gives each cell's name)."""
    tags: List[str] = field(default_factory=list)
    """WandB tags (the grid tags method, attention, quantization, context and seed)."""
    run_id: Optional[str] = None
    """WandB run id; a resumed run or a grid's record of a failed cell continues the same run."""
    log_artifacts: bool = False
    """Upload best/ as a WandB model artifact at the end of the run."""


RUN_ID_FILE = "wandb_run_id"  # in out_dir: the WandB run that --resume true continues when no run_id is given


def build_logger(args: LoggerArgs, out_dir: Path, resume: bool = False):
    name = args.run_name or out_dir.name
    if args.logger_name == "csv":
        from lightning.fabric.loggers import CSVLogger

        return CSVLogger(root_dir=str(out_dir), name="logs", flush_logs_every_n_steps=1)
    if args.logger_name == "tensorboard":
        from lightning.fabric.loggers import TensorBoardLogger

        return TensorBoardLogger(root_dir=str(out_dir), name="logs", version=name, default_hp_metric=False)
    from lightning.pytorch.loggers import WandbLogger

    from lit_adapter.errors import UserError

    bad_tags = [tag for tag in args.tags if not isinstance(tag, str) or not 1 <= len(tag.strip()) <= 64]
    if bad_tags:  # wandb would refuse them with a pydantic traceback
        raise UserError(f"logger.tags must be 1 to 64 characters each, got {bad_tags[0]!r}")
    if not sys.stderr.isatty():
        os.environ.setdefault("WANDB_SILENT", "true")
    # Lightning passes resume="allow": with run_id set, --resume true (or a grid's retry) continues the same run
    run_id = args.run_id
    if run_id is None and resume and (out_dir / RUN_ID_FILE).is_file():
        run_id = (out_dir / RUN_ID_FILE).read_text().strip() or None
    logger = WandbLogger(project=args.project, name=name, save_dir=str(out_dir), id=run_id, group=args.group,
                         job_type=args.job_type, tags=list(args.tags) or None)
    # Lightning always passes anonymous=None, which current wandb answers with a deprecation warning
    getattr(logger, "_wandb_init", {}).pop("anonymous", None)
    return logger


def logger_supports_hparams(logger) -> bool:
    from lightning.fabric.loggers import CSVLogger

    return not isinstance(logger, CSVLogger)  # Fabric's CSV logger has no hyper-parameter file; we write our own


def logger_summary(logger) -> Optional[str]:
    """One line on where the logger's run went, for the end-of-run summary (WandB: the run folder, and for an
    offline run the ``wandb sync`` command that uploads it)."""
    from lightning.pytorch.loggers import WandbLogger

    if not isinstance(logger, WandbLogger) or logger._experiment is None:
        return None
    run = logger.experiment
    settings = getattr(run, "settings", None)
    mode = getattr(settings, "mode", None)
    folder = getattr(settings, "sync_dir", None)
    if mode == "offline" and folder:
        return f"wandb: offline run in {folder}; upload it with: wandb sync {folder}"
    if mode == "disabled":
        return None
    url = getattr(run, "url", None)
    return f"wandb: {url}" if url else None


def close_logger(logger) -> None:
    """Ends a WandB run: Lightning's ``finalize`` leaves it open, and the next run in the same process (a notebook,
    a sweep in one script) would then be logged into it."""
    from lightning.pytorch.loggers import WandbLogger

    if isinstance(logger, WandbLogger) and logger._experiment is not None:
        logger.experiment.finish()
