"""Fine-tuning throughput and peak memory: lit-adapter against HF transformers + PEFT on the same work.

Both sides train the same LLaMA shape from the same random token batch with the same micro-batch, sequence length,
thread count, AdamW settings and gradient clipping:

* ours: ``memory.build_random_model`` (``methods.prepare_model``'s model on random weights) set up by Fabric, and
  ``trainer.Trainer.step``, the step a run executes (forward and loss, backward, the finite checks, clipping, AdamW
  over the method's parameter groups, the scheduler if any);
* HF: ``LlamaForCausalLM`` (SDPA attention) wrapped by ``peft.get_peft_model`` with ``LoraConfig`` (same rank,
  alpha, dropout and q/v targets as our LoRA defaults) or ``AdaptionPromptConfig`` (LLaMA-Adapter v1: the same
  prompt length and adapted layers as our adapter defaults), its loss from ``labels=`` as users call it.

PEFT has no LLaMA-Adapter v2. For the v2 row the HF side is PEFT's adaption prompt plus v2's other parts added by
hand (``hf_peft.add_v2_parts``, shared with ``dolly_throughput.py``): every linear of every layer and the head wrapped as
``scale * (linear(x) + bias)``, and the RMSNorm weights unfrozen, so both sides train the same parameter set
(PEFT's adaption prompt applies ``o_proj`` to the prompt output separately, which costs it one extra projection). Every run is a fresh process; warmup steps are excluded and the
median of the timed steps is reported. The machine may be shared, so the framework order alternates over
``--rounds`` and the median over rounds is used. Peak memory is taken in one extra step under the CPU allocator
profiler (``memory.AllocatorPeak``; CUDA: ``max_memory_allocated``).

    python benchmarks/finetune_throughput.py --sizes stories15M,stories260K --methods lora,adapter,adapter_v2
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # hf_peft, also when loaded by path (tests)

import hf_peft  # noqa: E402
from hf_peft import METHODS  # noqa: E402
from lit_adapter.errors import UserError, run_cli  # noqa: E402


def _ours(job: Dict[str, Any]):
    """Our model on random weights (``memory.build_random_model``: what ``methods.prepare_model`` builds) and a
    :class:`~lit_adapter.train.trainer.Trainer` around it, set up by Fabric as a run is: its ``step`` is what is timed."""
    import torch

    from lit_adapter.train.fabric_setup import make_fabric
    from lit_adapter.memory import Cell, build_random_model
    from lit_adapter.train.trainer import Trainer, method_optimizer

    cell = Cell(method=job["method"], model_name=job["size"], seq_len=job["seq_len"],
                micro_batch_size=job["micro_batch_size"], precision=job["precision"], device=job["device"])
    model = build_random_model(cell, torch.device(job["device"]))
    model.train()
    if job.get("compile"):
        _compile(model, "ours")  # before Fabric wraps it, as --train.compile does
    # the engine's AdamW settings over the method's parameter groups, as the HF side's make_optimizer
    optimizer = method_optimizer(model, cell.spec(), "adamw", lr=1e-3, weight_decay=0.02, betas=(0.9, 0.95))
    fabric = make_fabric(job["device"], precision=job["precision"])
    model, optimizer = fabric.setup(model, optimizer)
    return Trainer(fabric, model, optimizer, batches=(), loss=job["our_loss"], max_grad_norm=1.0)  # fed by _Side


def _hf(job: Dict[str, Any]):
    """HF LlamaForCausalLM + PEFT, configured like our method (``hf_peft.peft_model``)."""
    from lit_adapter.model.config import Config
    from lit_adapter.memory import precision_dtype

    model = hf_peft.peft_model(Config.from_name(job["size"]), job["method"], job["device"],
                               precision_dtype(job["precision"]), job["seq_len"])
    model.train()

    def forward_loss(batch):
        return model(input_ids=batch, labels=batch).loss

    return model, forward_loss


def _compile(model, framework: str) -> None:
    """torch.compile each decoder layer, on both sides alike (ours: ``--train.compile true``'s compile_blocks)."""
    from lit_adapter.runtime import compile_blocks

    if framework == "ours":
        compile_blocks(model, dynamic=False)
        return
    for layer in hf_peft.base_llama(model).model.layers:
        layer.compile(dynamic=False)


class _Side:
    """One framework's model, trainable tensors and optimizer, and its timed training step: ours is
    ``Trainer.step`` (what a run executes, Fabric included), HF's the forward with ``labels=``, backward, clipping
    and AdamW, as PEFT users write it."""

    def __init__(self, job: Dict[str, Any], framework: str) -> None:
        import torch

        from lit_adapter.memory import make_optimizer

        torch.manual_seed(0)
        self.device = job["device"]
        self.trainer, self._batch = None, None
        if framework == "ours":
            self.trainer = _ours(job)
            self.model, self.optimizer = self.trainer.model, self.trainer.optimizer
            self.trainable = self.trainer.trainable
        else:
            self.model, self.forward_loss = _hf(job)
            self.trainable = [p for p in self.model.parameters() if p.requires_grad]
            self.optimizer = make_optimizer(self.trainable, "adamw")
            if job.get("compile"):
                _compile(self.model, framework)

    def step(self, batch) -> float:
        import torch

        t0 = time.perf_counter()
        if self.trainer is not None:
            if batch is not self._batch:  # next-token targets of the batch itself, as HF's labels=batch
                self._batch = batch
                self.trainer.batches = itertools.repeat({"input_ids": batch, "labels": batch})
            self.trainer.step()
        else:
            self.forward_loss(batch).backward()
            torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if self.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0


def _token_batch(job: Dict[str, Any], vocab_size: int):
    import torch

    return torch.randint(0, vocab_size, (job["micro_batch_size"], job["seq_len"]),
                         generator=torch.Generator().manual_seed(1234)).to(job["device"])


def worker(job: Dict[str, Any]) -> Dict[str, Any]:
    import torch

    from lit_adapter.memory import AllocatorPeak

    torch.set_num_threads(job["threads"])
    side = _Side(job, job["framework"])
    batch = _token_batch(job, side.model.config.vocab_size)
    for _ in range(job["warmup"]):
        side.step(batch)
    times = [side.step(batch) for _ in range(job["steps"])]
    if job["device"] == "cuda":
        torch.cuda.reset_peak_memory_stats()
        side.step(batch)
        peak = torch.cuda.max_memory_allocated()
    else:
        with AllocatorPeak() as tracker:
            tracker.mark()
            side.step(batch)
        # live bytes at the mark (weights, optimizer state) were allocated before profiling: add them
        peak = tracker.peak_bytes + _live_bytes(side.model, side.optimizer)
    median = statistics.median(times)
    return {"step_times_s": times, "median_step_s": median,
            "tokens_per_s": job["micro_batch_size"] * job["seq_len"] / median, "peak_bytes": peak,
            "trainable_params": sum(p.numel() for p in side.trainable)}


COMPILED_PAIRS = (("ours_compiled", "hf_compiled"), ("ours_compiled", "hf"), ("ours_compiled", "ours"),
                  ("hf_compiled", "hf"))
"""With --compile: (a, b) pairs whose step-time ratio b / a (a's throughput over b's) is reported."""


def interleaved_worker(job: Dict[str, Any]) -> Dict[str, Any]:
    """Both frameworks in one process, alternating steps: contention on a shared machine hits both alike.

    Returns each framework's step times and, per adjacent pair of steps, HF's step time over ours (ours / HF in
    throughput); no memory is measured here. With ``compile`` four sides take turns (ours and HF, eager and
    compiled) and the ``COMPILED_PAIRS`` ratios come too.
    """
    import torch

    from lit_adapter.model import flops

    torch.set_num_threads(job["threads"])
    names = ["ours", "hf"] + (["ours_compiled", "hf_compiled"] if job.get("compile") else [])
    sides = {name: _Side(dict(job, compile=name.endswith("_compiled")), name.split("_")[0]) for name in names}
    config = sides["ours"].model.config
    batch = _token_batch(job, config.vocab_size)
    rows = job["micro_batch_size"] * job["seq_len"]
    rate_before = flops.measure_matmul_rate(config, rows)
    first = {name: side.step(batch) for name, side in sides.items()}  # compilation, if any, is here
    for _ in range(job["warmup"] - 1):
        for side in sides.values():
            side.step(batch)
    times: Dict[str, List[float]] = {name: [] for name in names}
    for i in range(job["steps"]):
        order = names[i % len(names):] + names[:i % len(names)]
        for name in (order if i % 2 == 0 else order[::-1]):
            times[name].append(sides[name].step(batch))
    rate_after = flops.measure_matmul_rate(config, rows)
    step = flops.step_flops(config, job["seq_len"], job["micro_batch_size"],
                            backward_from=flops.first_backward_layer(sides["ours"].model))
    out = {"ours_step_times_s": times["ours"], "hf_step_times_s": times["hf"],
           "pair_ratios": [h / o for o, h in zip(times["ours"], times["hf"])],
           "first_step_s": first, "step_flops": step.total,
           "matmul_rate": {"model_weighted": (rate_before.model_weighted + rate_after.model_weighted) / 2,
                           "peak": max(rate_before.peak, rate_after.peak), "before": rate_before.model_weighted,
                           "after": rate_after.model_weighted, "by_shape_after": rate_after.by_shape}}
    if job.get("compile"):
        out["step_times_s"] = times
        out["compiled_pair_ratios"] = {f"{a}/{b}": [tb / ta for ta, tb in zip(times[a], times[b])]
                                       for a, b in COMPILED_PAIRS}
    return out


def _live_bytes(model, optimizer) -> int:
    """Bytes of parameters, buffers and optimizer state (each storage once)."""
    import torch

    storages = {}
    tensors = list(model.parameters()) + list(model.buffers())
    for state in optimizer.state.values():
        tensors += [v for v in state.values() if torch.is_tensor(v)]
    for t in tensors:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def run_job(job: Dict[str, Any], timeout_s: float, mode: str = "--worker") -> Dict[str, Any]:
    return hf_peft.run_worker(__file__, mode, job, timeout_s)


def main(
    sizes: str = "stories15M,stories260K",
    methods: str = "lora,adapter,adapter_v2",
    seq_len: int = 256,
    micro_batch_size: int = 4,
    precision: str = "32-true",
    threads: int = 2,
    warmup: int = 2,
    steps: int = 5,
    rounds: int = 2,
    device: str = "cpu",
    timeout_s: float = 1200.0,
    our_loss: str = "cross_entropy",
    interleaved: bool = False,
    compile: bool = False,
    out_json: Optional[Path] = None,
) -> List[Dict[str, Any]]:
    """Tokens/s and peak memory of our fine-tuning against HF transformers + PEFT.

    Args:
        sizes: Comma-separated model configurations (Config.from_name), random weights.
        methods: Comma-separated: lora, adapter (LLaMA-Adapter v1), adapter_v2.
        seq_len: Tokens per sequence.
        micro_batch_size: Sequences per step.
        precision: 32-true or bf16-true (both frameworks).
        threads: torch.set_num_threads in every run.
        warmup: Untimed steps per run.
        steps: Timed steps per run (their median is the run's step time).
        rounds: Runs per framework and cell, in alternating order; the median over rounds is reported.
        device: cpu or cuda.
        timeout_s: Limit per run.
        our_loss: Our loss, as --train.loss: cross_entropy (the engine's default), chunked or chunked_head.
        interleaved: Instead, run both frameworks in one process per round, alternating steps, and report the
            median over all step pairs of HF's step time / ours (contention hits both alike), and each side's MFU
            against torch.mm's rate at the model's shapes measured in the same process; no memory.
        compile: Also build both sides with every decoder layer torch.compiled (ours as --train.compile true):
            four sides take turns, and a second table gives compiled ours / compiled HF, compiled ours / eager HF,
            and each side's compiled / eager; the first step, which compiles, is reported apart and not timed
            (interleaved mode only).
        out_json: Also write the results here (e.g. out/throughput.json; out/ is git-ignored).
    """
    from lit_adapter.memory import LOSSES

    if our_loss not in LOSSES:
        raise UserError(f"unknown --our_loss {our_loss!r}; choose one of {', '.join(LOSSES)}")
    size_list = [s.strip() for s in sizes.split(",") if s.strip()]
    method_list = [m.strip() for m in methods.split(",") if m.strip()]
    for m in method_list:
        if m not in METHODS:
            raise UserError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    from lit_adapter.model.config import Config

    for size in size_list:
        Config.from_name(size)
    if compile and not interleaved:
        raise UserError("--compile true needs --interleaved true (the first, compiling step is reported there)")
    info = hf_peft.machine()
    print(f"# machine: {info['cpu']}, {info['cores']} cores; torch {info['torch']}, transformers "
          f"{info['transformers']}, peft {info['peft']}; commit {info['commit']}; {info['date']}; "
          f"load average at start {info['load_average']}; our loss: {our_loss}; compile: {compile}")
    results = []
    if interleaved:
        return _interleaved_main(size_list, method_list, rounds, timeout_s, out_json, info,
                                 dict(seq_len=seq_len, micro_batch_size=micro_batch_size, precision=precision,
                                      threads=threads, warmup=max(warmup, 1), steps=steps, device=device,
                                      our_loss=our_loss, compile=compile))
    for size in size_list:
        for method in method_list:
            runs: Dict[str, List[Dict[str, Any]]] = {"ours": [], "hf": []}
            for r in range(rounds):
                order = ("ours", "hf") if r % 2 == 0 else ("hf", "ours")
                for framework in order:
                    job = dict(framework=framework, size=size, method=method, seq_len=seq_len,
                               micro_batch_size=micro_batch_size, precision=precision, threads=threads,
                               warmup=warmup, steps=steps, device=device, our_loss=our_loss)
                    runs[framework].append(run_job(job, timeout_s))
            row = {"size": size, "method": method}
            for framework, rs in runs.items():
                row[f"{framework}_tokens_per_s"] = statistics.median(x["tokens_per_s"] for x in rs)
                row[f"{framework}_peak_gb"] = statistics.median(x["peak_bytes"] for x in rs) / 1e9
                row[f"{framework}_trainable"] = rs[0]["trainable_params"]
                row[f"{framework}_runs_tokens_per_s"] = [round(x["tokens_per_s"], 1) for x in rs]
                # contention on a shared machine only ever slows a step down: the fastest step of all rounds is
                # the steadiest estimate of what the code itself costs
                best_step = min(t for x in rs for t in x["step_times_s"])
                row[f"{framework}_best_tokens_per_s"] = micro_batch_size * seq_len / best_step
            row["ratio"] = row["ours_tokens_per_s"] / row["hf_tokens_per_s"]
            row["best_ratio"] = row["ours_best_tokens_per_s"] / row["hf_best_tokens_per_s"]
            results.append(row)
            print(f"{size} {method}: ours {row['ours_tokens_per_s']:.0f} tok/s, HF+PEFT {row['hf_tokens_per_s']:.0f} "
                  f"tok/s, ratio {row['ratio']:.2f} (best steps: {row['best_ratio']:.2f})", flush=True)
    print()
    print("| model | method (ours vs PEFT) | ours tok/s | HF+PEFT tok/s | ours / HF | best step: ours / HF tok/s "
          "| best ratio | ours peak GB | HF peak GB | trainable ours / HF |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in results:
        peft_name = {"lora": "LoRA", "adapter": "adaption prompt (v1)",
                     "adapter_v2": "adaption prompt + v2 bias/scale/norms"}[row["method"]]
        print(f"| {row['size']} | {row['method']} vs {peft_name} | {row['ours_tokens_per_s']:.0f} | "
              f"{row['hf_tokens_per_s']:.0f} | {row['ratio']:.2f} | {row['ours_best_tokens_per_s']:.0f} / "
              f"{row['hf_best_tokens_per_s']:.0f} | {row['best_ratio']:.2f} | {row['ours_peak_gb']:.3f} | "
              f"{row['hf_peak_gb']:.3f} | {row['ours_trainable']:,} / {row['hf_trainable']:,} |")
    print(f"\nload average at end {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if out_json:
        hf_peft.write_json(out_json, {"machine": info, "results": results})
    return results


def _interleaved_main(size_list, method_list, rounds, timeout_s, out_json, info, settings) -> List[Dict[str, Any]]:
    tokens = settings["micro_batch_size"] * settings["seq_len"]
    results = []
    for size in size_list:
        for method in method_list:
            runs = [run_job(dict(settings, size=size, method=method), timeout_s, mode="--interleaved-worker")
                    for _ in range(rounds)]
            ratios = [r for run in runs for r in run["pair_ratios"]]
            ours = [t for run in runs for t in run["ours_step_times_s"]]
            hf = [t for run in runs for t in run["hf_step_times_s"]]
            row = {"size": size, "method": method, "pairs": len(ratios), "median_ratio": statistics.median(ratios),
                   "ours_median_tokens_per_s": tokens / statistics.median(ours),
                   "hf_median_tokens_per_s": tokens / statistics.median(hf),
                   "ours_best_tokens_per_s": tokens / min(ours), "hf_best_tokens_per_s": tokens / min(hf),
                   "ratio_quartiles": statistics.quantiles(ratios, n=4),
                   "step_flops": runs[0]["step_flops"],
                   "matmul_rate": statistics.median(run["matmul_rate"]["model_weighted"] for run in runs),
                   "matmul_peak": max(run["matmul_rate"]["peak"] for run in runs),
                   "first_step_s": {f: [round(run["first_step_s"][f], 1) for run in runs] for f in ("ours", "hf")},
                   "runs": runs}
            for side, ts in (("ours", ours), ("hf", hf)):
                achieved = row["step_flops"] / statistics.median(ts)
                row[f"{side}_mfu"] = achieved / row["matmul_rate"]
                row[f"{side}_mfu_peak"] = achieved / row["matmul_peak"]
            results.append(row)
            print(f"{size} {method}: median of {len(ratios)} step pairs, ours/HF throughput "
                  f"{row['median_ratio']:.3f}; first (compiling) steps ours {row['first_step_s']['ours']} s, "
                  f"HF {row['first_step_s']['hf']} s", flush=True)
    print()
    print("| model | method | step pairs | ours / HF tok/s (median pair) | quartiles | ours tok/s (median, best) | "
          "HF+PEFT tok/s (median, best) | MFU ours / HF (model-shape mm rate) | MFU ours / HF (peak mm rate) | "
          "mm rate GFLOP/s (model shapes, peak) | step GFLOP |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in results:
        q1, _, q3 = row["ratio_quartiles"]
        print(f"| {row['size']} | {row['method']} | {row['pairs']} | **{row['median_ratio']:.3f}** | "
              f"{q1:.3f}–{q3:.3f} | {row['ours_median_tokens_per_s']:.0f}, {row['ours_best_tokens_per_s']:.0f} | "
              f"{row['hf_median_tokens_per_s']:.0f}, {row['hf_best_tokens_per_s']:.0f} | "
              f"{100 * row['ours_mfu']:.0f}% / {100 * row['hf_mfu']:.0f}% | "
              f"{100 * row['ours_mfu_peak']:.0f}% / {100 * row['hf_mfu_peak']:.0f}% | "
              f"{row['matmul_rate'] / 1e9:.0f}, {row['matmul_peak'] / 1e9:.0f} | {row['step_flops'] / 1e9:.1f} |")
    if settings.get("compile"):
        _print_compiled(results, tokens)
    print(f"\nload average at end {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if out_json:
        hf_peft.write_json(out_json, {"machine": info, "interleaved": True, "results": results})
    return results


def _print_compiled(results, tokens: int) -> None:
    """The --compile table: each compiled pair's median ratio and quartiles, compiled MFUs, first steps."""
    print()
    print("| model | method | pairs | " + " | ".join(f"{a} / {b} tok/s (quartiles)" for a, b in COMPILED_PAIRS)
          + " | tok/s ours, HF compiled (median) | MFU ours / HF compiled (model-shape, peak mm rate) "
          "| first step ours / HF compiled s (compile + step) |")
    print("|---|---|---|" + "---|" * len(COMPILED_PAIRS) + "---|---|---|")
    for row in results:
        cells = []
        for a, b in COMPILED_PAIRS:
            ratios = [r for run in row["runs"] for r in run["compiled_pair_ratios"][f"{a}/{b}"]]
            q1, _, q3 = statistics.quantiles(ratios, n=4)
            cells.append(f"**{statistics.median(ratios):.3f}** ({q1:.3f}–{q3:.3f})")
            row.setdefault("compiled_ratios", {})[f"{a}/{b}"] = statistics.median(ratios)
        medians = {name: statistics.median(t for run in row["runs"] for t in run["step_times_s"][name])
                   for name in ("ours_compiled", "hf_compiled")}
        mfu = {name: row["step_flops"] / t for name, t in medians.items()}
        mm, peak = row["matmul_rate"], row["matmul_peak"]
        first = {name: [round(run["first_step_s"][name], 1) for run in row["runs"]] for name in medians}
        print(f"| {row['size']} | {row['method']} | {row['pairs']} | " + " | ".join(cells)
              + f" | {tokens / medians['ours_compiled']:.0f}, {tokens / medians['hf_compiled']:.0f} | "
              f"{100 * mfu['ours_compiled'] / mm:.0f}% / {100 * mfu['hf_compiled'] / mm:.0f}%, "
              f"{100 * mfu['ours_compiled'] / peak:.0f}% / {100 * mfu['hf_compiled'] / peak:.0f}% | "
              f"{first['ours_compiled']} / {first['hf_compiled']} |")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print("RESULT " + json.dumps(worker(json.loads(sys.argv[2]))), flush=True)
    elif len(sys.argv) == 3 and sys.argv[1] == "--interleaved-worker":
        print("RESULT " + json.dumps(interleaved_worker(json.loads(sys.argv[2]))), flush=True)
    else:
        from jsonargparse import CLI

        run_cli(CLI, main, as_positional=False)
