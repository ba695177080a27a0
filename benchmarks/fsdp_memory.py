"""Per-process peak memory of a training step on 1 process against N under ``--fabric.strategy fsdp``, beside the
estimator's figure for one process of N (``estimate_memory(..., shards=N)``): the measured CPU figures of
docs/distributed.md.

Why a script of its own: the sharding only shows in memory when the weights, gradients and optimizer state are
larger than the process's framework overhead, so it measures a random-weight stories15M full fine-tune (15M
parameters: 0.24 GB of float32 weights, gradients and AdamW moments), and it reads the c10 CPU allocator's live
bytes (:class:`lit_adapter.memory.measure.AllocatorPeak`, the estimator's quantity) next to the resident set size.

    python benchmarks/fsdp_memory.py --devices 1
    python benchmarks/fsdp_memory.py --devices 2      # Fabric starts the second process itself (gloo)

The model is random weights built in the process, unless ``--checkpoint_dir`` names a checkpoint folder (written
once, in a process of its own so that its memory is not counted, by ``--write_checkpoint DIR``): then it is loaded
as a run loads it (``methods.prepare_model``), which is what the peak RSS of a real run shows.
``peak_rss_at_setup_gb`` is the high-water mark once the model is built and set up (sharded), before any step.
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
from lit_adapter.memory.saved import precision_dtype  # noqa: E402
from lit_adapter.train.fabric_setup import make_fabric  # noqa: E402
from lit_adapter.train.trainer import Trainer, method_optimizer  # noqa: E402
from lit_adapter.tuners import registry as methods  # noqa: E402


class CudaPeak:
    """``max_memory_allocated`` over the steps, with :class:`AllocatorPeak`'s interface (the CUDA counterpart)."""

    peak_bytes = 0

    def __enter__(self) -> "CudaPeak":
        return self

    def mark(self) -> None:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    def __exit__(self, *exc) -> None:
        torch.cuda.synchronize()
        self.peak_bytes = torch.cuda.max_memory_allocated()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--method", default="full")
    parser.add_argument("--model_name", default="stories15M")
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--accelerator", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--quantize", default=None, help="bnb.nf4 etc.: QLoRA's base (sharded QLoRA under fsdp)")
    parser.add_argument("--activation_checkpointing", action="store_true")
    parser.add_argument("--checkpoint_dir", type=Path, default=None)
    parser.add_argument("--write_checkpoint", type=Path, default=None)
    args = parser.parse_args()
    on_cpu = args.accelerator == "cpu"
    if on_cpu:
        torch.set_num_threads(1)
    cell = Cell(method=args.method, model_name=args.model_name, seq_len=args.seq_len, micro_batch_size=1,
                precision=args.precision, quantize=args.quantize,
                activation_checkpointing=args.activation_checkpointing)
    if args.write_checkpoint is not None:
        write_checkpoint(Cell(method="full", model_name=args.model_name), args.write_checkpoint)
        return
    sharded = args.devices > 1
    fabric = make_fabric(args.accelerator, args.devices, "fsdp" if sharded else "auto", args.precision)
    fabric.launch()
    torch.manual_seed(0)
    dtype = precision_dtype(args.precision)
    with (AllocatorPeak() if on_cpu else CudaPeak()) as tracker:
        spec = cell.spec()
        if args.checkpoint_dir is None:
            model = build_random_model(cell, fabric.device, quant_storage=dtype if sharded else None)
        else:
            model = methods.prepare_model(spec, cell.config(), args.checkpoint_dir, fabric.device, dtype,
                                          sharded=sharded)
            methods.mark_trainable(model, spec)
        model.gradient_checkpointing = args.activation_checkpointing
        if sharded:
            model = fabric.setup_module(model)
            optimizer = fabric.setup_optimizers(method_optimizer(methods.unwrap(model), spec, "adamw", 1e-4, 0.0,
                                                                 (0.9, 0.95)))
        else:
            model, optimizer = fabric.setup(model, method_optimizer(model, spec, "adamw", 1e-4, 0.0, (0.9, 0.95)))
        batch = torch.randint(0, cell.config().vocab_size, (1, cell.seq_len), generator=torch.Generator().manual_seed(0))
        trainer = Trainer(fabric, model, optimizer, itertools.repeat({"input_ids": batch, "labels": batch}))
        tracker.mark()  # the steps' peak, the model and its shards included
        setup_rss = peak_rss_bytes()  # the high-water mark of building, loading and sharding the model
        for _ in range(2):  # the first step creates the optimizer state
            trainer.step()
    estimate = estimate_memory(cell.config(), spec, 1, cell.seq_len, args.precision, args.activation_checkpointing,
                               device_type=args.accelerator, shards=args.devices)
    row = {"rank": fabric.global_rank, "processes": args.devices, "method": args.method, "model": args.model_name,
           "quantize": args.quantize, "accelerator": args.accelerator, "precision": args.precision,
           "seq_len": args.seq_len, "checkpointing": args.activation_checkpointing,
           "measured_peak_gb": round(tracker.peak_bytes / 1e9, 4), "estimate_gb": round(estimate["peak_gb"], 4),
           "ratio": round(tracker.peak_bytes / estimate["peak_bytes"], 3),
           "peak_rss_gb": round(peak_rss_bytes() / 1e9, 3),
           "peak_rss_at_setup_gb": round(setup_rss / 1e9, 3), "from_checkpoint": args.checkpoint_dir is not None,
           "pid": os.getpid()}
    print(json.dumps(row), flush=True)
    fabric.barrier()


def write_checkpoint(cell: Cell, folder: Path) -> None:
    """Random base weights of ``cell``'s model as a checkpoint folder (weights and config; a tied head once)."""
    from lit_adapter.checkpoint import save_state_dict

    torch.manual_seed(0)
    model = build_random_model(cell, torch.device("cpu"))
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    if cell.config().tie_embeddings:
        tensors.pop("lm_head.weight", None)
    save_state_dict(tensors, folder / "lit_model.safetensors")
    cell.config().save(folder / "model_config.json")


if __name__ == "__main__":
    main()
