"""Forward + backward time and peak memory of the sparse attention patterns against dense attention.

For every context length it measures, with the AttentionConfig defaults (window 256, stride 128, fixed blocks of
128 with 16 summary tokens, shifted groups of 1/4 of the context):

* ``dense (SDPA causal)``: ``F.scaled_dot_product_attention(is_causal=True)``, PyTorch's fused flash kernel;
* each pattern's block-sparse kernel (``lit_adapter.model.attention``);
* each pattern as a dense SDPA with its explicit boolean mask (the test reference, what a mask-only
  implementation would cost).

Each case runs in a fresh subprocess: one warm-up step, then ``--repeats`` timed forward + backward steps
(median and best reported; the best is the least disturbed by other load). Before that a 256-token step loads
the kernels' code and starts the thread pool. Memory is the growth of the peak resident set size: ``ru_maxrss``
after the steps minus the resident set size just before the first full-length step (inputs already allocated),
so it covers activations, masks, temporaries and gradients. Prints a Markdown table.

``--memory`` adds one more forward + backward step per case, after the timed ones and after the RSS reading,
under :class:`lit_adapter.memory.AllocatorPeak`: the peak of live bytes that the c10 CPU allocator hands out during
that step, minus what was live at its start (the inputs and the upstream gradient, allocated before). It counts
every tensor the step creates: saved activations, masks, gathered tiles, temporaries of forward and backward, and
the q/k/v gradients; unlike RSS it does not depend on what the allocator and the OS keep mapped, so it is exact
and repeatable. It leaves out memory outside c10 (oneDNN scratch, the kernels' per-thread buffers if not c10).

    python benchmarks/sparse_attention.py                        # the table in docs/sparse_attention.md
    python benchmarks/sparse_attention.py --contexts 1024 2048 --repeats 2
    python benchmarks/sparse_attention.py --contexts 4096 8192 16384 --repeats 1 --no-masked --memory
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

PATTERNS = ("local", "strided", "fixed", "shifted")


def current_rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def run_case(case: dict) -> dict:
    """One measurement, in this process."""
    import torch
    import torch.nn.functional as F

    from lit_adapter.model.attention import AttentionConfig, build_attention_kernel

    torch.set_num_threads(case["threads"])
    torch.manual_seed(0)
    T, nh = case["T"], case["heads"]
    kernel = None
    if case["pattern"] != "dense":
        cfg = AttentionConfig(pattern=case["pattern"]).resolve(T)
        kernel = build_attention_kernel(cfg, num_heads=nh)

    def step(q, k, v, grad):
        if case["impl"] == "sdpa-causal":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif case["impl"] == "sparse":
            y = kernel(q, k, v)
        else:  # the pattern's explicit mask, built inside the step like a mask-based implementation would
            y = kernel.reference(q, k, v)
        y.backward(grad)

    def inputs(length):
        shape = (case["batch"], nh, length, case["head_size"])
        return [torch.randn(shape, requires_grad=True) for _ in range(3)] + [torch.randn(shape)]

    # A short sequence first loads the kernels' code and starts the thread pool, so that neither counts as memory.
    step(*inputs(256))
    tensors = inputs(T)
    baseline = current_rss_kib()
    times = []
    for _ in range(1 + case["repeats"]):
        for t in tensors[:3]:
            t.grad = None
        start = time.perf_counter()
        step(*tensors)
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    scores = kernel.last_scored_elements if case["impl"] == "sparse" else T * T
    result = dict(case, seconds=statistics.median(times[1:]), best=min(times[1:]),
                  peak_mib=max(0, peak - baseline) / 1024, scores_per_row=scores / T)
    if case.get("memory"):
        result["alloc_mib"] = allocator_peak_growth(step, tensors) / 2**20
    return result


def allocator_peak_growth(step, tensors) -> int:
    """Peak live c10 CPU allocator bytes of one forward + backward step, beyond those live when it starts."""
    from lit_adapter.memory import AllocatorPeak

    for t in tensors[:3]:
        t.grad = None  # the previous step's gradients are freed before the window opens
    with AllocatorPeak() as tracker:
        tracker.mark()
        step(*tensors)
    return tracker.peak_bytes - tracker.at_mark_bytes


def machine() -> dict:
    import torch

    model = platform.processor() or "unknown"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return dict(cpu=model, cores=os.cpu_count(), torch=torch.__version__, date=date.today().isoformat(),
                commit=commit)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--patterns", nargs="+", default=list(PATTERNS), choices=PATTERNS)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per case; 1 gives repeatable numbers on a machine shared with other work")
    parser.add_argument("--no-masked", action="store_true", help="skip the dense-with-mask references")
    parser.add_argument("--memory", action="store_true",
                        help="also measure each case's allocator peak of live tensor bytes (one profiled step)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_case(json.loads(args.worker))))
        return

    info = machine()
    print(f"CPU: {info['cpu']} ({info['cores']} cores, {args.threads} threads), torch {info['torch']}, "
          f"{info['date']}, commit {info['commit']}")
    print(f"B={args.batch}, heads={args.heads}, head size={args.head_size}, float32, forward + backward, "
          f"median of {args.repeats} after 1 warm-up\n")
    common = dict(batch=args.batch, heads=args.heads, head_size=args.head_size, repeats=args.repeats,
                  threads=args.threads, memory=args.memory)
    rows = []
    for T in args.contexts:
        cases = [dict(pattern="dense", impl="sdpa-causal")]
        for pattern in args.patterns:
            cases.append(dict(pattern=pattern, impl="sparse"))
            if not args.no_masked:
                cases.append(dict(pattern=pattern, impl="masked"))
        for case in cases:
            case = dict(common, T=T, **case)
            proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(case)], capture_output=True,
                                  text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            if proc.returncode:
                raise SystemExit(f"case {case} failed:\n{proc.stderr}")
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"  measured {case['pattern']:>7} {case['impl']:<11} T={T}: {rows[-1]['seconds']:.3f} s",
                  file=sys.stderr, flush=True)

    dense = {r["T"]: r for r in rows if r["impl"] == "sdpa-causal"}
    names = {"sdpa-causal": "dense (SDPA causal)", "sparse": "{} (block-sparse)", "masked": "{} (dense + mask)"}
    memory = ("| allocator peak MiB | vs dense " if args.memory else "", "---:|---:|" if args.memory else "")
    print("| T | attention | fwd+bwd ms, median | best | vs dense SDPA (median) | peak RSS growth MiB "
          f"{memory[0]}| scores per query |")
    print(f"|---:|---|---:|---:|---:|---:|{memory[1]}---:|")
    for r in rows:
        name = names[r["impl"]].format(r["pattern"])
        alloc = ""
        if args.memory:
            alloc = f" {r['alloc_mib']:.1f} | {r['alloc_mib'] / dense[r['T']]['alloc_mib']:.2f}x |"
        print(f"| {r['T']} | {name} | {1000 * r['seconds']:.1f} | {1000 * r['best']:.1f} | "
              f"{dense[r['T']]['seconds'] / r['seconds']:.2f}x | {r['peak_mib']:.0f} |{alloc} "
              f"{r['scores_per_row']:.0f} |")


if __name__ == "__main__":
    main()
