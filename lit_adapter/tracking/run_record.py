"""What a run tells its experiment logger beyond the curves, whatever way it ends (:class:`RunRecord`); the answers
to the fixed prompts (:mod:`lit_adapter.generation.eval_prompts`) are handed to it as a table.

With WandB every run, also one that fails, is a run with a ``status`` in its summary: ``completed``,
``interrupted`` (a signal; ``--resume true`` continues it), ``oom`` (out of memory, as
:func:`lit_adapter.errors.looks_like_out_of_memory` reads it), ``failed`` (a non-finite loss, any other exception)
or ``error`` (a user error reported in one line). Its config is the run's full resolved configuration
(``hparams.json``); its curves use the optimizer step (Lightning's ``trainer/global_step``) as x-axis, and
``tokens`` (tokens processed so far, padding included) is logged with every train and validation metric, so it can
be chosen as the x-axis in the UI. Lightning puts the step into each row rather than passing ``step=``, so rows of
a resumed run are never dropped and wandb's own ``_step`` keeps counting up.
"""

from __future__ import annotations

import re
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

from lit_adapter.errors import UserError, looks_like_out_of_memory
from lit_adapter.train.guards import LossNotFinite
from lit_adapter.tracking.loggers import RUN_ID_FILE, LoggerArgs, logger_summary
from lit_adapter.tracking.results import RunResult, result_from_state, to_jsonable

TABLE_COLUMNS = ["step", "category", "prompt", "reference", "response"]
SUMMARY_FIELDS = ("status", "steps", "initial_val_loss", "final_val_loss", "final_val_step", "best_val_loss",
                  "best_val_step", "avg_train_loss", "last_train_loss", "tokens_per_s", "peak_memory_gb",
                  "peak_memory_kind", "train_time_s", "trainable_params", "total_params")


def failure_status(err: BaseException) -> Tuple[str, str]:
    """``(status, one-line reason)`` of a run that ended with ``err``."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    reason = (lines[0] if lines else "")[:300]
    if not isinstance(err, UserError):
        reason = f"{type(err).__name__}: {reason}" if reason else type(err).__name__
    if isinstance(err, KeyboardInterrupt) or (isinstance(err, SystemExit) and err.code == 130):
        return "interrupted", "stopped by a signal"
    if looks_like_out_of_memory(f"{type(err).__name__}: {err}"):
        return "OOM", reason  # spelled as the grid's results table spells it, so one filter finds both
    if isinstance(err, LossNotFinite) or not isinstance(err, UserError):
        return "failed", reason
    return "error", reason


def summary_values(result: Optional[RunResult], status: str, wall_time_s: float,
                   reason: Optional[str] = None) -> Dict[str, Any]:
    """The run's summary for the logger: ``summary.json``'s scalar values (no curves), the wall time, the reason."""
    values: Dict[str, Any] = {}
    if result is not None:
        fields = asdict(result)
        values = {k: fields[k] for k in SUMMARY_FIELDS if fields[k] is not None}
        # the multi-task view: each task category's final validation loss (WandB's runs table can sort by them)
        values.update({f"final_val_loss/{name}": loss
                       for name, loss in (fields.get("final_val_loss_by_category") or {}).items()})
    values.update(status=status, wall_time_s=wall_time_s)
    if reason:
        values["reason"] = reason
    return values


class RunRecord:
    """One run as the experiment logger sees it; only WandB gets more than the curves and ``hparams.json``."""

    def __init__(self, logger, args: LoggerArgs, hparams: Dict[str, Any]) -> None:
        self.logger, self.args, self.hparams = logger, args, hparams
        self.started_at = time.perf_counter()
        self.state: Optional[Any] = None  # the loop's trainer.TrainState, once tracked
        self.parts: Tuple[Any, ...] = ()
        self.ended = False

    def _run(self):
        """The WandB run on rank 0, else ``None``."""
        from lightning.fabric.utilities.rank_zero import rank_zero_only
        from lightning.pytorch.loggers import WandbLogger

        if not isinstance(self.logger, WandbLogger) or getattr(rank_zero_only, "rank", 0) != 0:
            return None
        return self.logger.experiment

    def open(self) -> "RunRecord":
        """Starts the WandB run now, so a run that fails before its first step is a run too; wandb's refusals (no
        API key, a bad project name or tag) are one line."""
        from lightning.pytorch.loggers import WandbLogger

        if not isinstance(self.logger, WandbLogger):
            return self
        import wandb

        try:
            run = self._run()
        except (wandb.errors.Error, ValueError) as err:  # UsageError (project, run id), pydantic's ValueError
            lines = [line.strip() for line in str(err).splitlines() if line.strip()]
            message = next((line for line in lines if "error" in line.lower() and "validation error" not in line),
                           lines[0] if lines else type(err).__name__)
            raise UserError(f"wandb could not start the run: {message} (WANDB_MODE=offline logs without an "
                            "account; upload later with wandb sync)") from None
        if run is not None:
            run.define_metric("tokens", summary="max")  # a second x-axis, chosen in the UI
            if getattr(run, "id", None) and self.logger.save_dir:
                (Path(self.logger.save_dir) / RUN_ID_FILE).write_text(f"{run.id}\n")
        return self

    def track(self, state: Any, method: str, n_trainable: int, n_total: int, device) -> None:
        """The loop's ``trainer.TrainState``, from which a failure's summary is computed."""
        self.state, self.parts = state, (method, n_trainable, n_total, device)

    def finish(self, result: RunResult, generations: Sequence[Dict[str, Any]], out_dir: Path) -> None:
        """A run that reached its end (completed or interrupted): its summary, generations table and artifact."""
        run = self._run()
        if run is None or self.ended:
            return
        self.ended = True
        import wandb

        values = summary_values(result, result.status, time.perf_counter() - self.started_at)
        run.summary.update(values)
        if generations:
            table = wandb.Table(columns=TABLE_COLUMNS, data=[[g.get(c, "") for c in TABLE_COLUMNS]
                                                                  for g in generations])
            run.log({"generations": table, "trainer/global_step": result.steps})
        if self.args.log_artifacts and result.status == "completed":
            folder = next((out_dir / name for name in ("best", "final") if (out_dir / name).is_dir()), None)
            if folder is not None:
                name = re.sub(r"[^\w.-]", "-", f"model-{run.id}")  # the characters artifact names allow
                artifact = wandb.Artifact(name, type="model",
                                          metadata={"folder": folder.name, **values})
                # referenced in place, not copied into ~/.local/share/wandb (a full fine-tune's best/ is a model)
                artifact.add_dir(str(folder), name=folder.name, skip_cache=True, policy="immutable")
                run.log_artifact(artifact, aliases=["latest", folder.name])

    def fail(self, err: BaseException) -> None:
        """A run that ended with ``err``: its status and reason in the summary, the run finished, its location.
        Never raises: the run's own error is what the user must see."""
        try:
            self._fail(err)
        except Exception as log_err:
            print(f"warning: wandb could not record the failure ({type(log_err).__name__}: {log_err})", file=sys.stderr)

    def _fail(self, err: BaseException) -> None:
        run = None if self.ended else self._run_if_started()
        if run is None:
            return
        self.ended = True
        status, reason = failure_status(err)
        result = None
        if self.state is not None:
            method, n_trainable, n_total, device = self.parts
            result = result_from_state(method, status, self.state, n_trainable, n_total, device, Path("."))
        if not set(run.config.keys()) - {"_wandb"}:  # failed before the loop logged its config
            run.config.update(to_jsonable(self.hparams), allow_val_change=True)
        run.summary.update(summary_values(result, status, time.perf_counter() - self.started_at, reason))
        where = logger_summary(self.logger)
        run.finish(exit_code=1)
        if where:
            print(where, file=sys.stderr)

    def _run_if_started(self):
        try:
            return self._run() if getattr(self.logger, "_experiment", None) is not None else None
        except Exception:  # never hide the run's own error behind the logger's
            return None
