"""benchmarks/gpu_suite.py at tiny sizes on CPU: the whole run as a subprocess (its JSON, its tables, every cell's
status and numbers, the sparse equality results), its launchers, its budget guard, its FLOPs formula and its errors.
"""

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_suite.py"


def _suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_suite"] = module  # the fork server's children unpickle their target by this name
    spec.loader.exec_module(module)
    return module


def _run(*args, timeout=120):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_suite")
    t0 = time.perf_counter()
    proc = _run("--device", "cpu", "--tiny", "--out", out)
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "gpu_suite.json").read_text()), (out / "gpu_suite.md").read_text(), proc.stdout, wall


def test_tiny_run_measures_every_cell(tiny_run):
    state, md, stdout, wall = tiny_run
    # ~20-26 s on 2 quiet cores; the bound leaves room for a shared machine (90 s measured at load average 7)
    assert wall < 180, f"the tiny CPU run took {wall:.0f} s"
    assert state["complete"] and state["settings"]["cells"] == 24 and state["settings"]["precision"] == "32-true"
    env = state["environment"]
    for key in ("device_name", "driver", "torch", "cuda", "bitsandbytes", "date", "git_commit"):
        assert key in env
    assert env["torch"] == torch.__version__ and env["driver"] == "n/a (CPU)"

    cells = state["cells"]
    grid = {(c["method"], c["context"], c["quantize"], c["checkpointing"]) for c in cells}
    assert grid == {(m, T, q, ck) for m in ("adapter", "adapter_v2") for T in (128, 256)
                    for q in ("none", "bnb.int8", "bnb.nf4") for ck in (False, True)}
    for c in cells:
        assert c["status"] == "ok", c
        assert c["allocated_kind"] == "cpu_allocator_peak" and c["allocated_bytes"] > 1e6
        assert c["reserved_bytes"] is None and c["mfu_pct"] is None  # no CPU counterpart; no CPU peak given
        assert c["step_time_s"] > 0 and c["tokens_per_s"] == pytest.approx(4 * c["context"] / c["step_time_s"])
        assert c["flops_per_token"] > 0 and c["achieved_tflops"] > 0
        # Honest bounds for the estimator at these sizes: within 6% without quantization and with NF4; an int8 base
        # is under-estimated on CPU (docs/memory.md's unsettled int8 gap), by 9-16%, 34-36% for v2 + checkpointing.
        # v2's fused epilogue (the default) on a plain base with checkpointing is over-estimated by 9-10%: its
        # down_proj keeps its (N, I) input, which the block's backward frees before the SwiGLU backward peaks,
        # while the estimator counts a block's whole saved set as alive then (unfused: +4%).
        if c["quantize"] == "bnb.int8":
            assert -40 < c["est_error_pct"] < 0, c
        elif c["method"] == "adapter_v2" and c["quantize"] == "none" and c["checkpointing"]:
            assert 0 < c["est_error_pct"] < 12, c
        else:
            assert abs(c["est_error_pct"]) < 6, c
    by = {(c["method"], c["context"], c["quantize"], c["checkpointing"]): c for c in cells}
    for key, c in by.items():  # checkpointing saves memory, v2 trains more than v1, longer contexts cost more
        if key[3]:
            assert c["allocated_bytes"] < by[key[:3] + (False,)]["allocated_bytes"]
        if key[1] == 256:
            assert c["allocated_bytes"] > by[(key[0], 128) + key[2:]]["allocated_bytes"]
    assert by[("adapter_v2", 256, "none", False)]["allocated_bytes"] > by[("adapter", 256, "none", False)][
        "allocated_bytes"]

    sparse = state["sparse"]
    assert [(r["T"], r["attention"]) for r in sparse] == [
        (T, a) for T in (512, 1024) for a in ("dense", "local", "strided", "fixed", "shifted")]
    for r in sparse:
        assert r["status"] == "ok" and r["ms"] > 0 and r["peak_mib"] > 0 and r["vs_dense"] > 0, r
        if r["attention"] != "dense":
            assert r["equal"] is True and max(r["max_rel_err"].values()) < 1e-5, r
            assert set(r["max_rel_err"]) == {"out", "dq", "dk", "dv"}

    # packed vs padded at Dolly lengths (tiny: cap 128, LoRA): the same examples, the padded side ~86% real tokens
    packing = state["packing"]
    assert [(r["cap"], r["method"], r["side"]) for r in packing] == [(128, "lora", "padded"), (128, "lora", "packed")]
    padded, packed = packing
    assert padded["status"] == "ok" and 0.5 < padded["real_share"] < 1 and padded["real_tokens_per_s"] > 0
    if packed["status"] == "ok":  # a checkout with --data.packing
        assert packed["real_share"] == 1 and packed["packed_vs_padded"] > 0
    else:
        assert packed["status"] == "skipped (no packing in this checkout)"
    assert "## Packed vs padded at Dolly lengths" in md and "| packed / padded |" in md

    for header in ("allocated GB", "reserved GB", "estimate GB", "est. error %", "step s", "tokens/s", "MFU %"):
        assert header in md
    assert "| equal to masked dense (fp32) |" in md and stdout.strip() == md.strip()
    cell_lines = [line for line in md.splitlines() if line.startswith("| tiny-suite |")]
    assert len(cell_lines) == 24 and all(line.count("|") == 16 for line in cell_lines)
    assert "32-true" in md and "reserved has no CPU counterpart" in md


def test_spawn_launcher_is_the_same_measurement(tiny_run, tmp_path):
    """memory.measure_in_subprocess (the CUDA launcher) and the CPU fork server measure the same peaks (to a few
    hundred bytes of small tensors)."""
    proc = _run("--device", "cpu", "--tiny", "--launcher", "spawn", "--methods", "adapter_v2", "--quantize", "none",
                "bnb.nf4", "--checkpointing", "true", "--contexts", "128", "--sparse_contexts", "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    spawned = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert spawned["settings"]["launcher"] == "spawn" and spawned["sparse"] == []
    forked = {(c["method"], c["context"], c["quantize"], c["checkpointing"]): c for c in tiny_run[0]["cells"]}
    for c in spawned["cells"]:
        assert c["status"] == "ok"
        same = forked[(c["method"], c["context"], c["quantize"], c["checkpointing"])]
        assert c["allocated_bytes"] == pytest.approx(same["allocated_bytes"], abs=4096)  # a few small tensors differ


def test_forked_cell_out_of_memory_is_a_result():
    from lit_adapter.memory import Cell

    suite = _suite()
    cell = Cell(method="lora", model_name="stories260K", seq_len=4096, micro_batch_size=8, memory_limit_gb=0.05)
    result = suite.measure_forked(cell, timeout_s=120)
    assert result["status"] == "oom", result
    assert suite.measure_forked(Cell(method="adapter", model_name="stories260K", seq_len=64), 1e-3)["status"] == \
        "timeout"


def test_gpu_run_orchestration(monkeypatch, tmp_path, capsys):
    """The --device cuda run with its 7B grid, the child's results faked (this machine has no GPU): cells, order,
    estimates, FLOPs, MFU from the device name the child reports (no nvidia-smi here), an OOM cell, the sparse jobs."""
    import lit_adapter.memory as memory

    suite = _suite()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(suite, "_command", lambda *cmd: None)  # as without nvidia-smi and git
    cells, jobs, packing_jobs = [], [], []

    def fake_measure(cell, timeout_s):
        cells.append(cell)
        if cell.seq_len == 1024 and cell.quantize is None and not cell.activation_checkpointing:
            return {"status": "oom", "error": "CUDA out of memory. Tried to allocate 1.00 GiB"}
        tokens = cell.micro_batch_size * cell.seq_len
        return dict(status="ok", peak_bytes=10**10, reserved_bytes=11 * 10**9, peak_kind="cuda_max_memory_allocated",
                    step_time_s=0.5, tokens_per_s=tokens / 0.5, device_name="NVIDIA H200")

    def fake_sparse(job, timeout_s):
        jobs.append(job)
        return [dict(T=job["T"], attention=a, status="ok", ms=1.0, vs_dense=1.0, peak_mib=1.0)
                for a in ("dense", "local", "strided", "fixed", "shifted")]

    def fake_packing(job, timeout_s):
        packing_jobs.append(job)
        return [dict(cap=job["cap"], method=job["method"], side=side, status="ok", real_tokens_per_s=rate)
                for side, rate in (("padded", 1000.0), ("packed", 1800.0))]

    monkeypatch.setattr(memory, "measure_in_subprocess", fake_measure)
    monkeypatch.setattr(suite.gpu_suite_packing, "run", fake_packing)
    monkeypatch.setattr(suite.gpu_suite_sparse, "run", fake_sparse)
    state = suite.main(["--device", "cuda", "--out", str(tmp_path)])
    assert [j["T"] for j in jobs] == [4096, 8192, 16384]
    # packed vs padded: Dolly's caps, v1, v2, LoRA and QLoRA on the 7B suite's settings
    assert [(j["cap"], j["method"]) for j in packing_jobs] == [
        (cap, m) for cap in (512, 1024) for m in ("adapter", "adapter_v2", "lora", "qlora")]
    assert all(j["device"] == "cuda" and not j["tiny"] and j["precision"] == "bf16-true" and j["micro_batch_size"] == 4
               for j in packing_jobs)
    assert len(state["packing"]) == 16 and "| 512 | qlora | packed |" in (tmp_path / "gpu_suite.md").read_text()
    assert all(j["dtype"] == "bfloat16" and j["shape"] == (32, 128) and j["device"] == "cuda" for j in jobs)
    assert len(cells) == 24 and {c.model_name for c in cells} == {"7B"} and {c.device for c in cells} == {"cuda"}
    assert [c.quantize for c in cells[::8]] == [None, "bnb.nf4", "bnb.int8"]  # int8, the slowest, last
    assert all(c.precision == "bf16-true" and c.micro_batch_size == 4 and (c.steps, c.timed_steps) == (2, 3)
               for c in cells)
    assert state["settings"]["launcher"] == "spawn" and state["settings"]["peak_tflops"] == 989.4
    assert state["environment"]["device_name"] == "NVIDIA H200"
    rows = state["cells"]
    assert [r["status"] for r in rows].count("oom") == 2 and [r["status"] for r in rows].count("ok") == 22
    for r in rows:
        assert r["estimate_bytes"] > 5e9 and r["flops_per_token"] > 2.5e10
        if r["status"] == "ok":
            assert r["reserved_bytes"] == 11 * 10**9
            assert r["mfu_pct"] == pytest.approx(100 * r["tokens_per_s"] * r["flops_per_token"] / 989.4e12)
            assert r["est_error_pct"] == pytest.approx(100 * (r["estimate_bytes"] / 1e10 - 1))
    md = (tmp_path / "gpu_suite.md").read_text()
    assert "MFU against 989.4 TFLOPS" in md and md.count("| 7B |") == 24 and "| oom |" in md
    assert md.strip() in capsys.readouterr().out


def test_budget_skips_what_would_not_fit():
    suite = _suite()
    now = [0.0]
    budget = suite.Budget(25.0, clock=lambda: now[0])
    timeouts, reports = [], []

    def run(item, timeout):
        timeouts.append(timeout)
        now[0] += 10.0 if item != "slow" else 2.0
        return "done"

    # 0 -> 10 -> 20 s; then 5 s are left and the slowest item so far took 10 s
    budget.run(["a", "b", "c"], run, 100.0, lambda item, result, wall: reports.append((item, result, wall)))
    assert reports == [("a", "done", 10.0), ("b", "done", 10.0), ("c", None, 0.0)]
    assert timeouts == [25.0, 15.0]  # the time left caps each timeout


def test_flops_formula_equals_flop_counter_on_the_math_path():
    """With non-causal counting the formula is exactly what torch.utils.flop_counter sees (mm and bmm)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from lit_adapter.memory import Cell, build_random_model
    from lit_adapter.train.losses import forward_loss

    suite = _suite()
    B, T = 2, 48
    for groups in (4, 2):
        for method in ("adapter", "adapter_v2", "full"):
            cell = Cell(method=method, model_name=None, seq_len=T, micro_batch_size=B,
                        config_overrides=dict(suite.TINY_CONFIG, n_query_groups=groups))
            model = build_random_model(cell, torch.device("cpu")).train()
            batch = torch.randint(0, 512, (B, T))
            with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
                forward_loss(model, batch, batch)[0].backward()
            s = cell.spec().settings
            prompt = (s.prompt_length, s.start_layer) if s else (0, 0)
            predicted = suite.train_flops_per_token(cell.config(), method, T, B, *prompt, causal=False)
            assert predicted == pytest.approx(counter.get_total_flops() / (B * T), rel=1e-12), (method, groups)
    seven_b = Cell(model_name="7B").config()
    n = 32 * (4 * 4096**2 + 3 * 4096 * 11008) + 4096 * 32000  # non-embedding weights, head included
    assert suite.train_flops_per_token(seven_b, "full", 512, 4) == pytest.approx(6 * n + 3 * 32 * 2 * 4096 * 513)
    assert 3.8 * n < suite.train_flops_per_token(seven_b, "adapter", 512, 4) < 4.1 * n
    assert 4.0 * n < suite.train_flops_per_token(seven_b, "adapter_v2", 1024, 4) < 4.2 * n


def test_peak_table():
    suite = _suite()
    assert suite.peak_tflops_of("NVIDIA H200") == 989.4
    assert suite.peak_tflops_of("NVIDIA H100 80GB HBM3") == 989.4
    assert suite.peak_tflops_of("NVIDIA H100 PCIe") == 756.5
    assert suite.peak_tflops_of("NVIDIA A100-SXM4-80GB") == 312.0
    assert suite.peak_tflops_of("NVIDIA H200 NVL") is None and suite.peak_tflops_of("Tesla T4") is None


@pytest.mark.parametrize("args, message", [
    (["--device", "tpu"], "invalid choice: 'tpu'"),
    (["--tiny", "--budget_s", "-1"], "--budget_s must be positive"),
    (["--tiny", "--quantize", "bnb.fp8"], "invalid choice: 'bnb.fp8'"),
    (["--tiny", "--device", "cuda", "--launcher", "fork"], "--launcher fork is for CPU only"),
    (["--tiny", "--device", "cuda"] if not torch.cuda.is_available() else ["--contexts", "1"], "--device cuda, but"
     if not torch.cuda.is_available() else "contexts must be at least 2"),
])
def test_bad_arguments_give_one_line(args, message):
    proc = _run(*args, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ") and message in proc.stderr, proc.stderr


def test_packing_cells_use_dollys_real_lengths_and_differ_in_one_flag(monkeypatch):
    """The lengths are the 15,011 Dolly examples (the issue's 56% / 51% real-token shares for micro-batches of 4 at
    512 / 1024); the two sides hold the same examples, padded or packed; without packing the packed side says so."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_suite_packing as packing

    for cap, share in ((512, 0.56), (1024, 0.51)):
        lengths = packing.dolly_lengths(cap)
        assert len(lengths) == 15011 and max(lengths) == cap
        batches = packing.micro_batches(lengths, 1000, 4, seed=0, vocab=32000)
        real = sum(len(ex["input_ids"]) for b in batches for ex in b)
        assert real / sum(4 * max(len(ex["input_ids"]) for ex in b) for b in batches) == pytest.approx(share, abs=0.02)
    batch = packing.micro_batches(packing.dolly_lengths(512), 1, 4, seed=0, vocab=32000)[0]
    padded = packing.collate("padded", batch, "cpu")
    assert padded["input_ids"].shape == (4, max(len(ex["input_ids"]) for ex in batch))
    assert int((padded["labels"] != -100).sum()) == sum(len(ex["input_ids"]) for ex in batch)
    if packing.packing_available():
        packed = packing.collate("packed", batch, "cpu")
        assert packed["input_ids"].shape == (1, sum(len(ex["input_ids"]) for ex in batch))
    monkeypatch.setattr(packing, "packing_available", lambda: False)
    rows = packing.measure(dict(device="cpu", cap=64, method="lora", tiny=True, steps=1, timed_steps=1, threads=1))
    assert [r["status"] for r in rows] == ["ok", packing.NO_PACKING]
