"""The GPU suite's 2-GPU cells (issue 24): sharded QLoRA and LoRA under ``--fabric.strategy fsdp`` on 2 GPUs against
one GPU, per-device peak memory beside the estimate for one process of N. For a lend with several GPUs.

    python benchmarks/gpu_suite_fsdp.py --out out/gpu_suite_fsdp          # 2 GPUs: 7B, bf16-true, checkpointing
    python benchmarks/gpu_suite_fsdp.py --device cpu --tiny               # the same code on 2 CPU processes (gloo)

Why a script beside gpu_suite.py and not cells inside it: a sharded cell is several processes that Fabric starts
itself, so each cell is ``benchmarks/fsdp_memory.py`` run as a command (one JSON row per rank), not a function the
suite's one-process cell runner can call. On a machine with fewer than 2 CUDA devices every cell is a row with
status ``skipped (needs 2 GPUs, found N)`` and the script exits 0, so one command serves every lend.
Cells: LLaMA 7B (random weights, ``Config.from_name("7B")``) with LoRA on a bnb.nf4 base (QLoRA) and with plain
LoRA, 512 tokens, micro-batch 1, bf16-true, activation checkpointing, on 1 GPU and sharded over 2: per rank
``max_memory_allocated`` over 2 optimizer steps and the estimate (``estimate_memory(..., shards=N)``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

REPO = Path(__file__).resolve().parents[1]


def cells(tiny: bool, device: str) -> List[Dict[str, Any]]:
    model = "stories260K" if tiny else "7B"
    precision = "32-true" if device == "cpu" else "bf16-true"
    seq_len = 128 if tiny else 512
    return [dict(method="lora", quantize=q, model_name=model, precision=precision, seq_len=seq_len, devices=n)
            for q in ("bnb.nf4", None) for n in (1, 2)]


def run_cell(cell: Dict[str, Any], device: str, timeout_s: float) -> List[Dict[str, Any]]:
    cmd = [sys.executable, str(REPO / "benchmarks" / "fsdp_memory.py"), "--accelerator", device,
           "--devices", str(cell["devices"]), "--method", cell["method"], "--model_name", cell["model_name"],
           "--precision", cell["precision"], "--seq_len", str(cell["seq_len"]), "--activation_checkpointing"]
    if cell["quantize"]:
        cmd += ["--quantize", cell["quantize"]]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return [dict(cell, status=f"timeout ({timeout_s:.0f} s)")]
    rows = [dict(cell, status="ok", **json.loads(line)) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not rows:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
        return [dict(cell, status=f"failed: {last}")]
    return sorted(rows, key=lambda r: r["rank"])


def gpus() -> int:
    import torch

    return torch.cuda.device_count()


def main(argv=None) -> List[Dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="stories260K and 128 tokens instead of 7B and 512")
    parser.add_argument("--out", type=Path, default=None, help="writes gpu_suite_fsdp.json there")
    parser.add_argument("--cell_timeout_s", type=float, default=300.0)
    args = parser.parse_args(argv)
    rows: List[Dict[str, Any]] = []
    found = None
    if args.device == "cuda":
        found = gpus()
    for cell in cells(args.tiny, args.device):
        if found is not None and found < cell["devices"]:
            rows.append(dict(cell, status=f"skipped (needs {cell['devices']} GPUs, found {found})"))
        else:
            rows += run_cell(cell, args.device, args.cell_timeout_s)
        row = rows[-1]
        print(f"{cell['method']} q={cell['quantize']} x{cell['devices']}: {row['status']}"
              + (f", rank {row['rank']} {row['measured_peak_gb']:.3f} GB, estimate {row['estimate_gb']:.3f} GB"
                 if row["status"] == "ok" else ""), file=sys.stderr, flush=True)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_suite_fsdp.json").write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    print(json.dumps(main()))
