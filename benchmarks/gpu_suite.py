"""One GPU run that measures the 7B adapter grid and the sparse attention kernels (issue 16, docs/gpu.md).

    python benchmarks/gpu_suite.py --device cuda --out out/gpu_suite     # the real run: <= 8 minutes on an H200
    python benchmarks/gpu_suite.py --device cpu --tiny                    # the same code, tiny sizes, CPU

Cells, each in its own process (an out-of-memory cell is a result, status "oom", and the suite goes on): LLaMA 7B
(``Config.from_name("7B")``; random weights made on the meta device and materialised on the device: memory and time
do not depend on their values) with Adapter v1 and v2 at 512 and 1024 tokens, micro-batch 4, bf16-true, each with
no quantization, bnb.nf4 and bnb.int8, without and with activation checkpointing: 24 cells of 2 measured + 3 timed
optimizer steps of the training engine (``lit_adapter.memory.measure_step``), in that order of quantization, so that
should the budget run out the slowest (int8) cells are the ones skipped. Per cell: ``max_memory_allocated`` and
``max_memory_reserved`` over the steps, the analytic estimate (``memory.estimate_memory``) and its error, the median
step time, tokens/s and MFU. Before them (benchmarks/gpu_suite_sparse.py) the four sparse patterns at 4k/8k/16k
tokens: equality with dense SDPA under each pattern's explicit mask (float32, output and q/k/v gradients), and
forward + backward time and peak memory against causal dense SDPA (bf16, 7B's 32 heads of 128). They run first
because they are short (~30 s) and must not be crowded out of the budget by slow cells. Then
(benchmarks/gpu_suite_packing.py) packed against padded at Dolly's real lengths capped at 512 and 1024 tokens, for
Adapter v1, v2, LoRA and QLoRA: the same examples and optimizer steps padded to each micro-batch's longest example or
packed end to end (``--data.packing true``, the one flag between the two sides), interleaved in one process, with
real tokens/s, examples/s, the real-token share and the peak of each side and their ratio. On CUDA every cell gets a
fresh interpreter (``memory.measure_in_subprocess``); on CPU, where imports cost more than a tiny cell, each is
forked from a server that has imported torch and lit_adapter once (``--launcher``). Last, the 2-GPU cells
(benchmarks/gpu_suite_fsdp.py): sharded QLoRA and LoRA on 2 GPUs against 1, rows that say "skipped" on one GPU.

Model FLOPs per token (MFU = tokens/s x F / peak; as in Chowdhery et al. 2022, App. B, activation checkpointing's
recomputation is not counted, nor elementwise ops, norms, softmax or the loss). C = n_embd, L = n_layer,
I = intermediate_size, V = padded vocabulary, kv = n_query_groups * head_size, T = context, B = micro-batch,
a = prompt length, s = first adapted layer, P = 2C^2 + 2C*kv + 3CI the weights of one block (q, o; k, v; gate, up,
down), H = CV the head's. A matmul costs 2 FLOPs per weight and token forward, as much again for its input's
gradient and again for its weight's. Causal attention: query t sees t + 1 keys and QK^T and PV cost 2C FLOPs per key
each, so A = 2C(T + 1) per token and layer forward (the mean of 4C(t + 1)); its backward (dQ, dK from dS; dP, dV
from dO) is 2A. The prompt: every query sees all a prompt keys, 4Ca forward; its k/v projections run once per
micro-batch, R = 4aC*kv / (BT) per token. Per token and step:

    forward     F = 2(LP + H) + LA + (L - s)(4Ca + R)
    adapter_v2  F + 2(LP + H) + 2LA + (L - s)(8Ca + R)             every block needs its input gradients
    adapter     F + 2H + (L - s - 1)(2P + 2A + 8Ca) + 2(C^2 + 3CI) + 6Ca + (L - s)R
                blocks below s need no backward; block s only o_proj's and the MLP's input gradients and the
                prompt's dK, dP, dV (its q needs no gradient)
    full        3 * 2(LP + H) + 3LA                                 the weights' gradients too

so a frozen-base step is about 4N (N = LP + H; the embedding is a lookup) + 3LA, full fine-tuning 6N + 3LA. With
A = 4CT (counting the masked half) the formula equals ``torch.utils.flop_counter`` on the math SDPA path exactly
(tests/test_gpu_suite.py). The peak is the device's dense bf16 tensor-core peak (PEAK_TFLOPS, or --peak_tflops); on
CPU MFU is n/a unless given.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

import gpu_suite_fsdp  # noqa: E402
import gpu_suite_packing  # noqa: E402
import gpu_suite_sparse  # noqa: E402
from gpu_suite_sparse import PATTERNS  # noqa: E402
from lit_adapter.errors import UserError, looks_like_out_of_memory, run_cli  # noqa: E402

METHODS = ("adapter", "adapter_v2")
QUANTIZE = ("none", "bnb.nf4", "bnb.int8")  # run in this order: should the budget run out, int8 (the slowest) is cut
# Dense bf16 tensor-core peaks (NVIDIA datasheets: half the "with sparsity" figure). The first entry whose text is in
# the device name wins; None marks a variant with another, untabulated peak (pass --peak_tflops).
PEAK_TFLOPS = (("H200 NVL", None), ("H200", 989.4), ("H100 NVL", None), ("H100 PCIE", 756.5), ("H100", 989.4),
               ("A100", 312.0))
TINY_CONFIG = dict(name="tiny-suite", n_layer=4, n_head=4, n_embd=64, intermediate_size=192, vocab_size=512)
# (contexts, sparse contexts, sparse timing heads x head size, sparse timing repeats): the real run and --tiny
SIZES = {False: ([512, 1024], [4096, 8192, 16384], (32, 128), 5), True: ([128, 256], [512, 1024], (4, 32), 2)}
PACKING_CAPS = {False: [512, 1024], True: [128]}  # Dolly's caps; --tiny: one short cap


def train_flops_per_token(config, method: str, seq_len: int, micro_batch_size: int, prompt_length: int = 10,
                          start_layer: int = 2, causal: bool = True) -> Optional[float]:
    """Model FLOPs of one training step per token (the module docstring derives it); None for other methods."""
    C, L, I, V, T = config.n_embd, config.n_layer, config.intermediate_size, config.padded_vocab_size, seq_len
    kv = config.n_query_groups * config.head_size
    P, H = 2 * C * C + 2 * C * kv + 3 * C * I, C * V
    A = 2 * C * (T + 1) if causal else 4 * C * T
    if method == "full":
        return 3 * (2 * (L * P + H) + L * A)
    if method not in METHODS:
        return None
    a, s = prompt_length, start_layer
    prompt, R = 4 * C * a, 4 * a * C * kv / (micro_batch_size * T)
    forward = 2 * (L * P + H) + L * A + (L - s) * (prompt + R)
    if method == "adapter_v2":
        return forward + 2 * (L * P + H) + 2 * L * A + (L - s) * (2 * prompt + R)
    return forward + 2 * H + (L - s - 1) * (2 * P + 2 * A + 2 * prompt) + 2 * (C * C + 3 * C * I) + 1.5 * prompt \
        + (L - s) * R


def peak_tflops_of(device_name: str) -> Optional[float]:
    for text, tflops in PEAK_TFLOPS:
        if text in device_name.upper():
            return tflops
    return None


class Budget:
    """The suite's wall-clock budget, counted from its start."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds, self.clock, self.start = seconds, clock, clock()

    def left(self) -> float:
        return self.seconds - (self.clock() - self.start)

    def run(self, items: List[Any], run: Callable[[Any, float], Any], timeout_s: float,
            report: Callable[[Any, Optional[Any], float], None], kind: Callable[[Any], Any] = lambda item: None):
        """``run(item, timeout)`` in order while the budget allows; ``report(item, result or None if skipped, wall)``.

        An item is skipped when the slowest item so far of its ``kind`` (cells: the quantization, as building and
        quantizing the 7B base dominates; before the first of its kind, the slowest of any) would not finish in the
        time left. An item that runs gets at most the time left as its timeout: the suite ends within the budget.
        """
        took: Dict[Any, List[float]] = {}
        for item in items:
            predicted = max(took.get(kind(item)) or [t for ts in took.values() for t in ts] or [0.0])
            left = self.left()
            if left < max(predicted, 1.0):
                report(item, None, 0.0)
                continue
            t0 = self.clock()
            result = run(item, min(timeout_s, left))
            took.setdefault(kind(item), []).append(self.clock() - t0)
            report(item, result, took[kind(item)][-1])


# ----------------------------------------------------------------------------------------------------------------
# Cells


def build_cells(args) -> List[Any]:
    from lit_adapter.memory import Cell

    model, config = (None, TINY_CONFIG) if args.tiny else ("7B", {})
    return [Cell(method=method, quantize=None if q == "none" else q, precision=args.precision, seq_len=T,
                 micro_batch_size=args.micro_batch_size, activation_checkpointing=ckpt, model_name=model,
                 config_overrides=config, steps=args.steps, timed_steps=args.timed_steps, device=args.device,
                 threads=args.threads)
            for q in args.quantize for T in args.contexts for method in args.methods for ckpt in args.checkpointing]


def measure_forked(cell, timeout_s: float, target: Optional[Callable] = None) -> Dict[str, Any]:
    """``memory.measure_in_subprocess``'s statuses, in a child forked from a server that imported torch,
    lit_adapter, Lightning and bitsandbytes once: ~0.3 s of start-up per cell instead of ~3 s of imports on a small
    CPU. CPU only: a process forked from one that may have touched CUDA cannot use it, so CUDA cells get a fresh
    interpreter each. ``target(dict, conn)`` runs instead of a cell's measurement for other jobs (packing's)."""
    ctx = multiprocessing.get_context("forkserver")
    reader, writer = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=target or _forked_cell, args=(cell if target else asdict(cell), writer))
    proc.start()
    writer.close()
    try:
        result = reader.recv() if reader.poll(timeout_s) else {"status": "timeout"}
    except EOFError:  # the child died without answering (e.g. the kernel's OOM killer)
        result = None
    if proc.is_alive():
        proc.kill()
    proc.join()
    if result is None:
        code = proc.exitcode
        result = {"status": f"killed (signal {-code})" if code < 0 else f"error: exit {code}"}
    return result


def _forked_cell(cell: Dict[str, Any], conn) -> None:
    import warnings

    from lit_adapter.memory import Cell, measure_step

    warnings.simplefilter("ignore")
    devnull = os.open(os.devnull, os.O_WRONLY)  # the profiler's chatter (measure_in_subprocess captures it)
    os.dup2(devnull, 1), os.dup2(devnull, 2)
    try:
        result = measure_step(Cell(**cell))
    except Exception as err:  # noqa: BLE001 - every failure is a status, as in memory.measure_in_subprocess
        text = (str(err).splitlines() or [type(err).__name__])[0][:300]
        oom = isinstance(err, MemoryError) or looks_like_out_of_memory(f"{type(err).__name__} {err}")
        result = {"status": "oom", "error": text} if oom else {"status": f"error: {type(err).__name__}: {text}"}
    conn.send(result)


def _forked_packing(job: Dict[str, Any], conn) -> None:
    import warnings

    warnings.simplefilter("ignore")
    try:
        rows = gpu_suite_packing.add_ratios(gpu_suite_packing.measure(job))
    except Exception as err:  # noqa: BLE001 - every failure is a status, as in gpu_suite_packing.run
        text = (str(err).splitlines() or [type(err).__name__])[0][:300]
        rows = [dict(cap=job["cap"], method=job["method"], side=side, status=f"error: {type(err).__name__}",
                     error=text) for side in gpu_suite_packing.SIDES]
    conn.send(rows)


def packing_forked(job: Dict[str, Any], timeout_s: float) -> List[Dict[str, Any]]:
    """``gpu_suite_packing.run`` for the CPU fork launcher: the job forked from the preloaded server."""
    result = measure_forked(job, timeout_s, target=_forked_packing)
    if isinstance(result, list):
        return result
    return [dict(cap=job["cap"], method=job["method"], side=side, **result) for side in gpu_suite_packing.SIDES]


def cell_row(cell, result: Optional[Dict[str, Any]], wall_s: float, peak_tflops: Optional[float]) -> Dict[str, Any]:
    from lit_adapter.memory import estimate_memory

    config, spec = cell.config(), cell.spec()
    row = dict(model=config.name, method=cell.method, context=cell.seq_len, micro_batch_size=cell.micro_batch_size,
               precision=cell.precision, quantize=cell.quantize or "none", checkpointing=cell.activation_checkpointing,
               status="skipped (budget)" if result is None else result["status"], wall_s=round(wall_s, 1))
    try:
        row["estimate_bytes"] = estimate_memory(
            config, spec, cell.micro_batch_size, cell.seq_len, cell.precision,
            activation_checkpointing=cell.activation_checkpointing, optimizer=cell.optimizer,
            device_type=cell.device, sdpa=cell.sdpa, loss=cell.loss)["peak_bytes"]
    except UserError as err:
        row["estimate_bytes"], row["estimate_note"] = None, str(err)
    row["flops_per_token"] = flops = train_flops_per_token(config, cell.method, cell.seq_len, cell.micro_batch_size,
                                                           spec.settings.prompt_length, spec.settings.start_layer)
    if result is not None and result["status"] == "ok":
        allocated, est = result["peak_bytes"], row["estimate_bytes"]
        achieved = result["tokens_per_s"] * flops / 1e12
        row.update(allocated_bytes=allocated, allocated_kind=result["peak_kind"],
                   reserved_bytes=result.get("reserved_bytes"), step_time_s=result["step_time_s"],
                   tokens_per_s=result["tokens_per_s"], achieved_tflops=achieved,
                   mfu_pct=100 * achieved / peak_tflops if peak_tflops else None,
                   est_error_pct=100 * (est / allocated - 1) if est else None, device_name=result.get("device_name"))
    elif result is not None:
        row["error"] = result.get("error")
    return row


# ----------------------------------------------------------------------------------------------------------------
# Environment and output


def _command(*cmd: str) -> Optional[str]:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: str) -> Dict[str, Any]:
    import torch

    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    commit = _command("git", "rev-parse", "HEAD") or "unknown (not a git checkout)"
    if len(commit) == 40 and _command("git", "status", "--porcelain", "--untracked-files=no"):
        commit += " (uncommitted changes)"
    env = dict(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), git_commit=commit,
               python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
               bitsandbytes=version("bitsandbytes"), device_type=device)
    if device == "cuda":
        smi = _command("nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader")
        name, driver, memory = ((smi or "").splitlines()[0].split(", ") + [None] * 3)[:3] if smi else (None,) * 3
        env.update(device_name=name, driver=driver or "n/a (no nvidia-smi)", device_memory=memory)
    else:
        lscpu = _command("lscpu") or ""
        name = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")),
                    platform.processor() or "unknown CPU")
        env.update(device_name=f"{name} ({os.cpu_count()} cores)", driver="n/a (CPU)")
    return env


def _fmt(value: Any, spec: str = "", scale: float = 1.0) -> str:
    """``value / scale`` in format ``spec``; text, booleans and ``spec=""`` as they are; None as n/a."""
    if value is None:
        return "n/a"
    if not spec or isinstance(value, (bool, str)):
        return str(value)
    return format(value / scale, spec)


# (header, row key, format, scale)
CELL_COLUMNS = (("model", "model", "", 1), ("method", "method", "", 1), ("T", "context", "", 1),
                ("B", "micro_batch_size", "", 1), ("precision", "precision", "", 1), ("quantize", "quantize", "", 1),
                ("ckpt", "checkpointing", "", 1), ("status", "status", "", 1),
                ("allocated GB", "allocated_bytes", ".3f", 1e9), ("reserved GB", "reserved_bytes", ".3f", 1e9),
                ("estimate GB", "estimate_bytes", ".3f", 1e9), ("est. error %", "est_error_pct", "+.1f", 1),
                ("step s", "step_time_s", ".3f", 1), ("tokens/s", "tokens_per_s", ",.0f", 1),
                ("MFU %", "mfu_pct", ".1f", 1))
PACKING_COLUMNS = (("cap", "cap", "", 1), ("method", "method", "", 1), ("side", "side", "", 1),
                   ("status", "status", "", 1), ("real-token share", "real_share", ".2f", 1),
                   ("step s", "step_time_s", ".3f", 1), ("real tokens/s", "real_tokens_per_s", ",.0f", 1),
                   ("examples/s", "examples_per_s", ".1f", 1), ("peak GB", "peak_bytes", ".3f", 1e9),
                   ("packed / padded", "packed_vs_padded", ".2f", 1))
FSDP_COLUMNS = (("method", "method", "", 1), ("quantize", "quantize", "", 1),
                ("GPUs", "devices", "", 1), ("rank", "rank", "", 1), ("status", "status", "", 1),
                ("allocated GB", "measured_peak_gb", ".3f", 1), ("estimate GB", "estimate_gb", ".3f", 1),
                ("allocated / estimate", "ratio", ".3f", 1))
SPARSE_COLUMNS = (("T", "T", "", 1), ("attention", "attention", "", 1), ("status", "status", "", 1),
                  ("equal to masked dense (fp32)", "equal", "", 1), ("max rel. error", "max_err", ".1e", 1),
                  ("fwd+bwd ms", "ms", ".2f", 1), ("vs dense SDPA", "vs_dense", ".2f", 1),
                  ("peak MiB", "peak_mib", ".1f", 1))


def table(rows: List[Dict[str, Any]], columns) -> List[str]:
    lines = ["| " + " | ".join(c[0] for c in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        row = dict(row, max_err=max(row["max_rel_err"].values()) if row.get("max_rel_err") else None)
        lines.append("| " + " | ".join(_fmt(row.get(key), spec, scale) for _, key, spec, scale in columns) + " |")
    return lines


def markdown(state: Dict[str, Any]) -> str:
    env, s = state["environment"], state["settings"]
    lines = [f"# GPU suite: {s['model']} on {env.get('device_name')}", "",
             f"- device: {env['device_name']}, driver {env['driver']}, memory {env.get('device_memory', 'n/a')}",
             f"- torch {env['torch']}, CUDA {env['cuda']}, bitsandbytes {env['bitsandbytes']}, "
             f"Python {env['python']}; {env['date']}; commit {env['git_commit']}",
             f"- {s['cells']} cells: micro-batch {s['micro_batch_size']}, {s['precision']}, {s['steps']} measured + "
             f"{s['timed_steps']} timed steps; budget {s['budget_s']} s, per cell {s['cell_timeout_s']} s; "
             f"wall time {_fmt(state.get('wall_s'), '.0f')} s{'' if state['complete'] else ' (incomplete)'}"]
    lines += [f"- {note}" for note in state["notes"]]
    lines += ["", "## Sparse attention", ""] + table(state["sparse"], SPARSE_COLUMNS)
    lines += ["", "## Packed vs padded at Dolly lengths", ""] + table(state.get("packing", []), PACKING_COLUMNS)
    lines += ["", "## Fine-tuning cells", ""] + table(state["cells"], CELL_COLUMNS)
    lines += ["", "## Sharded on 2 GPUs (fsdp)", ""] + table(state.get("fsdp", []), FSDP_COLUMNS)
    return "\n".join(lines) + "\n"


def write_outputs(state: Dict[str, Any], out: Path) -> None:
    """After every result, so that a run cut short still leaves what it measured."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_suite.json").write_text(json.dumps(state, indent=1) + "\n")
    (out / "gpu_suite.md").write_text(markdown(state))


# ----------------------------------------------------------------------------------------------------------------
# Command line


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line through run_cli, not argparse's usage block
        raise UserError(message)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    from lit_adapter.memory import PRECISIONS

    p = _Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tiny", action="store_true", help="a 4-layer model and short contexts instead of 7B")
    p.add_argument("--out", type=Path, help="output folder (default: out/gpu_suite/<device>-<time>)")
    p.add_argument("--budget_s", type=float, default=480.0, help="wall-clock budget; later cells are skipped")
    p.add_argument("--cell_timeout_s", type=float, default=90.0, help="per cell (7B: ~10-25 s expected)")
    p.add_argument("--peak_tflops", type=float, help="the device's bf16 dense peak, for MFU (default: PEAK_TFLOPS)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--quantize", nargs="+", choices=QUANTIZE, default=list(QUANTIZE))
    p.add_argument("--checkpointing", nargs="+", choices=("false", "true"), default=["false", "true"])
    p.add_argument("--contexts", nargs="+", type=int, help="default 512 1024 (tiny: 128 256)")
    p.add_argument("--sparse_contexts", nargs="*", type=int, help="default 4096 8192 16384 (tiny: 512 1024)")
    p.add_argument("--packing_caps", nargs="*", type=int, help="Dolly caps of the packed-vs-padded jobs "
                   "(default 512 1024; tiny: 128; none: skip them)")
    p.add_argument("--packing_methods", nargs="+", choices=tuple(gpu_suite_packing.METHODS),
                   help="default adapter adapter_v2 lora qlora (tiny: lora)")
    p.add_argument("--micro_batch_size", type=int, default=4)
    p.add_argument("--precision", choices=PRECISIONS, help="default bf16-true (32-true on CPU)")
    p.add_argument("--steps", type=int, default=2, help="measured optimizer steps per cell")
    p.add_argument("--timed_steps", type=int, default=3, help="further timed steps per cell")
    p.add_argument("--threads", type=int, help="torch threads per process (default: 1 on CPU, torch's on CUDA)")
    p.add_argument("--launcher", choices=("auto", "spawn", "fork"), default="auto",
                   help="spawn: a fresh interpreter per cell (memory.measure_in_subprocess; CUDA's default); "
                        "fork: forked from a preloaded server (CPU only; CPU's default)")
    args = p.parse_args(argv)
    contexts, sparse, args.shape, args.repeats = SIZES[args.tiny]
    cpu = args.device == "cpu"
    args.contexts = args.contexts or contexts
    args.sparse_contexts = sparse if args.sparse_contexts is None else args.sparse_contexts
    args.packing_caps = PACKING_CAPS[args.tiny] if args.packing_caps is None else args.packing_caps
    args.packing_methods = args.packing_methods or (["lora"] if args.tiny else list(gpu_suite_packing.METHODS))
    args.precision = args.precision or ("32-true" if cpu else "bf16-true")
    args.threads = args.threads or (1 if cpu else None)  # tiny CPU steps gain nothing from more, and stall when shared
    args.checkpointing = [c == "true" for c in args.checkpointing]
    args.launcher = ("fork" if cpu else "spawn") if args.launcher == "auto" else args.launcher
    for name in ("budget_s", "cell_timeout_s", "peak_tflops", "micro_batch_size", "steps", "timed_steps", "threads"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise UserError(f"--{name} must be positive, got {getattr(args, name)}")
    if min(args.contexts) < 2 or min(args.sparse_contexts, default=1) < 1 or min(args.packing_caps, default=2) < 2:
        raise UserError("contexts must be at least 2 tokens and sparse contexts at least 1")
    if args.launcher == "fork" and not cpu:
        raise UserError("--launcher fork is for CPU only: a forked child cannot safely initialise CUDA")
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    args.out = args.out or Path("out/gpu_suite") / f"{args.device}{'-tiny' if args.tiny else ''}-{stamp}"
    return args


def notes(args, peak: Optional[float]) -> List[str]:
    out = [f"MFU against {peak} TFLOPS ({'--peak_tflops' if args.peak_tflops else 'PEAK_TFLOPS'}), model FLOPs as in "
           "the module docstring (causal attention, no recomputation)" if peak else
           "MFU n/a: no known bf16 peak for this device (pass --peak_tflops)",
           "est. error % = estimate / allocated - 1; every cell in its own process ("
           + ("memory.measure_in_subprocess)" if args.launcher == "spawn" else "forked from a preloaded server)")]
    if args.device == "cpu":
        out += ["CPU: allocated = the c10 CPU allocator's peak live bytes (memory.AllocatorPeak), the counterpart of "
                "max_memory_allocated; reserved has no CPU counterpart (n/a)",
                f"CPU: {args.precision} and float32 sparse timing (bf16 is slow on CPU); the GPU run uses bf16"]
    return out


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    budget = Budget(args.budget_s)
    import torch

    from lit_adapter.memory import measure_in_subprocess

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device cuda, but torch {torch.__version__} sees no CUDA device; try --device cpu --tiny")
    # the cells' children run ``python -m lit_adapter.memory``: let them find this checkout from any directory
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env, cells = environment(args.device), build_cells(args)
    peak = args.peak_tflops or (peak_tflops_of(env["device_name"] or "") if args.device == "cuda" else None)
    state = dict(suite="gpu_suite", complete=False, environment=env, notes=notes(args, peak), sparse=[], packing=[],
                 cells=[],
                 settings=dict(model=cells[0].config().name if cells else "none", tiny=args.tiny, cells=len(cells),
                               micro_batch_size=args.micro_batch_size, precision=args.precision, steps=args.steps,
                               timed_steps=args.timed_steps, budget_s=args.budget_s, launcher=args.launcher,
                               cell_timeout_s=args.cell_timeout_s, peak_tflops=peak, threads=args.threads,
                               command=sys.argv if argv is None else [__file__] + argv))

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)
        write_outputs(state, args.out)

    def report_sparse(job, rows, wall):
        skipped = [dict(T=job["T"], attention=a, status="skipped (budget)") for a in ("dense",) + PATTERNS]
        state["sparse"] += rows or skipped
        log(f"sparse T={job['T']}: " + ", ".join(f"{r['attention']} {r['status']}" + (
            f" equal={r['equal']}" if "equal" in r else "") for r in state["sparse"][-5:]) + f" ({wall:.0f} s)")

    def report_cell(cell, result, wall):
        settings = state["settings"]
        if not env["device_name"] and (result or {}).get("device_name"):  # no nvidia-smi: the child's CUDA name
            env["device_name"] = result["device_name"]
            settings["peak_tflops"] = args.peak_tflops or peak_tflops_of(env["device_name"])
            state["notes"] = notes(args, settings["peak_tflops"])
        state["cells"].append(row := cell_row(cell, result, wall, settings["peak_tflops"]))
        gb = lambda key: _fmt(row.get(key), ".3f", 1e9)  # noqa: E731
        log(f"[{len(state['cells'])}/{len(cells)}] {row['method']} T={row['context']} q={row['quantize']} "
            f"ckpt={row['checkpointing']}: {row['status']}, allocated {gb('allocated_bytes')} GB, estimate "
            f"{gb('estimate_bytes')} GB, {_fmt(row.get('tokens_per_s'), ',.0f')} tokens/s, "
            f"MFU {_fmt(row.get('mfu_pct'), '.1f')} % ({wall:.0f} s)")

    def report_packing(job, rows, wall):
        state["packing"] += rows or [dict(cap=job["cap"], method=job["method"], side=side, status="skipped (budget)")
                                     for side in gpu_suite_packing.SIDES]
        ratio = state["packing"][-1].get("packed_vs_padded")
        log(f"packing cap={job['cap']} {job['method']}: " + ", ".join(
            f"{r['side']} {r['status']}" for r in state["packing"][-2:]) + f", packed/padded {_fmt(ratio, '.2f')}"
            f" ({wall:.0f} s)")

    jobs = [dict(device=args.device, T=T, shape=args.shape, repeats=args.repeats, threads=args.threads,
                 dtype="float32" if args.device == "cpu" else "bfloat16") for T in args.sparse_contexts]
    budget.run(jobs, gpu_suite_sparse.run, args.cell_timeout_s, report_sparse)
    if args.launcher == "fork":  # imported once by the fork server instead of by every cell
        multiprocessing.get_context("forkserver").set_forkserver_preload(
            ["torch", "torch.profiler", "lit_adapter.memory", "lit_adapter.train.run", "lit_adapter.tuners.registry",
             "lit_adapter.train.fabric_setup", "bitsandbytes"])  # fabric_setup: Lightning, for measure_step's Trainer
    measure = measure_in_subprocess if args.launcher == "spawn" else measure_forked
    packing_jobs = [dict(device=args.device, cap=cap, method=m, tiny=args.tiny, precision=args.precision,
                         micro_batch_size=args.micro_batch_size, steps=args.steps, timed_steps=args.timed_steps,
                         threads=args.threads) for cap in args.packing_caps for m in args.packing_methods]
    budget.run(packing_jobs, gpu_suite_packing.run if args.launcher == "spawn" else packing_forked,
               args.cell_timeout_s, report_packing)
    budget.run(cells, measure, args.cell_timeout_s, report_cell, kind=lambda cell: cell.quantize)
    # last: the 2-GPU cells (benchmarks/gpu_suite_fsdp.py), rows that say "skipped" on a one-GPU lend
    if args.device == "cpu":  # several processes per cell: a minute on CPU, run on its own there
        state["fsdp"] = [dict(status="skipped (CPU: python benchmarks/gpu_suite_fsdp.py --device cpu --tiny)")]
    elif budget.left() > 60 or gpu_suite_fsdp.gpus() < 2:
        state["fsdp"] = gpu_suite_fsdp.main(["--device", "cuda", "--cell_timeout_s",
                                             str(max(60.0, min(300.0, budget.left())))] + (["--tiny"] * args.tiny))
    else:
        state["fsdp"] = [dict(status="skipped (budget)")]
    state.update(complete=True, wall_s=round(budget.clock() - budget.start, 1))
    write_outputs(state, args.out)
    print(markdown(state))
    print(f"wrote {args.out / 'gpu_suite.json'} and {args.out / 'gpu_suite.md'}", file=sys.stderr)
    return state


if __name__ == "__main__":
    run_cli(main)
