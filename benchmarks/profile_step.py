"""Where a fine-tuning step's CPU time goes: ours against HF transformers + PEFT, by ATen op (torch.profiler).

Builds both sides exactly as ``finetune_throughput.py`` does (same shape, batch, method settings, AdamW,
clipping), runs 2 warmup steps each, then profiles ``--steps`` steps of each and prints the ops with the most self
CPU time. It reproduces docs/throughput.md's profile table (measured with these same steps in an ad-hoc
script before this one was added).

    python benchmarks/profile_step.py --size stories15M --method lora
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import finetune_throughput as bench  # noqa: E402

from lit_adapter.errors import UserError, run_cli  # noqa: E402


def main(size: str = "stories15M", method: str = "lora", seq_len: int = 256, micro_batch_size: int = 4,
         threads: int = 2, steps: int = 3, our_loss: str = "cross_entropy", rows: int = 22) -> None:
    """Prints a profiler table per framework.

    Args:
        size: Model configuration (Config.from_name), random weights.
        method: lora, adapter or adapter_v2.
        seq_len: Tokens per sequence.
        micro_batch_size: Sequences per step.
        threads: torch.set_num_threads.
        steps: Profiled steps per framework.
        our_loss: Our loss, as --train.loss.
        rows: Ops shown per table.
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    if method not in bench.METHODS:
        raise UserError(f"unknown method {method!r}; choose from {', '.join(bench.METHODS)}")
    torch.set_num_threads(threads)
    job = dict(method=method, size=size, seq_len=seq_len, micro_batch_size=micro_batch_size, precision="32-true",
               device="cpu", our_loss=our_loss, threads=threads)
    sides = {framework: bench._Side(job, framework) for framework in ("ours", "hf")}
    batch = bench._token_batch(job, sides["ours"].model.config.vocab_size)
    for side in sides.values():
        for _ in range(2):
            side.step(batch)
    for framework, side in sides.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                side.step(batch)
        print(f"===== {framework}: {steps} steps of {method} on {size}, {micro_batch_size} x {seq_len} tokens")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


if __name__ == "__main__":
    from jsonargparse import CLI

    run_cli(CLI, main, as_positional=False)
