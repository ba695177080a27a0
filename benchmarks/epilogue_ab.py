"""Adapter v2's fused epilogue (lit_adapter.tuners.scale_bias) against the unfused autograd form, our model only.

One process, one model, alternating steps with the fused path on and off (so load hits both alike); reports the
median of per-pair time ratios and the CPU allocator peak of one step each way.

    python benchmarks/epilogue_ab.py --size stories15M --steps 10
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import finetune_throughput as bench  # noqa: E402

from lit_adapter.errors import run_cli  # noqa: E402


def main(size: str = "stories15M", seq_len: int = 256, micro_batch_size: int = 4, threads: int = 2,
         steps: int = 10, warmup: int = 2) -> None:
    """Prints unfused / fused step time per pair (median, quartiles) and both allocator peaks.

    Args:
        size: Model configuration (Config.from_name), random weights.
        seq_len: Tokens per sequence.
        micro_batch_size: Sequences per step.
        threads: torch.set_num_threads.
        steps: Timed steps each way.
        warmup: Untimed steps each way.
    """
    import os

    import torch

    from lit_adapter.memory import AllocatorPeak
    from lit_adapter.tuners import adapter_v2

    torch.set_num_threads(threads)
    print(f"load average at start {os.getloadavg()}")
    job = dict(method="adapter_v2", size=size, seq_len=seq_len, micro_batch_size=micro_batch_size,
               precision="32-true", device="cpu", our_loss="cross_entropy", threads=threads)
    side = bench._Side(job, "ours")
    batch = bench._token_batch(job, side.model.config.vocab_size)
    default = adapter_v2.AdapterV2Linear.fused_epilogue

    def step(use_fused: bool) -> float:
        adapter_v2.AdapterV2Linear.fused_epilogue = use_fused
        try:
            return side.step(batch)
        finally:
            adapter_v2.AdapterV2Linear.fused_epilogue = default

    for _ in range(warmup):
        step(True), step(False)
    times = {True: [], False: []}
    for i in range(steps):
        for mode in ((True, False) if i % 2 == 0 else (False, True)):
            times[mode].append(step(mode))
    ratios = [u / f for f, u in zip(times[True], times[False])]
    peaks = {}
    for mode in (True, False):
        with AllocatorPeak() as tracker:
            tracker.mark()
            step(mode)
        peaks[mode] = tracker.peak_bytes / 1e9
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    print(f"{size} adapter_v2, {steps} pairs: unfused / fused step time median {statistics.median(ratios):.3f} "
          f"(quartiles {q1:.3f}-{q3:.3f}); fused {statistics.median(times[True]):.3f} s, unfused "
          f"{statistics.median(times[False]):.3f} s; allocator peak above the mark: fused {peaks[True]:.3f} GB, "
          f"unfused {peaks[False]:.3f} GB")
    print(f"load average at end {os.getloadavg()}")


if __name__ == "__main__":
    from jsonargparse import CLI

    run_cli(CLI, main, as_positional=False)
