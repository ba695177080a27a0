"""What a run reports: :class:`RunResult` (also ``summary.json``) and the summary printed at its end."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from lit_adapter.runtime import peak_memory_gb


def to_jsonable(obj: Any) -> Any:
    if is_dataclass(obj):
        return {k: to_jsonable(v) for k, v in asdict(obj).items()}
    if isinstance(obj, dict):
        return {k: to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


@dataclass
class RunResult:
    """What a finished (or stopped) run reports; also written to ``summary.json``."""

    method: str
    status: str
    steps: int
    trainable_params: int
    total_params: int
    initial_val_loss: Optional[float] = None
    """Validation loss of the model before training (step 0), when it was measured."""
    final_val_loss: Optional[float] = None
    """The last validation loss measured, at ``final_val_step``."""
    final_val_step: Optional[int] = None
    best_val_loss: Optional[float] = None
    """The lowest validation loss after step 0; ``best/`` holds the tensors of ``best_val_step``."""
    best_val_step: Optional[int] = None
    avg_train_loss: Optional[float] = None
    last_train_loss: Optional[float] = None
    train_time_s: float = 0.0
    tokens_per_s: float = 0.0
    peak_memory_gb: float = 0.0
    peak_memory_kind: str = ""
    out_dir: str = ""
    train_losses: List[Tuple[int, float]] = field(default_factory=list)
    val_losses: List[Tuple[int, float]] = field(default_factory=list)
    initial_val_loss_by_category: Dict[str, float] = field(default_factory=dict)
    """The step-0 validation loss of each task category (when the data have several), as ``initial_val_loss``."""
    final_val_loss_by_category: Dict[str, float] = field(default_factory=dict)
    """Each category's validation loss at ``final_val_step``; their mean weighted by the categories' target tokens
    is ``final_val_loss``."""
    val_category_losses: List[Tuple[int, Dict[str, float]]] = field(default_factory=list)
    """(step, {category: loss}) of every validation."""


def describe_validation(result: RunResult) -> str:
    """What was measured when, so a stopped run never passes the step-0 loss off as the trained model's."""
    parts = []
    if result.initial_val_loss is not None:
        parts.append(f"{result.initial_val_loss:.4f} before training (step 0)")
    if result.final_val_step:
        last = "the last step" if result.final_val_step == result.steps else "the last validation"
        parts.append(f"{result.final_val_loss:.4f} at step {result.final_val_step} ({last})")
    elif result.steps and result.initial_val_loss is not None:
        parts.append(f"none after training (stopped at step {result.steps})")
    if result.best_val_step is not None and result.best_val_step != result.final_val_step:
        parts.append(f"best {result.best_val_loss:.4f} at step {result.best_val_step} (best/)")
    return ", ".join(parts) or "not measured"


def result_from_state(method: str, status: str, state, n_trainable: int, n_total: int, device, out_dir: Path) -> RunResult:
    """The :class:`RunResult` of the loop's ``state`` (a ``trainer.TrainState``) so far (also for a run that failed
    midway)."""
    losses = [loss for _, loss in state.train_losses]
    vals = state.val_losses
    by_category = getattr(state, "val_category_losses", [])
    # the per-category losses of the last validation, when it had them (a resumed older run may not)
    final_measured = bool(by_category and vals and by_category[-1][0] == vals[-1][0])
    return RunResult(
        method=method,
        status=status,
        steps=state.step,
        trainable_params=n_trainable,
        total_params=n_total,
        initial_val_loss=vals[0][1] if vals and vals[0][0] == 0 else None,
        final_val_loss=vals[-1][1] if vals else None,
        final_val_step=vals[-1][0] if vals else None,
        best_val_loss=state.best_val[1] if state.best_val else None,
        best_val_step=state.best_val[0] if state.best_val else None,
        avg_train_loss=sum(losses) / len(losses) if losses else None,
        last_train_loss=losses[-1] if losses else None,
        train_time_s=state.train_time,
        tokens_per_s=state.tokens / max(state.train_time, 1e-9),
        peak_memory_gb=peak_memory_gb(device),
        peak_memory_kind="cuda_max_allocated" if device.type == "cuda" else "process_peak_rss",
        out_dir=str(out_dir),
        train_losses=[tuple(x) for x in state.train_losses],
        val_losses=[tuple(x) for x in vals],
        initial_val_loss_by_category=dict(by_category[0][1]) if by_category and by_category[0][0] == 0 else {},
        final_val_loss_by_category=dict(by_category[-1][1]) if final_measured else {},
        val_category_losses=[(s, dict(losses)) for s, losses in by_category],
    )


def summarize(fabric, spec, status, state, n_trainable, n_total, out_dir: Path) -> RunResult:
    result = result_from_state(spec.describe(), status, state, n_trainable, n_total, fabric.device, out_dir)
    if fabric.global_rank == 0:
        (out_dir / "summary.json").write_text(json.dumps(asdict(result), indent=2) + "\n")
        fmt = lambda x: "n/a" if x is None else f"{x:.4f}"  # noqa: E731
        fabric.print(
            "\n".join([
                f"--- {result.method}: {status} after {result.steps} steps ---",
                f"trainable parameters: {n_trainable:,} of {n_total:,}",
                f"train loss: average {fmt(result.avg_train_loss)}, last {fmt(result.last_train_loss)}",
                f"validation loss: {describe_validation(result)}",
                f"training time: {result.train_time_s:.1f}s, {result.tokens_per_s:,.0f} tokens/s",
                f"peak memory: {result.peak_memory_gb:.2f} GB ({result.peak_memory_kind})",
                f"outputs: {out_dir}",
            ])
        )
    return result
