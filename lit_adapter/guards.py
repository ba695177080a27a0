"""What keeps a run from writing garbage or dying silently: stop requests, non-finite values.

* :class:`StopRequest` turns SIGINT/SIGTERM into a flag the loop checks between steps, so the run can write a
  resumable checkpoint and say how to continue; a second signal stops at once (the loop then says what is on disk).
* :func:`gradient_norm` and :func:`check_finite` find inf/NaN before the optimizer applies it and before a
  checkpoint is written, so the newest checkpoint is always one that can be resumed from.
"""

from __future__ import annotations

import signal
import sys
from typing import Any, Dict, List, Optional

import torch

from lit_adapter import methods
from lit_adapter.errors import UserError


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


def gradient_norm(fabric, model, optimizer, trainable: List[torch.nn.Parameter], max_norm: Optional[float]) -> float:
    """The global gradient norm, clipped to ``max_norm`` when given; non-finite norms are returned, not raised, so
    the loop can stop with its own message before the update."""
    if max_norm is not None:
        norm = fabric.clip_gradients(model, optimizer, max_norm=max_norm, error_if_nonfinite=False)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in trainable if p.grad is not None])
    return float(norm) if norm is not None else 0.0


def check_finite(model, spec, when: str, error) -> None:
    """Raises ``error(...)`` if a trained tensor holds inf or NaN, so none is ever written to disk."""
    keep = methods.trainable_filter(spec)
    bad = [name for name, p in methods.unwrap(model).named_parameters()
           if keep(name, p) and p.is_floating_point() and not torch.isfinite(p).all()]
    if bad:
        raise error(f"the weights became non-finite {when} ({len(bad)} tensors, e.g. {bad[0]}); nothing was saved")
