"""Device, precision and memory readings shared by training, generation and evaluation."""

from __future__ import annotations

import resource

import torch


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
