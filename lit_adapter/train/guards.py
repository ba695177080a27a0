"""What keeps a run from writing garbage or dying silently: stop requests, non-finite values.

* :class:`StopRequest` turns SIGINT/SIGTERM into a flag the loop checks between steps, so the run can write a
  resumable checkpoint and say how to continue; a second signal stops at once (the loop then says what is on disk).
* :func:`gradient_norm` (read with the loss, once per step) and :func:`check_finite` find inf/NaN before the
  optimizer applies it and before a checkpoint is written, so the newest checkpoint is always one that can be resumed from.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from typing import Any, Dict, List, Optional

import torch

from lit_adapter.tuners import registry as methods
from lit_adapter.errors import UserError
from lit_adapter.train.sharding import any_rank, local


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag the loop checks between steps, so a checkpoint can be written."""

    def __init__(self) -> None:
        self.signal: Optional[int] = None
        self._previous: Dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. spawned workers): leave the defaults
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:  # a second signal: stop at once
            raise KeyboardInterrupt
        self.signal = signum
        print(f"\nreceived {signal.Signals(signum).name}: saving a resumable checkpoint after this step", file=sys.stderr)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class LossNotFinite(UserError):
    """The loss, the gradients or the weights became inf/NaN; the message names the last good checkpoint."""


def gradient_norm(fabric, model, optimizer, trainable: List[torch.nn.Parameter],
                  max_norm: Optional[float]) -> torch.Tensor:
    """The global gradient norm (a 0-dim tensor on the device), clipped to ``max_norm`` when given; non-finite norms
    are returned, not raised, so the loop can stop with its own message before the update.

    It stays a tensor: the step reads it together with the loss in its one host-device synchronisation
    (``Trainer.step``), and clipping scales by a clamped tensor coefficient without reading it."""
    if max_norm is not None:
        norm = fabric.clip_gradients(model, optimizer, max_norm=max_norm, error_if_nonfinite=False)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in trainable if p.grad is not None])
    if norm is not None and hasattr(norm, "full_tensor"):  # sharded gradients (fsdp): the norm over every rank
        norm = norm.full_tensor()
    return norm if norm is not None else torch.zeros((), device=fabric.device)


def check_finite(model, spec, when: str, error) -> None:
    """Raises ``error(...)`` if a trained tensor holds inf or NaN, so none is ever written to disk."""
    keep = methods.trainable_filter(spec)
    bad = [name for name, p in methods.unwrap(model).named_parameters()
           if keep(name, p) and p.is_floating_point() and not torch.isfinite(local(p)).all()]
    if any_rank(bool(bad)):  # each rank checks its shard (fsdp); all of them stop together
        bad = bad or ["a tensor sharded to another rank"]
        raise error(f"the weights became non-finite {when} ({len(bad)} tensors, e.g. {bad[0]}); nothing was saved")


def remove_checkpoint(path) -> None:
    """Removes a checkpoint file, or a sharded checkpoint's folder (fsdp)."""
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


class GoodCheckpoint:
    """Keeps ``last.ckpt`` a checkpoint that is known to be good: finite, and followed by a step with a finite loss.

    Finite is not enough: weights that an oversized update blew up to 1e38 are finite, and resuming from them fails
    like the run did. So a checkpoint written at step s stays *pending* until step s + 1's loss comes out finite,
    and the one before it is kept beside it as ``last.ckpt.prev`` until then. If the loss goes non-finite first, the
    pending checkpoint is set aside as ``last.ckpt.diverged`` (kept for inspection; ``--resume`` ignores it) and
    the previous one is put back.
    """

    def __init__(self, path, resumed_step: Optional[int], is_main: bool) -> None:
        self.path = path
        self.previous = path.with_name(path.name + ".prev")
        self.diverged_path = path.with_name(path.name + ".diverged")
        self.good: Optional[int] = resumed_step  # a checkpoint a run resumed from has already proven itself
        self.pending: Optional[int] = None
        self.set_aside: Optional[int] = None
        self.is_main = is_main

    def written(self, step: int) -> None:
        """A checkpoint of ``step`` was just written (the one it replaced is now ``self.previous``)."""
        self.pending = step

    def step_was_finite(self) -> None:
        if self.pending is not None:
            self.good, self.pending = self.pending, None
            if self.is_main:
                remove_checkpoint(self.previous)

    def diverged(self) -> None:
        """The step after the pending checkpoint went non-finite: put the previous good one back."""
        if self.pending is None:
            return
        if self.is_main and self.path.exists():
            remove_checkpoint(self.diverged_path)
            os.replace(self.path, self.diverged_path)
            if self.previous.exists():
                os.replace(self.previous, self.path)
        self.set_aside, self.pending = self.pending, None

    def describe(self) -> str:
        aside = self.set_aside
        kept = (f" (the step-{aside} checkpoint, whose next step diverged, is kept as {self.diverged_path.name})"
                if aside is not None else "")
        if self.good is None:
            return f"; no checkpoint known to be good had been written yet{kept}"
        return (f"; the last good checkpoint is {self.path} (step {self.good}: finite, and the step after it had a "
                f"finite loss){kept}: continue from it with --resume true")

    def finish(self) -> None:
        """The run ended normally: the newest checkpoint is the one to keep."""
        if self.is_main:
            remove_checkpoint(self.previous)
