"""Device, precision and memory readings shared by training, generation and evaluation."""

from __future__ import annotations

import platform
import resource
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from lit_adapter.errors import UserError


def peak_memory_gb(device: torch.device) -> float:
    """CUDA allocator peak on GPUs; peak resident set size of the process on CPU (includes everything)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def cuda_rng_state() -> Optional[Dict[str, Any]]:
    """Every CUDA device's RNG state (``torch.cuda.get_rng_state_all()``) and the device this process computes on,
    for a checkpoint; None without CUDA. Dropout masks drawn on a GPU come from these generators, not the CPU's."""
    if not torch.cuda.is_available():
        return None
    return {"states": torch.cuda.get_rng_state_all(), "device": torch.cuda.current_device()}


def restore_cuda_rng_state(saved: Optional[Dict[str, Any]], world_size: int = 1) -> None:
    """Puts back what :func:`cuda_rng_state` saved; nothing to do without CUDA or for a checkpoint without it.

    One process (``world_size`` 1) gets every device's state back. Under DDP each rank owns one device; the
    checkpoint is rank 0's, and the ranks are seeded alike and draw alike (``fabric.seed_everything``), so each
    rank's device gets the state of rank 0's own device: exactly its own at save time, as for the CPU state.
    """
    if saved is None or not torch.cuda.is_available():
        return
    states = saved["states"]
    if world_size > 1:
        torch.cuda.set_rng_state(states[saved["device"]], torch.cuda.current_device())
        return
    for index, state in enumerate(states[:torch.cuda.device_count()]):
        torch.cuda.set_rng_state(state, index)


def default_precision(accelerator: str) -> str:
    if accelerator in ("auto", "cuda", "gpu") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-true"
    return "32-true"


def weights_dtype(precision: str) -> torch.dtype:
    return {"bf16-true": torch.bfloat16, "16-true": torch.float16}.get(precision, torch.float32)


def resolve_device(device: Optional[str]) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown --device {device!r}; use cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was requested but no CUDA device is available")
    return dev


def resolve_precision(precision: Optional[str], device: torch.device) -> str:
    if precision is None:
        return "bf16-true" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "32-true"
    if precision not in ("32-true", "bf16-true", "16-true"):
        raise UserError(f"unknown --precision {precision!r}; choose 32-true, bf16-true or 16-true")
    return precision


def compile_blocks(model: torch.nn.Module, dynamic: Optional[bool] = None) -> int:
    """``torch.compile`` each transformer block of ``model`` in place (``TrainArgs.compile``); returns how many.

    The blocks are compiled, not the whole step: the embedding, the head and the fused loss stay eager (the loss
    is already one pass, lit_adapter.train.losses), and the blocks share one compiled graph (same code, same shapes).
    Compilation happens in the first forward and backward (minutes on a small CPU), and again when a new sequence
    length arrives (``dynamic=None``: after the first change torch marks the length dynamic).
    """
    blocks = model.transformer.h
    for block in blocks:
        block.compile(dynamic=dynamic)
    return len(blocks)


def cpu_model(fallback: Optional[str] = None) -> str:
    """The CPU's model name from /proc/cpuinfo, for the provenance lines of results; elsewhere what ``platform``
    knows, else ``fallback`` (default: the architecture)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or fallback or platform.machine()
