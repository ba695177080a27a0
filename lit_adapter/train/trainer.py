"""The training loop as an object: a :class:`Trainer` holds a :class:`TrainState` and runs one optimizer step at a
time with :meth:`Trainer.step`; :meth:`Trainer.fit` is the loop around it.

Why a class: the step is what users run, and it is what the throughput benchmark times and the memory measurement
measures (``benchmarks/finetune_throughput.py``, :func:`lit_adapter.memory.measure_step`). A Trainer is built
around an already built model, optimizer and batches, so those callers need no data folder; the run's other duties
(validation, logging, checkpoints, SIGINT/SIGTERM) are separate methods that only :meth:`Trainer.fit` calls.

Units: a *step* is one optimizer step over ``accum`` micro-batches per device (padded, or packed rows:
``lit_adapter.data.packing``). Its loss, and so its gradient, is normalised over the whole step: the sum over all
of its target tokens (the objective's items) on every micro-batch and device, divided by their count, so how a
step is split into micro-batches and devices changes neither. The resumable checkpoint is the
dict of :meth:`Trainer.checkpoint_state` (the keys ``last.ckpt`` has always had), so older checkpoints still load.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch

from lit_adapter.checkpoint import check_keys
from lit_adapter.tuners import registry as methods
from lit_adapter.errors import UserError, checkpoint_write_failure, is_out_of_memory
from lit_adapter.train.guards import GoodCheckpoint, LossNotFinite, StopRequest, check_finite, gradient_norm
from lit_adapter.train.objectives import Batch, Objective, resolve as resolve_objective
from lit_adapter.train import sharding
from lit_adapter.train.optim import build_optimizer
from lit_adapter.runtime import cuda_rng_state, peak_memory_gb, restore_cuda_rng_state

CHECKPOINT_NAME = "last.ckpt"


@dataclass
class TrainState:
    """Everything of a run that changes step by step, besides the model, optimizer and scheduler.

    :meth:`to_dict` / :meth:`from_dict` use the keys of the resumable checkpoint (``last.ckpt``).
    """

    step: int = 0
    """Optimizer steps taken."""
    train_losses: List[Tuple[int, float]] = field(default_factory=list)
    """(step, training loss of that step: the mean over all of its target tokens on every rank)."""
    val_losses: List[Tuple[int, float]] = field(default_factory=list)
    """(step, validation loss)."""
    tokens: int = 0
    """Processed positions over every rank, padding included: the compute the steps paid for."""
    train_time: float = 0.0
    """Seconds spent in :meth:`Trainer.step` (validation and checkpoints excluded)."""
    best_val: List[Any] = field(default_factory=list)
    """``[step, loss]`` of the lowest validation loss after step 0, or empty."""
    rng: Optional[torch.Tensor] = None
    """torch's CPU RNG state when the checkpoint was written (dropout masks continue exactly on resume)."""
    cuda_rng: Optional[Dict[str, Any]] = None
    """Every CUDA device's RNG state then (``runtime.cuda_rng_state``); None, and absent from the checkpoint,
    without CUDA. Checkpoints written before it existed load without it."""

    val_category_losses: List[Tuple[int, Dict[str, float]]] = field(default_factory=list)
    """(step, {category: validation loss}) of each validation, when the data have several categories."""

    KEYS = ("step", "train_losses", "val_losses", "tokens", "train_time", "best_val", "rng", "cuda_rng",
            "val_category_losses")

    def to_dict(self) -> Dict[str, Any]:
        return {key: getattr(self, key) for key in self.KEYS if key != "cuda_rng" or self.cuda_rng is not None}

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "TrainState":
        """The state of a checkpoint's dict; keys an older checkpoint lacks keep their defaults."""
        return cls(**{key: values[key] for key in cls.KEYS if key in values})


@dataclass
class StepResult:
    """What one :meth:`Trainer.step` measured."""

    loss: float
    """The step's loss: the sum over every target token (item) of its micro-batches on every rank, divided by
    their count (so it does not depend on how the step was split into micro-batches and devices)."""
    grad_norm: float
    """The global gradient norm before clipping."""
    tokens: int
    """Positions this rank processed, padding included."""


@dataclass
class RunPlan:
    """What :meth:`Trainer.fit` needs besides the step: the run's length, where it writes, how often it evaluates,
    logs and saves (``eval`` is a ``training.EvalArgs``)."""

    total_steps: int
    steps_per_epoch: int
    val_loader: Iterable[Batch]
    spec: Any
    """The run's ``methods.MethodSpec``: what ``best/``, ``final/`` and the checkpoint keep."""
    config: Any
    checkpoint_dir: Path
    out_dir: Path
    eval: Any
    log_interval: int = 1
    save_interval: Optional[int] = None
    resumed: bool = False
    adapter_record: Dict[str, Any] = field(default_factory=dict)
    """Written into ``best/`` and ``final/``'s ``adapter_config.json`` beside the method (the data's chat template,
    which generation and evaluation must prompt with)."""
    categories: Tuple[str, ...] = ()
    """The validation split's task categories, whose losses validation also reports (none: only the overall)."""

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / CHECKPOINT_NAME


def method_optimizer(model, spec, name: str, lr: float, weight_decay: float,
                     betas: Tuple[float, float]) -> torch.optim.Optimizer:
    """The optimizer over the parameter groups the method declares (``Method.param_groups``): one group of every
    trainable tensor unless the method says otherwise (LoRA+ gives B its own learning rate)."""
    groups = spec.definition.param_groups(model, spec.settings, lr, weight_decay)
    return build_optimizer(groups, name, lr=lr, weight_decay=weight_decay, betas=betas)


class Trainer:
    """Runs optimizer steps on a model that ``fabric.setup`` has wrapped, and keeps their :class:`TrainState`.

    Args:
        fabric: the run's Lightning Fabric (its device, precision, collectives and backward).
        model, optimizer: as returned by ``fabric.setup``.
        batches: the micro-batches, drawn ``accum`` at a time by :meth:`step` (an endless iterable for the
            benchmark and the measurement; the step-indexed training loader for a run).
        scheduler: stepped after every optimizer step; None keeps the learning rate.
        accum: micro-batches per optimizer step (gradient accumulation).
        objective: what is optimised (:mod:`lit_adapter.train.objectives`); default next-token cross-entropy.
        loss: ``TrainArgs.loss``, how the cross-entropy is computed.
        max_grad_norm: clip the global gradient norm to this; None: no clipping (the norm is still checked).
        trainable: the trained tensors, whose gradient norm is taken when not clipping (default: those requiring
            grad; a run passes the list it took before Fabric's setup).
        state: a state to continue from (default: a fresh one).
    """

    def __init__(self, fabric, model, optimizer, batches: Iterable[Batch], *, scheduler=None, accum: int = 1,
                 objective: Optional[Objective] = None, loss: str = "cross_entropy",
                 max_grad_norm: Optional[float] = 1.0, trainable: Optional[List[torch.nn.Parameter]] = None,
                 state: Optional[TrainState] = None) -> None:
        if accum < 1:
            raise UserError(f"gradient accumulation must be >= 1 micro-batch per step, got {accum}")
        self.fabric, self.model, self.optimizer, self.scheduler = fabric, model, optimizer, scheduler
        self.batches: Iterator[Batch] = iter(batches)
        self.accum = accum
        self.objective = resolve_objective(objective)
        self.loss = loss
        self.max_grad_norm = max_grad_norm
        self.trainable = trainable if trainable is not None else [p for p in model.parameters() if p.requires_grad]
        self.state = state or TrainState()
        # set by fit(): which checkpoint is known to be good, for the non-finite messages
        self.keeper: Optional[GoodCheckpoint] = None
        # the objective's other metrics of the latest validation (accuracy, rewards, ...)
        self.val_extra: Dict[str, float] = {}
        # where the current log window began, and the tokens this rank processed since (for tokens_per_s)
        self._window_start, self._window_tokens = time.perf_counter(), 0

    # ------------------------------------------------------------------------------------------------- the step

    def step(self) -> StepResult:
        """One optimizer step: ``accum`` forward/backward passes, the finite checks, clipping, the optimizer and
        the scheduler. Raises :class:`LossNotFinite` before any update when the loss or the gradients are inf/NaN."""
        fabric, model, accum = self.fabric, self.model, self.accum
        start = time.perf_counter()
        batches = [next(self.batches) for _ in range(accum)]
        # The step's loss is the sum over all of its items (target tokens) divided by their count over every
        # micro-batch and rank, so its gradient does not depend on how the step was split (the accumulation bug
        # that averaging per-micro-batch means has). The count is known before any forward: one all-reduce.
        count = fabric.all_reduce(sum(self.objective.count(batch) for batch in batches).to(fabric.device),
                                  reduce_op="sum").clamp(min=1)
        scale = fabric.world_size / count  # DDP averages the ranks' gradients; x world_size makes that a sum
        step_sum, step_tokens = torch.zeros((), device=fabric.device), 0
        for micro, batch in enumerate(batches):
            with fabric.no_backward_sync(model, enabled=micro < accum - 1):
                loss, n = self.objective.forward_loss(model, batch, self.loss, fabric.autocast)
                summed = loss * n  # the micro-batch's sum over its items
                fabric.backward(summed * scale)
            step_sum += summed.detach()
            # processed positions (padding included, none when packed): the compute the step paid for
            step_tokens += batch["input_ids"].numel()
        step_loss = fabric.all_reduce(step_sum, reduce_op="sum") / count
        norm = gradient_norm(fabric, model, self.optimizer, self.trainable, self.max_grad_norm)
        loss_value, grad_norm = read_on_host(step_loss, norm)  # the step's one host-device synchronisation
        number = self.state.step + 1
        if not math.isfinite(loss_value):
            raise self._not_finite(f"the training loss became {loss_value} at step {number}; no update was applied")
        if self.keeper is not None:
            self.keeper.step_was_finite()
        if not math.isfinite(grad_norm):
            raise self._not_finite(f"the gradients became non-finite (norm {grad_norm}) at step {number}; "
                                   "no update was applied")
        try:
            self.optimizer.step()
        except RuntimeError as err:  # torch's AdamW cannot even form an update that large
            if "overflow" not in str(err):
                raise
            raise self._not_finite(f"the optimizer's update overflowed at step {number} "
                                   f"(train.learning_rate={self.optimizer.defaults['lr']:g})") from None
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        state = self.state
        state.step = number
        # counted per step, not per log window: validation rows and checkpoints between logs see them
        state.tokens += step_tokens * fabric.world_size
        state.train_time += time.perf_counter() - start
        state.train_losses.append((number, loss_value))
        return StepResult(loss=loss_value, grad_norm=grad_norm, tokens=step_tokens)

    def _not_finite(self, what: str) -> LossNotFinite:
        kept = ""
        if self.keeper is not None:
            self.keeper.diverged()
            kept = self.keeper.describe()
        return LossNotFinite(f"{what}{kept}. Lower train.learning_rate, keep train.max_grad_norm set, "
                             "or check the data.")

    # ------------------------------------------------------------------------------------------------- the loop

    def fit(self, plan: RunPlan) -> str:
        """Steps until ``plan.total_steps`` or a stop request; returns ``"completed"`` or ``"interrupted"``.

        Validates before the first step (``eval.initial``), every ``eval.interval`` steps and at the end, logs
        every ``log_interval`` steps, writes ``last.ckpt`` every ``save_interval`` steps and at the end, and
        ``final/`` when the run completed.
        """
        from tqdm import tqdm

        fabric, state = self.fabric, self.state
        self.keeper = GoodCheckpoint(plan.checkpoint_path, state.step if plan.resumed else None,
                                     is_main=fabric.global_rank == 0)
        if state.step == 0 and plan.eval.initial:
            loss = self.validate(plan, 0)
            fabric.print(f"validation loss before training: {loss:.4f}{format_metrics(self.val_extra)}")
        status = "completed"
        progress = tqdm(total=plan.total_steps, initial=state.step, unit="step", disable=fabric.global_rank != 0,
                        dynamic_ncols=True, file=sys.stderr, mininterval=0.5)
        self._window_start, self._window_tokens = time.perf_counter(), 0  # the log window, on this rank
        with StopRequest() as stop:
            try:
                while state.step < plan.total_steps:
                    result = self.step()
                    self._window_tokens += result.tokens
                    progress.update(1)
                    self.after_step(plan, result, progress)
                    # every rank stops after the same step (a signal may reach one rank, or each at another
                    # step), so the checkpoint's collectives meet
                    if sharding.any_rank(stop.signal is not None):
                        status = "interrupted"
                        break
                progress.close()
                self.finish(plan, status)
            except KeyboardInterrupt:  # a second SIGINT/SIGTERM while stopping: say what is on disk
                progress.close()
                self._stopped_again(plan)
            finally:
                progress.close()  # before any error line, so it does not land on the bar's line
        return status

    def after_step(self, plan: RunPlan, result: StepResult, progress) -> None:
        """Logs, validates and saves as the intervals say, after the step that ``result`` describes."""
        step = self.state.step
        if step % plan.log_interval == 0 or step == plan.total_steps:
            elapsed = time.perf_counter() - self._window_start
            tokens_per_s = self._window_tokens * self.fabric.world_size / max(elapsed, 1e-9)
            self._window_start, self._window_tokens = time.perf_counter(), 0
            self.log_step(plan, result, tokens_per_s)
            progress.set_postfix(loss=f"{result.loss:.4f}", tok_s=f"{tokens_per_s:,.0f}")
        if step % plan.eval.interval == 0 and step != plan.total_steps:
            val_loss = self.validate(plan, step)
            progress.write(f"step {step}: validation loss {val_loss:.4f}{format_metrics(self.val_extra)}")
        if plan.save_interval and step % plan.save_interval == 0:
            self.save(plan)

    def log_step(self, plan: RunPlan, result: StepResult, tokens_per_s: float) -> None:
        fabric, step = self.fabric, self.state.step
        lr = self.scheduler.get_last_lr()[0] if self.scheduler is not None else self.optimizer.param_groups[0]["lr"]
        metrics = {"train_loss": result.loss, "learning_rate": lr, "grad_norm": result.grad_norm,
                   "tokens_per_s": tokens_per_s, "peak_memory_gb": peak_memory_gb(fabric.device),
                   "epoch": step / max(plan.steps_per_epoch, 1), "step": step, "tokens": self.state.tokens}
        metrics.update({f"train_{k}": v for k, v in self.objective.metrics(fabric, "train").items()})
        fabric.log_dict(metrics, step=step)

    def validate(self, plan: RunPlan, step: int) -> float:
        """The validation loss at ``step``, recorded and logged; a new lowest one after step 0 writes ``best/``."""
        fabric, state = self.fabric, self.state
        by_category: Dict[str, Tuple[float, int]] = {}
        loss = validate(fabric, self.model, plan.val_loader, plan.eval.max_batches, self.loss, self.objective,
                        categories=plan.categories, by_category=by_category)
        state.val_losses.append((step, loss))
        self.val_extra = self.objective.metrics(fabric, "val")
        metrics = {"val_loss": loss, "step": step, "tokens": state.tokens,
                   **{f"val_{k}": v for k, v in self.val_extra.items()}}
        if by_category:
            state.val_category_losses.append((step, {name: value for name, (value, _) in by_category.items()}))
            # "val_loss/<category>": TensorBoard and WandB group these under one heading
            metrics.update({f"val_loss/{name}": value for name, (value, _) in by_category.items()})
        if step > 0 and math.isfinite(loss) and (not state.best_val or loss < state.best_val[1]):
            state.best_val = [step, loss]
            if plan.eval.save_best:
                self.save_trained(plan, "best")
            fabric.barrier()
        if state.best_val:
            metrics["best_val_loss"] = state.best_val[1]
        fabric.log_dict(metrics, step=step)
        return loss

    def finish(self, plan: RunPlan, status: str) -> None:
        """The end of the loop: the final validation and ``final/`` (completed runs), and ``last.ckpt``."""
        fabric, step = self.fabric, self.state.step
        if status == "completed":
            self.validate(plan, step)
        self.save(plan)
        if status == "completed":
            check_finite(self.model, plan.spec, f"after step {step}", self._not_finite)
            self.save_trained(plan, "final")
            fabric.barrier()
        self.keeper.finish()

    # ---------------------------------------------------------------------------------------------- checkpoints

    def save_trained(self, plan: RunPlan, folder: str) -> None:
        """Writes ``out_dir/<folder>`` (``final`` or ``best``) from rank 0 in the single-device format; sharded
        tensors are first gathered from every rank (:func:`sharding.consolidated_model`)."""
        model = self.model
        if sharding.is_sharded(model):
            model = sharding.consolidated_model(model, plan.spec, plan.config)  # every rank gathers
        if self.fabric.global_rank == 0:  # DDP's ranks hold the same tensors; one writes them
            methods.save_adapter_folder(model, plan.spec, plan.config, plan.checkpoint_dir, plan.out_dir / folder,
                                        record=plan.adapter_record)

    def save(self, plan: RunPlan) -> None:
        """Writes ``last.ckpt`` atomically; it stays pending until the next step's loss is finite."""
        state = checkpoint_state(self.model, self.optimizer, self.scheduler, self.state)
        save_resumable(self.fabric, state, plan.checkpoint_path, plan.spec, self.model,
                       keep_previous=self.keeper.previous)
        self.keeper.written(self.state.step)

    def _stopped_again(self, plan: RunPlan) -> None:
        keeper = self.keeper
        newest = keeper.pending if keeper.pending is not None else keeper.good
        left = (f"{plan.checkpoint_path} is the complete checkpoint of step {newest}" if newest is not None
                else "no checkpoint was written")
        print(f"\nstopped again during shutdown: {left} (checkpoints are written atomically, so it is whole); "
              "final/ was not written", file=sys.stderr)
        raise SystemExit(130) from None


def checkpoint_state(model, optimizer, scheduler, state: TrainState) -> Dict[str, Any]:
    """What ``last.ckpt`` holds: the model (Fabric's save filter keeps only the trainable tensors), the optimizer,
    the scheduler and the :class:`TrainState`, with the RNG state of now."""
    state.rng, state.cuda_rng = torch.get_rng_state(), cuda_rng_state()
    return {"model": model, "optimizer": optimizer, "scheduler": scheduler.state_dict() if scheduler else {},
            **state.to_dict()}


def resume_state(fabric, path: Path, model, optimizer, scheduler, spec) -> TrainState:
    """The :class:`TrainState` of the checkpoint at ``path``, whose trainable tensors, optimizer and scheduler state
    and RNG state are loaded in place: a run continues exactly where that one stopped."""
    fresh = checkpoint_state(model, optimizer, scheduler, TrainState())
    # a folder is a sharded checkpoint (--fabric.strategy fsdp), which loads at any world size
    load = sharding.load_sharded if path.is_dir() else load_resumable
    state = TrainState.from_dict(load(fabric, fresh, path, model, spec, scheduler))
    fabric.print(f"resumed from {path} at step {state.step}")
    return state


def read_on_host(*values: torch.Tensor) -> List[float]:
    """The 0-dim tensors ``values`` as Python floats, in one device-to-host copy.

    Each ``float(tensor)`` of a CUDA tensor waits for the GPU to finish everything queued before it; a step that
    read its loss, its gradient norm and its counts one by one would stall the GPU several times per step. The
    step's values stay on the device until the optimizer needs to know they are finite, then come over together.
    """
    dtype = functools.reduce(torch.promote_types, (v.dtype for v in values))  # exact for every input
    return torch.stack([v.detach().to(dtype).reshape(()) for v in values]).cpu().tolist()


def format_metrics(metrics: Dict[str, float]) -> str:
    return "".join(f", {name} {value:.4f}" for name, value in metrics.items())


@torch.no_grad()
def validate(fabric, model, loader, max_batches: Optional[int], loss: str = "cross_entropy",
             objective: Optional[Objective] = None, categories: Sequence[str] = (),
             by_category: Optional[Dict[str, Tuple[float, int]]] = None) -> float:
    """Token-weighted mean validation loss (each target token counts once, whatever its batch; each item of the
    objective's, e.g. each example or pair, for other objectives).

    With ``categories`` (the batches then carry each row's ``"category"``), ``by_category`` is filled with
    ``{category: (mean loss, target tokens)}``: each batch's rows are evaluated a category at a time, so every
    category's loss is weighted by its own target tokens and the overall loss is their token-weighted mean,
    ``sum(n_c * loss_c) / sum(n_c)``, the same number as without categories. Right padding cannot change a real
    token's logits under causal attention, so splitting a batch changes no loss, only the number of forward calls.
    A category with no target token in the batches validated is left out.

    A transient progress bar shows it: a full Dolly validation split is minutes of work on a small machine.
    """
    from tqdm import tqdm

    objective = resolve_objective(objective)
    model.eval()
    index = {name: i for i, name in enumerate(categories)}
    # float64 sums per category (one slot when there are none), reduced over the ranks once at the end
    totals = torch.zeros(max(len(categories), 1), device=fabric.device, dtype=torch.float64)
    counts = torch.zeros(max(len(categories), 1), device=fabric.device, dtype=torch.float64)
    batches = len(loader) if max_batches is None else min(len(loader), max_batches)
    bar = tqdm(total=batches, desc="validation", unit="batch", leave=False, file=sys.stderr, dynamic_ncols=True,
               disable=fabric.global_rank != 0, mininterval=0.5)
    for i, batch in enumerate(loader):
        if i >= batches:
            break
        for slot, part in _category_parts(batch, index):
            value, n = objective.forward_loss(model, part, loss, fabric.autocast)
            totals[slot] += value.double() * n
            counts[slot] += n
        bar.update(1)
    bar.close()
    model.train()
    totals = fabric.all_reduce(totals, reduce_op="sum")
    counts = fabric.all_reduce(counts, reduce_op="sum")
    if by_category is not None and categories:
        by_category.clear()
        # a category absent from the batches validated (eval.max_batches) has no loss, not a NaN one
        by_category.update({name: (float(totals[i] / counts[i]), int(counts[i])) for name, i in index.items()
                            if counts[i] > 0})
    return float(totals.sum() / counts.sum().clamp(min=1))


def _category_parts(batch: Batch, index: Dict[str, int]) -> Iterator[Tuple[int, Batch]]:
    """``(slot, rows of one category)`` for each category in ``batch``; the whole batch in slot 0 without categories."""
    names = batch.get("category") if index else None
    if names is None:
        yield 0, batch
        return
    for name in dict.fromkeys(names):  # first-seen order
        rows = [r for r, row_name in enumerate(names) if row_name == name]
        if len(rows) == len(names):
            yield index[name], batch
            continue
        take = torch.tensor(rows, device=batch["input_ids"].device)
        # the flattened target positions are the whole batch's: a part runs its head on every position instead
        yield index[name], {key: value.index_select(0, take) if torch.is_tensor(value) else
                            [value[r] for r in rows] for key, value in batch.items() if key != "target_rows"}


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0][:200]


def save_resumable(fabric, state: Dict[str, Any], path: Path, spec, model=None,
                   keep_previous: Optional[Path] = None) -> None:
    """Writes ``state`` (:meth:`Trainer.checkpoint_state`) atomically (temp file + rename).

    Refuses non-finite tensors (so the newest checkpoint is always one to resume from) and turns a failed write
    (a full disk) into one line; the previous checkpoint is left as it was in both cases. Running out of memory
    is not a failed write: it propagates as itself.
    """
    if model is not None:
        check_finite(model, spec, f"after step {state['step']}", LossNotFinite)
    if sharding.is_sharded(state["model"]) or path.is_dir():  # a sharded run, or one resumed from its folder
        sharding.save_sharded(fabric, state, path, spec, keep_previous)
        return
    tmp = path.with_name(path.name + ".tmp")
    try:
        fabric.save(tmp, state, filter={"model": methods.trainable_filter(spec)})
    except (OSError, RuntimeError) as err:
        tmp.unlink(missing_ok=True)
        raise checkpoint_write_failure(path, err) from None
    fabric.barrier()
    if fabric.global_rank == 0:
        if keep_previous is not None and path.exists():
            os.replace(path, keep_previous)  # until the new one has proven itself (guards.GoodCheckpoint)
        os.replace(tmp, path)


def load_resumable(fabric, state: Dict[str, Any], path: Path, model, spec, scheduler=None) -> Dict[str, Any]:
    """Loads the checkpoint at ``path`` into ``state`` (:meth:`Trainer.checkpoint_state`: the model and optimizer
    in place, the other entries replaced) and returns it; restores the scheduler and the RNG.

    A checkpoint of another method or shape is one line naming what does not fit; running out of memory while
    loading propagates as itself, never as "does not fit".
    """
    if not path.exists():
        raise UserError(f"--resume: no checkpoint at {path}; run without --resume to start afresh")
    # what save_resumable wrote: the filtered state dict, in which a tied head appears under both of its names
    keep = methods.trainable_filter(spec)
    expected = {n: t for n, t in methods.unwrap(model).state_dict(keep_vars=True).items() if keep(n, t)}
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # truncated, crafted (weights_only refuses code) or not a checkpoint at all
        if is_out_of_memory(err):
            raise
        raise UserError(f"--resume: cannot read {path} ({type(err).__name__}: {_first_line(err)}); "
                        "it is not a complete checkpoint") from None
    tensors = saved.get("model") if isinstance(saved, dict) else None
    missing_fields = [k for k in ("model", "optimizer", "step", "scheduler", "rng") if not isinstance(saved, dict)
                      or k not in saved]
    if missing_fields or not isinstance(tensors, dict):
        raise UserError(f"--resume: {path} is not a checkpoint of this trainer (missing {', '.join(missing_fields) or 'model'})")
    check_keys(expected, tensors, f"--resume: {path} does not fit this run's {spec.describe()}")
    del saved, tensors
    try:
        remainder = fabric.load(path, state, strict=False, weights_only=True)
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        restore_cuda_rng_state(state.get("cuda_rng"), fabric.world_size)
    except (KeyError, ValueError, RuntimeError, TypeError) as err:  # e.g. optimizer state of another method
        if is_out_of_memory(err):  # torch.OutOfMemoryError is a RuntimeError: not a mismatch
            raise
        raise UserError(f"--resume: {path} does not fit this run ({type(err).__name__}: {_first_line(err)})") from None
    state.update(remainder)
    return state
