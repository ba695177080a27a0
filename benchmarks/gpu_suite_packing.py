"""The packed-vs-padded part of benchmarks/gpu_suite.py: Dolly's lengths, one (cap, method) per child process.

Why: at Dolly lengths a padded micro-batch of 4 is about half padding (issue 23), so the comparison that matters on a
GPU is the same examples, the same optimizer steps, padded to each micro-batch's longest example or packed end to
end (``--data.packing true``: one ``(1, L)`` row with ``cu_seqlens``, ``lit_adapter.data.packing``). The two sides
differ in that one flag (``packed``); everything else (model, method, weights, examples, step count) is shared.

The examples' lengths are the real ones: ``dolly_lengths.json`` holds the token count of every one of the 15,011
Dolly records (shared data, LLaMA tokenizer, Alpaca template, BOS and EOS; ``python benchmarks/gpu_suite_packing.py
--write_lengths train.pt val.pt`` rewrites it from a prepared, untruncated Dolly; capped at 512 and 1024, micro-batches
of 4 are 56% and 51% real tokens, the issue's figures), capped at the cell's context as truncation caps them. The tokens
themselves are random (random weights: time and memory do not depend on them). A job draws ``steps + timed_steps``
micro-batches of ``micro_batch_size`` examples in a seeded order, builds both sides from the same examples and
runs them interleaved (padded step, packed step, ...) through the Trainer's ``step()`` on one model and optimizer.
Per side: the median time of the timed steps, real tokens/s (the examples' tokens, padding excluded), examples/s,
the computed positions' share that is real, and the peak memory (CUDA ``max_memory_allocated``; CPU n/a).

Methods: Adapter v1, Adapter v2, LoRA, and QLoRA (LoRA over a bnb.nf4 base). Without packing in the checkout
(``lit_adapter.data.packing`` or ``GPT.forward``'s ``cu_seqlens`` missing) the packed side is a row with status
"skipped (no packing in this checkout)", never a silently unpacked run.

    python benchmarks/gpu_suite_packing.py '{"device": "cpu", "cap": 128, "method": "lora", "tiny": true}'
"""

from __future__ import annotations

import inspect
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_adapter.errors import looks_like_out_of_memory  # noqa: E402

LENGTHS = Path(__file__).resolve().parent / "dolly_lengths.json"
# suite method name -> (registered method, quantization of the base)
METHODS = {"adapter": ("adapter", None), "adapter_v2": ("adapter_v2", None), "lora": ("lora", None),
           "qlora": ("lora", "bnb.nf4")}
SIDES = ("padded", "packed")
NO_PACKING = "skipped (no packing in this checkout)"


def dolly_lengths(cap: int) -> List[int]:
    """Every Dolly example's token count, capped at ``cap`` (the context truncation cuts an example to)."""
    return [min(n, cap) for n in json.loads(LENGTHS.read_text())["lengths"]]


def packing_available() -> bool:
    """Whether this checkout packs: the batch format's module and the model's ``cu_seqlens`` argument."""
    from lit_adapter.model.gpt import GPT

    try:
        import lit_adapter.data.packing  # noqa: F401
    except ImportError:
        return False
    return "cu_seqlens" in inspect.signature(GPT.forward).parameters


def micro_batches(lengths: List[int], count: int, size: int, seed: int, vocab: int) -> List[List[Dict[str, Any]]]:
    """``count`` micro-batches of ``size`` examples drawn in a seeded order: 1-D ``input_ids``/``labels`` of random
    tokens with Dolly's lengths (labels = inputs: every token is a target, as a response-only mask would not change
    the compute)."""
    import torch

    order = random.Random(seed).sample(range(len(lengths)), count * size)
    g = torch.Generator().manual_seed(seed)
    examples = [torch.randint(0, vocab, (lengths[i],), generator=g) for i in order]
    return [[{"input_ids": ids, "labels": ids.clone()} for ids in examples[b * size:(b + 1) * size]]
            for b in range(count)]


def collate(side: str, examples: List[Dict[str, Any]], device) -> Dict[str, Any]:
    """One micro-batch of ``side``: padded to its longest example (pad labels ignored), or packed (one flag)."""
    if side == "packed":
        from lit_adapter.data.packing import collate_packed

        batch = collate_packed(examples)
    else:
        from lit_adapter.data.instructions import collate_instructions

        batch = collate_instructions(examples, pad_id=0)
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}


def measure(job: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Both sides of one (cap, method) job, interleaved step by step; one row per side."""
    import torch

    from lit_adapter.memory import Cell, build_random_model
    from lit_adapter.train.fabric_setup import make_fabric
    from lit_adapter.train.trainer import Trainer, method_optimizer

    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    device = torch.device(job["device"])
    method, quantize = METHODS[job["method"]]
    tiny = dict(n_layer=4, n_head=4, n_embd=64, intermediate_size=192, vocab_size=512, name="tiny-suite")
    cell = Cell(method=method, quantize=quantize, precision=job.get("precision", "32-true"), seq_len=job["cap"],
                micro_batch_size=job.get("micro_batch_size", 4), model_name=None if job.get("tiny") else "7B",
                config_overrides=tiny if job.get("tiny") else {}, device=job["device"])
    steps, timed = job.get("steps", 2), job.get("timed_steps", 3)
    batches = micro_batches(dolly_lengths(job["cap"]), steps + timed, cell.micro_batch_size, job.get("seed", 0),
                            cell.config().vocab_size)
    sides = [s for s in SIDES if s == "padded" or packing_available()]
    rows = {s: dict(cap=job["cap"], method=job["method"], side=s, status="ok") for s in SIDES}
    if "packed" not in sides:
        rows["packed"]["status"] = NO_PACKING
    # one model and optimizer for both sides (a 7B base twice would not fit beside its activations); each side's
    # Trainer draws its own micro-batches of the same examples
    torch.manual_seed(0)
    model = build_random_model(cell, device).train()
    optimizer = method_optimizer(model, cell.spec(), "adamw", lr=1e-4, weight_decay=0.0, betas=(0.9, 0.95))
    fabric = make_fabric(device.type, 1, precision=cell.precision)
    model, optimizer = fabric.setup(model, optimizer)
    trainers = {side: Trainer(fabric, model, optimizer, iter([collate(side, b, device) for b in batches]),
                              max_grad_norm=1.0) for side in sides}
    times = {s: [] for s in sides}
    peaks = {s: 0 for s in sides}
    for _ in range(steps + timed):  # interleaved: drifts in clock or load hit both sides alike
        for side in sides:
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            trainers[side].step()
            if device.type == "cuda":
                torch.cuda.synchronize()
                peaks[side] = max(peaks[side], torch.cuda.max_memory_allocated(device))
            times[side].append(time.perf_counter() - t0)
    real = sum(len(ex["input_ids"]) for b in batches[steps:] for ex in b)
    computed = {"padded": sum(len(b) * max(len(ex["input_ids"]) for ex in b) for b in batches[steps:]),
                "packed": real}
    for side in sides:
        step_s = statistics.median(times[side][steps:])
        rows[side].update(step_time_s=step_s, real_tokens_per_s=real / timed / step_s,
                          examples_per_s=cell.micro_batch_size / step_s, real_share=real / computed[side],
                          peak_bytes=peaks[side] if device.type == "cuda" else None)
    return [rows[s] for s in SIDES]


def add_ratios(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """``packed_vs_padded`` (real tokens/s, packed / padded) on the packed row when both sides ran."""
    by_side = {r["side"]: r for r in rows}
    padded, packed = by_side.get("padded", {}), by_side.get("packed", {})
    if padded.get("real_tokens_per_s") and packed.get("real_tokens_per_s"):
        packed["packed_vs_padded"] = packed["real_tokens_per_s"] / padded["real_tokens_per_s"]
    return rows


def run(job: Dict[str, Any], timeout_s: float) -> List[Dict[str, Any]]:
    """:func:`measure` in a child process (a fresh CUDA context and allocator per job); failures are statuses."""
    def failed(status: str, error: Optional[str] = None):
        return [dict(cap=job["cap"], method=job["method"], side=s, status=status, error=error) for s in SIDES]

    try:
        proc = subprocess.run([sys.executable, __file__, json.dumps(job)], capture_output=True, text=True,
                              timeout=timeout_s, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    except subprocess.TimeoutExpired:
        return failed("timeout")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("PACKING ")]
    if proc.returncode or not lines:
        last = (proc.stderr.strip().splitlines() or [""])[-1][:300]
        return failed("oom" if looks_like_out_of_memory(proc.stderr) else f"error: exit {proc.returncode}", last)
    return add_ratios(json.loads(lines[-1][len("PACKING "):]))


def write_lengths(prepared: List[Path]) -> None:
    """Rewrites ``dolly_lengths.json`` from an untruncated ``scripts/prepare_dolly.py`` run's ``train.pt`` and
    ``val.pt`` (``--max_seq_length`` above the longest record, 8,917 tokens)."""
    import torch

    lengths = [int(len(ex["input_ids"])) for path in prepared for ex in torch.load(path, weights_only=True)]
    LENGTHS.write_text(json.dumps({"source": "shared/data/dolly (all 15,011 records, train and validation splits of "
                                             "scripts/prepare_dolly.py), LLaMA tokenizer, Alpaca template, BOS + "
                                             "prompt + response + EOS, untruncated", "lengths": lengths},
                                  separators=(",", ":")) + "\n")


if __name__ == "__main__":
    if sys.argv[1] == "--write_lengths":
        write_lengths([Path(a) for a in sys.argv[2:]])
    else:
        print("PACKING " + json.dumps(measure(json.loads(sys.argv[1]))), flush=True)
