"""Device, precision and memory readings shared by training, generation and evaluation."""

from __future__ import annotations

import platform
import resource
from pathlib import Path
from typing import Optional

import torch

from lit_adapter.errors import UserError


def peak_memory_gb(device: torch.device) -> float:
    """CUDA allocator peak on GPUs; peak resident set size of the process on CPU (includes everything)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


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
