"""Peak memory and speed of fine-tuning over a grid of methods, context lengths, batch sizes and memory savers.

Every cell builds the method's model with random weights (memory does not depend on their values, so 7B-sized
configurations need no download), runs real optimizer steps of the training engine's loop (forward, loss, backward,
clipping, AdamW) in a fresh process and records the peak memory, step time and tokens/s beside the analytic
estimate of :func:`lit_adapter.memory.estimate_memory`. A cell that runs out of memory (MemoryError, CUDA OOM, or
the process killed by signal 9) is a result, not a crash.

    python scripts/memory_sweep.py --model_name stories15M --contexts 256,1024,4096
    python scripts/memory_sweep.py --model_name 7B --estimate_only true --methods adapter_v2 --quantize bnb.nf4 \\
        --precisions bf16-true --checkpointing true --micro_batch_sizes 4 --contexts 1024 --device cuda
    python scripts/memory_sweep.py --model_name stories15M --methods lora --find_max_context true --budget_gb 1 \\
        --rope_scaling '{"type": "linear", "factor": 16}'

A context longer than the model's window (``block_size``; ``--rope_scaling`` scales it) is measured on a model
whose RoPE table is grown to cover it (memory does not depend on the rotation angles) and marked "beyond window":
training refuses such a context without RoPE scaling. ``--find_max_context`` searches up to the window only.

Peak memory is, on CUDA, ``torch.cuda.max_memory_allocated``; on CPU the peak of live bytes of the c10 CPU
allocator during the training steps (the same quantity, see ``memory.AllocatorPeak``). The process's peak resident
set size is reported beside it, raw and net of the baseline after imports (see docs/memory.md).
"""

from __future__ import annotations

import csv
import itertools
import json
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_adapter.errors import UserError, run_cli  # noqa: E402

METHOD_LABELS = ("adapter", "adapter+sparse", "adapter_v2", "adapter_v2+sparse", "lora", "lora+sparse", "full",
                 "full+sparse")
COLUMNS = [
    "model", "method", "context", "micro_batch_size", "precision", "quantize", "checkpointing", "loss", "optimizer",
    "device", "window", "beyond_window", "status", "peak_gb", "peak_kind", "est_peak_gb", "est_error_pct", "est_phase",
    "rss_peak_gb", "rss_net_gb",
    "rss_baseline_gb", "tokens_per_s", "step_time_s", "trainable_params",
]


def _split(value: str, convert=str) -> List[Any]:
    return [convert(v.strip()) for v in str(value).split(",") if v.strip()]


def _bool(value: str) -> bool:
    if value.lower() in ("true", "1", "yes", "on"):
        return True
    if value.lower() in ("false", "0", "no", "off"):
        return False
    raise UserError(f"expected true or false, got {value!r}")


def _quantize(value: str) -> Optional[str]:
    return None if value in ("none", "None", "") else value


def build_cells(model_name: Optional[str], config_overrides: Dict[str, Any], methods: List[str], contexts: List[int],
                micro_batch_sizes: List[int], precisions: List[str], quantize: List[Optional[str]],
                checkpointing: List[bool], optimizer: str, sparse_pattern: str, device: str, steps: int,
                timed_steps: int, threads: Optional[int], sdpa: str, losses: List[str],
                rope_scaling: Optional[Dict[str, Any]] = None) -> List[Any]:
    from lit_adapter.memory import LOSSES, Cell, precision_dtype
    from lit_adapter.tuners.registry import get_method

    for label in methods:
        if label not in METHOD_LABELS:
            raise UserError(f"unknown method {label!r}; choose from {', '.join(METHOD_LABELS)}")
    for precision in precisions:
        precision_dtype(precision)
    for loss in losses:
        if loss not in LOSSES:
            raise UserError(f"unknown loss {loss!r}; choose from {', '.join(LOSSES)}")
    cells = []
    for label in methods:
        method, _, sparse = label.partition("+")
        for q in quantize:
            if q is not None and not get_method(method).trains_quantized_base:
                continue  # full fine-tuning cannot train a quantized base
            for precision in precisions:
                for ckpt, loss in itertools.product(checkpointing, losses):
                    for B in micro_batch_sizes:
                        for T in contexts:
                            cells.append(Cell(
                                method=method, pattern=sparse_pattern if sparse else "dense", quantize=q,
                                precision=precision, seq_len=T, micro_batch_size=B, activation_checkpointing=ckpt,
                                optimizer=optimizer, model_name=model_name, config_overrides=config_overrides,
                                steps=steps, timed_steps=timed_steps, device=device, threads=threads, sdpa=sdpa,
                                loss=loss, rope_scaling=rope_scaling,
                            ))
    return cells


def estimate_cell(cell, overhead: int = 0) -> Dict[str, Any]:
    from lit_adapter.memory import estimate_memory

    return estimate_memory(
        cell.config(), cell.spec(), cell.micro_batch_size, cell.seq_len, cell.precision,
        activation_checkpointing=cell.activation_checkpointing, optimizer=cell.optimizer,
        device_type="cuda" if cell.device.startswith("cuda") else "cpu", sdpa=cell.sdpa, loss=cell.loss,
        framework_overhead_bytes=overhead, micro_batch_tokens=cell.micro_batch_tokens,
    )


def method_label(cell) -> str:
    return cell.method + ("+sparse" if cell.pattern != "dense" else "")


def row_for(cell, result: Optional[Dict[str, Any]], estimate: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    from lit_adapter.memory import GB

    row = {
        "model": cell.config().name or "custom", "method": method_label(cell), "context": cell.seq_len,
        "micro_batch_size": cell.micro_batch_size, "micro_batch_tokens": cell.micro_batch_tokens,
        "precision": cell.precision, "quantize": cell.quantize or "none",
        "checkpointing": cell.activation_checkpointing, "loss": cell.loss, "optimizer": cell.optimizer,
        "device": cell.device, "window": cell.model_config().block_size, "beyond_window": cell.beyond_window,
        "status": "estimate" if result is None else result["status"],
    }
    if estimate is not None:
        row["est_peak_gb"] = round(estimate["peak_bytes"] / GB, 4)
        row["est_phase"] = estimate["peak_phase"]
    if result is not None and result["status"] == "ok":
        row.update(
            peak_gb=round(result["peak_bytes"] / GB, 4), peak_kind=result["peak_kind"],
            rss_peak_gb=round(result["rss_peak_bytes"] / GB, 4), rss_net_gb=round(result["rss_net_bytes"] / GB, 4),
            rss_baseline_gb=round(result["rss_baseline_bytes"] / GB, 4),
            tokens_per_s=round(result["tokens_per_s"], 1), step_time_s=round(result["step_time_s"], 3),
            trainable_params=result["trainable_params"],
        )
        if estimate is not None:
            row["est_error_pct"] = round(100 * (estimate["peak_bytes"] / result["peak_bytes"] - 1), 2)
    elif estimate is not None:
        row["trainable_params"] = estimate["trainable_params"]
    return row


def run_grid(cells, estimate_only: bool, timeout_s: float, log=print) -> List[Dict[str, Any]]:
    from lit_adapter.memory import measure_in_subprocess

    rows = []
    for i, cell in enumerate(cells, 1):
        try:
            estimate = estimate_cell(cell)
        except UserError as err:
            estimate = None
            log(f"  (no estimate: {err})")
        t0 = time.perf_counter()
        result = None if estimate_only else measure_in_subprocess(cell, timeout_s)
        row = row_for(cell, result, estimate)
        rows.append(row)
        log(f"[{i}/{len(cells)}] {_describe(row)} ({time.perf_counter() - t0:.0f}s)")
    return rows


def _describe(row: Dict[str, Any]) -> str:
    batch = (f"packed {row['micro_batch_tokens']} tokens" if row.get("micro_batch_tokens")
             else f"B={row['micro_batch_size']}")
    head = (f"{row['model']} {row['method']} T={row['context']} {batch} {row['precision']} "
            f"q={row['quantize']} ckpt={row['checkpointing']} loss={row.get('loss', 'cross_entropy')}"
            + (f" (beyond the {row['window']}-token window)" if row.get("beyond_window") else "") + ": ")
    if row["status"] == "estimate":
        return head + f"estimated {row.get('est_peak_gb', float('nan')):.3f} GB"
    if row["status"] != "ok":
        return head + row["status"]
    est = f", estimate {row['est_peak_gb']:.3f} GB ({row['est_error_pct']:+.1f}%)" if "est_peak_gb" in row else ""
    return head + (f"peak {row['peak_gb']:.3f} GB{est}, RSS net {row['rss_net_gb']:.3f} GB, "
                   f"{row['tokens_per_s']:.0f} tok/s")


def fits(row: Dict[str, Any], budget_gb: float, estimate_only: bool) -> bool:
    if estimate_only:
        return row.get("est_peak_gb", float("inf")) <= budget_gb
    return row["status"] == "ok" and row["peak_gb"] <= budget_gb


def search_max_context(template, budget_gb: float, min_context: int, max_context: int, context_step: int,
                     estimate_only: bool, timeout_s: float, log=print) -> tuple:
    """Doubles the context from ``min_context`` until a cell does not fit, then bisects to ``context_step``."""
    from dataclasses import replace

    probes: List[Dict[str, Any]] = []

    def probe(T: int) -> bool:
        row = run_grid([replace(template, seq_len=T)], estimate_only, timeout_s, log=log)[0]
        probes.append(row)
        return fits(row, budget_gb, estimate_only)

    if not probe(min_context):
        return None, probes
    good, bad = min_context, None
    while bad is None and good < max_context:
        T = min(2 * good, max_context)
        if probe(T):
            good = T
        else:
            bad = T
    while bad is not None and bad - good > context_step:
        mid = (good + bad) // 2 // context_step * context_step
        if mid <= good:
            break
        if probe(mid):
            good = mid
        else:
            bad = mid
    return good, probes


def write_outputs(rows: List[Dict[str, Any]], out_dir: Path, title: str, summary: Optional[List[str]] = None) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / "sweep.md").write_text(markdown_table(rows, title, summary))
    plot(rows, out_dir / "sweep.png", title)


def markdown_table(rows: List[Dict[str, Any]], title: str, summary: Optional[List[str]] = None) -> str:
    cols = ["model", "method", "context", "micro_batch_size", "precision", "quantize", "checkpointing", "loss",
            "status", "peak_gb", "est_peak_gb", "est_error_pct", "rss_net_gb", "rss_peak_gb", "tokens_per_s"]
    header = ["model", "method", "T", "B", "precision", "quantize", "ckpt", "loss", "status", "peak GB",
              "estimate GB", "est. error %", "RSS net GB", "RSS raw GB", "tokens/s"]
    lines = [f"# {title}", ""] + (summary or []) + ([""] if summary else [])
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(c, "")) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: List[Dict[str, Any]], path: Path, title: str) -> None:
    """Peak memory against context length, one line per method (solid: measured, dashed: estimated)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: Dict[tuple, List[Dict[str, Any]]] = {}
    for row in rows:
        key = (row["model"], row["micro_batch_size"], row["precision"], row["quantize"], row["checkpointing"],
               row.get("loss", "cross_entropy"))
        groups.setdefault(key, []).append(row)
    groups = {k: v for k, v in groups.items() if len({r["context"] for r in v}) > 1} or groups
    n = len(groups)
    cols = min(n, 3)
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(6 * cols, 4.5 * ((n + cols - 1) // cols)),
                             squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, group) in zip(axes.flat, groups.items()):
        methods = sorted({r["method"] for r in group}, key=lambda m: (m.replace("+sparse", ""), m))
        for i, method in enumerate(methods):
            pts = sorted((r for r in group if r["method"] == method), key=lambda r: r["context"])
            color = colors[i % len(colors)]
            measured = [(r["context"], r["peak_gb"]) for r in pts if r.get("peak_gb") not in (None, "")]
            estimated = [(r["context"], r["est_peak_gb"]) for r in pts if r.get("est_peak_gb") not in (None, "")]
            style = "-" if "+sparse" not in method else "-."
            if measured:
                ax.plot(*zip(*measured), style, marker="o", color=color, label=f"{method} (measured)")
            if estimated:
                ax.plot(*zip(*estimated), ":", marker="x", color=color, alpha=0.7,
                        label=f"{method} (estimate)" if not measured else None)
            for r in pts:
                if r["status"] not in ("ok", "estimate"):
                    ax.annotate("OOM" if "oom" in r["status"] or "signal 9" in r["status"] else "x",
                                (r["context"], ax.get_ylim()[1]), color=color, ha="center")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("peak memory (GB)")
        model, B, precision, quantize, ckpt, loss = key
        ax.set_title(f"{model}, B={B}, {precision}, quantize={quantize}, ckpt={ckpt}, loss={loss}", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    legend = "solid: dense attention, dash-dot: sparse; circles measured, dotted crosses estimated"
    width = 60 * cols  # characters that fit the figure's width at this font size
    fig.suptitle("\n".join(textwrap.wrap(title, width) + textwrap.wrap(legend, width)), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(
    model_name: Optional[str] = "stories15M",
    config_json: Optional[str] = None,
    methods: str = "adapter,adapter+sparse,adapter_v2,adapter_v2+sparse,lora,full",
    contexts: str = "256,1024,4096",
    micro_batch_sizes: str = "1",
    micro_batch_tokens: Optional[int] = None,
    quantize: str = "none",
    precisions: str = "32-true",
    checkpointing: str = "false",
    optimizer: str = "adamw",
    sparse_pattern: str = "shifted",
    sdpa: str = "flash",
    loss: str = "cross_entropy",
    device: str = "cpu",
    steps: int = 2,
    timed_steps: int = 1,
    threads: Optional[int] = None,
    timeout_s: float = 900.0,
    estimate_only: bool = False,
    find_max_context: bool = False,
    budget_gb: Optional[float] = None,
    min_context: int = 256,
    max_context: int = 131072,
    context_step: int = 128,
    rope_scaling: Optional[str] = None,
    out_dir: Path = Path("out/memory_sweep"),
) -> List[Dict[str, Any]]:
    """Sweep peak memory and speed of fine-tuning.

    Args:
        model_name: A known configuration (Config.from_name, e.g. stories15M, stories260K, 7B); null with config_json.
        config_json: JSON of Config fields: overrides for model_name, or the whole custom config without it,
            e.g. '{"name": "r58M", "n_layer": 8, "n_head": 8, "n_embd": 512, "intermediate_size": 1408}'.
        methods: Comma-separated: adapter, adapter+sparse, adapter_v2, adapter_v2+sparse, lora(+sparse), full(+sparse).
        contexts: Comma-separated context lengths (tokens per sequence).
        micro_batch_sizes: Comma-separated micro-batch sizes.
        micro_batch_tokens: Packing (--data.packing): every micro-batch is one packed row of this many tokens,
            examples of the context's length end to end; replaces micro_batch_sizes.
        quantize: Comma-separated quantizations of the frozen base: none, bnb.int8, bnb.nf4, bnb.nf4-dq, bnb.fp4.
        precisions: Comma-separated: 32-true, bf16-true, 16-true (weights, activations and trainable tensors).
        checkpointing: Comma-separated activation checkpointing settings (true, false).
        optimizer: adamw (torch) or adamw8bit (bitsandbytes).
        sparse_pattern: The pattern of the +sparse methods (local or shifted are estimated; any pattern runs).
        sdpa: Attention backend the estimate assumes: flash (fused kernels, the default) or math.
        loss: Comma-separated losses, as --train.loss: cross_entropy (the default), chunked, chunked_head.
        device: cpu or cuda.
        steps: Optimizer steps under memory measurement per cell (the first one creates the optimizer state).
        timed_steps: Further steps per cell, timed without the profiler.
        threads: torch.set_num_threads in each cell (default: torch's choice).
        timeout_s: Wall-clock limit per cell.
        estimate_only: Print and tabulate the analytic estimate without running anything.
        find_max_context: For each grid cell except the context, search the longest context within budget_gb.
        budget_gb: Memory budget (GB = 1e9 bytes) for find_max_context: measured peak (or the estimate).
        min_context: Where the search starts.
        max_context: Where the search stops doubling; never past the model's window (block_size, or the scaled
            window with rope_scaling), which is as far as training can go.
        context_step: Granularity of the bisection.
        rope_scaling: JSON of the RoPE scaling the runs would use, as --model.rope_scaling, e.g.
            '{"type": "linear", "factor": 4}': the window becomes factor x the pretrained one.
        out_dir: Where sweep.csv, sweep.md and sweep.png go.
    """
    from lit_adapter.memory import format_estimate, measure_framework_overhead

    overrides = json.loads(config_json) if config_json else {}
    scaling = json.loads(rope_scaling) if isinstance(rope_scaling, str) else rope_scaling
    if model_name is None and not overrides:
        raise UserError("pass --model_name or --config_json with a whole custom config")
    if find_max_context and budget_gb is None:
        raise UserError("--find_max_context needs --budget_gb")
    cells = build_cells(
        model_name, overrides, _split(methods), _split(contexts, int), _split(micro_batch_sizes, int),
        _split(precisions), [_quantize(q) for q in _split(quantize)], [_bool(c) for c in _split(checkpointing)],
        optimizer, sparse_pattern, device, steps, timed_steps, threads, sdpa, _split(loss), scaling,
    )
    if not cells:
        raise UserError("the grid is empty (full fine-tuning is skipped with a quantized base)")
    if micro_batch_tokens is not None:
        if micro_batch_tokens < 1:
            raise UserError(f"--micro_batch_tokens must be >= 1, got {micro_batch_tokens}")
        from dataclasses import replace

        first = cells[0].micro_batch_size  # the budget replaces the micro-batch sizes: one cell per other setting
        cells = [replace(c, micro_batch_size=1, micro_batch_tokens=micro_batch_tokens)
                 for c in cells if c.micro_batch_size == first]
    config = cells[0].model_config()
    title = (f"Memory sweep: {config.name or 'custom'} (n_embd {config.n_embd}, {config.n_layer} layers, "
             f"vocab {config.vocab_size}, window {config.describe_window()}) on {device}"
             + (" — estimates only" if estimate_only else ""))
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    summary: List[str] = []
    if find_max_context:
        rows = []
        seen = set()
        for cell in cells:
            key = (cell.method, cell.pattern, cell.quantize, cell.precision, cell.micro_batch_size,
                   cell.activation_checkpointing, cell.loss)
            if key in seen:
                continue
            seen.add(key)
            window = cell.model_config().block_size
            best, probes = search_max_context(cell, budget_gb, min(min_context, window), min(max_context, window),
                                              context_step, estimate_only, timeout_s)
            rows += probes
            limit = (f"the whole window of {config.describe_window()} fits" if best == window else
                     f"searched up to the window of {config.describe_window()}")
            line = (f"- {method_label(cell)}, B={cell.micro_batch_size}, {cell.precision}, "
                    f"quantize={cell.quantize or 'none'}, ckpt={cell.activation_checkpointing}, loss={cell.loss}: "
                    + (f"longest context within {budget_gb} GB: **{best}** tokens ({limit})" if best
                       else f"not even {min_context} tokens fit in {budget_gb} GB"))
            print(line)
            summary.append(line)
    else:
        if estimate_only:
            overhead = measure_framework_overhead() if device == "cpu" else 0
            for cell in cells:
                print(format_estimate(estimate_cell(cell, overhead)), end="\n\n")
        rows = run_grid(cells, estimate_only, timeout_s)
        beyond = sorted({r["context"] for r in rows if r["beyond_window"]})
        if beyond:
            line = (f"Contexts {', '.join(map(str, beyond))} exceed the model's window of {config.describe_window()}: "
                    "measured with the RoPE table grown to cover them; training needs --model.rope_scaling there.")
            print(line)
            summary.append(line)
        errors = [abs(r["est_error_pct"]) for r in rows if "est_error_pct" in r]
        if errors:
            line = (f"Estimator vs measurement over {len(errors)} cells: mean |error| "
                    f"{sum(errors) / len(errors):.1f}%, max {max(errors):.1f}%.")
            print(line)
            summary.append(line)
    summary.append(f"Sweep wall time: {time.perf_counter() - t0:.0f} s.")
    write_outputs(rows, out_dir, title, summary)
    print(f"wrote {out_dir / 'sweep.csv'}, {out_dir / 'sweep.md'} and {out_dir / 'sweep.png'}")
    return rows


if __name__ == "__main__":
    from jsonargparse import CLI, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    run_cli(CLI, main, as_positional=False)
