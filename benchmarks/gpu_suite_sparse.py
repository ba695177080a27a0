"""The sparse-attention part of benchmarks/gpu_suite.py: one context length per child process.

For dense causal SDPA (``F.scaled_dot_product_attention(is_causal=True)``, the baseline) and each pattern of
``lit_adapter.model.attention`` with the ``AttentionConfig`` defaults (``AttentionConfig(pattern=...).resolve(T)``,
``build_attention_kernel(cfg, num_heads=...)``, as benchmarks/sparse_attention.py and tests/test_attention.py build
them):

* equality, in float32 at EQUALITY_SHAPE: the block-sparse output and its q/k/v gradients against the kernel's own
  mask reference (``SparseAttention.reference``: dense SDPA under ``dense_mask``, what the tests compare with), as
  max |sparse - reference| / max |reference| per tensor, equal when all four are within TOLERANCE. float32 because
  bf16's rounding (~4e-3 relative) would hide a wrong mask entry among many keys; TF32 stays off;
* forward + backward time (median of ``repeats`` after one warm-up, synchronised on CUDA) and peak memory (what the
  step allocates beyond its inputs: CUDA ``max_memory_allocated``; CPU the c10 allocator's peak, via
  ``memory.AllocatorPeak``) in the suite's dtype at the timing shape (7B's attention: 32 heads of 128).

An out-of-memory pattern is a row with status "oom"; the next one still runs.

    python benchmarks/gpu_suite_sparse.py '{"device": "cpu", "T": 512, "shape": [4, 32], "repeats": 2,
                                            "threads": 1, "dtype": "float32"}'
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_adapter.errors import looks_like_out_of_memory  # noqa: E402

PATTERNS = ("local", "strided", "fixed", "shifted")
EQUALITY_SHAPE = (4, 64)  # heads x head size of the float32 check (its masked reference is quadratic in T)
TOLERANCE = 1e-4  # observed on CPU at T <= 1024: ~5e-7


def measure(job: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Dense SDPA and the four patterns at ``job["T"]`` tokens, in this process."""
    import torch
    import torch.nn.functional as F

    from lit_adapter.model.attention import AttentionConfig, build_attention_kernel
    from lit_adapter.memory import AllocatorPeak

    device, T = torch.device(job["device"]), job["T"]
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else lambda: None
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 is float32 in the equality check (the default as well)
    torch.set_num_threads(job.get("threads") or torch.get_num_threads())
    torch.manual_seed(0)

    def inputs(heads, head_size, dtype):  # q, k, v and the output's gradient
        return [torch.randn(1, heads, T, head_size, device=device, dtype=dtype, requires_grad=i < 3) for i in range(4)]

    def fwd_bwd(fn, q, k, v, dy):
        out = fn(q, k, v)
        return (out, *torch.autograd.grad(out, (q, k, v), dy))

    def peak_bytes(step):  # what the step allocates beyond its inputs, at its peak
        if not cuda:
            with AllocatorPeak() as tracker:
                tracker.mark()
                step()
            return tracker.peak_bytes - tracker.at_mark_bytes
        sync()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        sync()
        return torch.cuda.max_memory_allocated(device) - base

    rows = []
    for pattern in ("dense",) + PATTERNS:
        row: Dict[str, Any] = dict(T=T, attention=pattern, dtype=job["dtype"], status="ok")
        try:
            if pattern == "dense":
                fn = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
            else:
                cfg = AttentionConfig(pattern=pattern).resolve(T)
                kernel = build_attention_kernel(cfg, num_heads=EQUALITY_SHAPE[0])
                q, k, v, dy = inputs(*EQUALITY_SHAPE, torch.float32)
                pairs = zip(("out", "dq", "dk", "dv"), fwd_bwd(kernel, q, k, v, dy),
                            fwd_bwd(kernel.reference, q, k, v, dy))
                errors = {name: ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item() for name, a, b in pairs}
                row.update(max_rel_err=errors, equal=all(e <= TOLERANCE for e in errors.values()))
                del q, k, v, dy
                fn = build_attention_kernel(cfg, num_heads=job["shape"][0])  # shifted's halves depend on the heads
            tensors = inputs(*job["shape"], getattr(torch, job["dtype"]))
            times = []
            for _ in range(1 + job["repeats"]):  # the first is a warm-up
                sync()
                t0 = time.perf_counter()
                fwd_bwd(fn, *tensors)
                sync()
                times.append(time.perf_counter() - t0)
            row["ms"] = 1000 * statistics.median(times[1:])
            row["peak_mib"] = peak_bytes(lambda: fwd_bwd(fn, *tensors)) / 2**20
        except Exception as err:  # noqa: BLE001 - a result, and the next pattern still runs
            oom = looks_like_out_of_memory(f"{type(err).__name__} {err}")
            row["status"] = "oom" if oom else f"error: {type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"
            if cuda:
                torch.cuda.empty_cache()
        rows.append(row)
    return rows


def run(job: Dict[str, Any], timeout_s: float) -> List[Dict[str, Any]]:
    """:func:`measure` in a child process, with ``vs_dense`` (dense time / this time) added to every row."""
    def failed(status):
        return [dict(T=job["T"], attention=name, status=status) for name in ("dense",) + PATTERNS]

    try:
        proc = subprocess.run([sys.executable, __file__, json.dumps(job)], capture_output=True, text=True,
                              timeout=timeout_s, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    except subprocess.TimeoutExpired:
        return failed("timeout")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("SPARSE ")]
    if proc.returncode or not lines:
        return failed(f"error: exit {proc.returncode}: {(proc.stderr.strip().splitlines() or [''])[-1][:300]}")
    rows = json.loads(lines[-1][len("SPARSE "):])
    dense = next((r.get("ms") for r in rows if r["attention"] == "dense"), None)
    for row in rows:
        row["vs_dense"] = dense / row["ms"] if dense and row.get("ms") else None
    return rows


if __name__ == "__main__":
    print("SPARSE " + json.dumps(measure(json.loads(sys.argv[1]))), flush=True)
