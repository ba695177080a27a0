"""Per-process peak memory of a training step on 1 process against N under ``--fabric.strategy fsdp``, beside the
estimator's figure for one process of N (``estimate_memory(..., shards=N)``): the measured CPU figures of
docs/distributed.md.

Why a script of its own: the sharding only shows in memory when the weights, gradients and optimizer state are
larger than the process's framework overhead, so it measures a random-weight stories15M full fine-tune (15M
parameters: 0.24 GB of float32 weights, gradients and AdamW moments), and it reads the c10 CPU allocator's live
bytes (:class:`lit_adapter.memory.measure.AllocatorPeak`, the estimator's quantity) next to the resident set size.

    python benchmarks/fsdp_memory.py --devices 1
    python benchmarks/fsdp_memory.py --devices 2      # Fabric starts the second process itself (gloo)
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from lit_adapter.memory.estimate import estimate_memory  # noqa: E402
from lit_adapter.memory.measure import AllocatorPeak, Cell, build_random_model, peak_rss_bytes  # noqa: E402
from lit_adapter.train.fabric_setup import make_fabric  # noqa: E402
from lit_adapter.train.trainer import Trainer, method_optimizer  # noqa: E402
from lit_adapter.tuners import registry as methods  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--method", default="full")
    parser.add_argument("--model_name", default="stories15M")
    parser.add_argument("--seq_len", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cell = Cell(method=args.method, model_name=args.model_name, seq_len=args.seq_len, micro_batch_size=1)
    fabric = make_fabric("cpu", args.devices, "fsdp" if args.devices > 1 else "auto", "32-true")
    fabric.launch()
    torch.manual_seed(0)
    with AllocatorPeak() as tracker:
        model = build_random_model(cell, torch.device("cpu"))
        spec = cell.spec()
        if args.devices > 1:
            model = fabric.setup_module(model)
            optimizer = fabric.setup_optimizers(method_optimizer(methods.unwrap(model), spec, "adamw", 1e-4, 0.0,
                                                                 (0.9, 0.95)))
        else:
            model, optimizer = fabric.setup(model, method_optimizer(model, spec, "adamw", 1e-4, 0.0, (0.9, 0.95)))
        batch = torch.randint(0, cell.config().vocab_size, (1, cell.seq_len), generator=torch.Generator().manual_seed(0))
        trainer = Trainer(fabric, model, optimizer, itertools.repeat({"input_ids": batch, "labels": batch}))
        AllocatorPeak.mark()  # the steps' peak, the model and its shards included
        for _ in range(2):  # the first step creates the optimizer state
            trainer.step()
    estimate = estimate_memory(cell.config(), spec, 1, cell.seq_len, "32-true", device_type="cpu",
                               shards=args.devices)
    row = {"rank": fabric.global_rank, "processes": args.devices, "method": args.method, "model": args.model_name,
           "measured_peak_gb": round(tracker.peak_bytes / 1e9, 4), "estimate_gb": round(estimate["peak_gb"], 4),
           "ratio": round(tracker.peak_bytes / estimate["peak_bytes"], 3),
           "peak_rss_gb": round(peak_rss_bytes() / 1e9, 3), "pid": os.getpid()}
    print(json.dumps(row), flush=True)
    fabric.barrier()


if __name__ == "__main__":
    main()
