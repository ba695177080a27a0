"""The memory estimator against autograd, the CPU allocator and bitsandbytes; the memory-saving losses against
``F.cross_entropy``; the sweep script's outputs and its out-of-memory handling."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_adapter.model.config import Config
from lit_adapter.errors import UserError
from lit_adapter.memory import (
    Cell,
    build_random_model,
    estimate_memory,
    measure_in_subprocess,
    measure_saved_activations,
    measure_step,
    optimizer_state_bytes,
    quantized_linear_bytes,
    saved_activations,
)
from lit_adapter.tuners.registry import MethodSpec
from lit_adapter.train.losses import chunked_cross_entropy, chunked_loss_fn, loss_fn

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(name="small", block_size=256, vocab_size=1000, n_layer=3, n_head=4, n_embd=64, intermediate_size=192)


def _cell(**kwargs) -> Cell:
    overrides = {**SMALL, **kwargs.pop("config", {})}
    return Cell(model_name=None, config_overrides=overrides, **kwargs)


@pytest.mark.parametrize(
    "method, precision, pattern, attention, groups, quantize, B, T",
    [
        ("adapter", "32-true", "dense", {}, 4, None, 2, 48),
        ("adapter_v2", "bf16-true", "dense", {}, 2, None, 1, 48),
        ("lora", "32-true", "dense", {}, 2, "bnb.int8", 2, 48),
        ("lora", "bf16-true", "local", {"window": 16}, 4, None, 2, 37),
        ("adapter_v2", "32-true", "local", {"window": 40}, 4, "bnb.nf4", 1, 96),
        ("full", "32-true", "shifted", {}, 2, None, 3, 37),
        ("adapter", "bf16-true", "shifted", {"group_size": 10}, 4, None, 1, 96),
        ("full", "bf16-true", "local", {"window": 16}, 4, None, 1, 96),
    ],
)
def test_saved_activations_match_autograd(method, precision, pattern, attention, groups, quantize, B, T):
    """Every byte autograd keeps (saved tensors and bitsandbytes' context tensors), block by block."""
    cell = _cell(method=method, precision=precision, pattern=pattern, attention_overrides=attention,
                 quantize=quantize, seq_len=T, micro_batch_size=B, config={"n_query_groups": groups})
    model = build_random_model(cell, torch.device("cpu")).train()
    measured = measure_saved_activations(model, torch.randint(0, 1000, (B, T)))
    predicted = saved_activations(cell.config(), cell.spec(), B, T, precision)
    assert measured["layers"] == predicted["layers"]
    assert measured["head"] == predicted["head"]
    assert measured["embedding"] == predicted["embedding"]
    # log_softmax's output and the targets (full fine-tuning shares the targets' storage with the token ids)
    assert abs(measured["loss"] - predicted["loss"]) <= B * T * 8 + 64
    if method == "adapter":  # nothing below the first adapted layer needs a gradient
        assert measured["layers"][:2] == [0, 0]


@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_saved_activations_math_attention(method):
    """The math SDPA path keeps the (B, nh, T, T) probabilities: quadratic in T."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cell = _cell(method=method, seq_len=48, micro_batch_size=2, config={"n_query_groups": 2})
    model = build_random_model(cell, torch.device("cpu")).train()
    with sdpa_kernel(SDPBackend.MATH):
        measured = measure_saved_activations(model, torch.randint(0, 1000, (2, 48)))
    predicted = saved_activations(cell.config(), cell.spec(), 2, 48, sdpa="math")
    assert measured["layers"] == predicted["layers"]
    if method == "adapter":  # its frozen base attention keeps nothing; the prompt's scores are (T, prompt_length)
        return
    growth = {sdpa: saved_activations(cell.config(), cell.spec(), 2, 1024, sdpa=sdpa)["layers"][-1]
              / saved_activations(cell.config(), cell.spec(), 2, 512, sdpa=sdpa)["layers"][-1]
              for sdpa in ("flash", "math")}
    assert growth["flash"] == pytest.approx(2.0, rel=0.01) and growth["math"] > 3.2  # -> 4 as T grows


@pytest.mark.parametrize("mode", ["bnb.int8", "bnb.nf4", "bnb.nf4-dq"])
def test_quantized_weight_bytes_match_bitsandbytes(mode):
    from lit_adapter.model.quantize import quantize_linears

    model = nn.Sequential(nn.Linear(128, 192, bias=False))
    quantize_linears(model, mode, device=torch.device("cpu"))
    weight = model[0].weight
    tensors = [weight.data] + [getattr(weight, "SCB", None)]
    state = getattr(weight, "quant_state", None)
    while state is not None:
        tensors += [state.absmax, state.code, getattr(state, "offset", None)]
        state = state.state2
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if torch.is_tensor(t)}
    assert quantized_linear_bytes(128, 192, mode) == sum(storages.values())


def test_optimizer_state_bytes_match_torch_and_bitsandbytes():
    import bitsandbytes as bnb

    for dtype in (torch.float32, torch.bfloat16):
        params = [nn.Parameter(torch.randn(300, 20, dtype=dtype)), nn.Parameter(torch.randn(7, dtype=dtype))]
        optimizer = torch.optim.AdamW(params)
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer.step()
        state = sum(v.untyped_storage().nbytes() for s in optimizer.state.values() for v in s.values())
        assert optimizer_state_bytes(params, dtype, "adamw") == state
    # 8-bit AdamW runs on CPU: one byte per moment for tensors of >= 4096 elements, 32-bit state below that
    params = [nn.Parameter(torch.randn(512, 64)), nn.Parameter(torch.randn(100))]
    optimizer = bnb.optim.AdamW8bit(params)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    assert optimizer.state[params[0]]["state1"].dtype == torch.uint8
    state = sum(v.untyped_storage().nbytes() for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)
                and v.dim() > 0)
    assert optimizer_state_bytes(params, torch.float32, "adamw8bit") == state


@pytest.mark.parametrize(
    "cell",
    [
        # a 32k vocabulary: the logits and the loss dominate
        _cell(method="adapter_v2", seq_len=128, micro_batch_size=2, config={"vocab_size": 32000}),
        # a small vocabulary and long sequences: activations dominate; checkpointing recomputes one block
        _cell(method="lora", seq_len=512, micro_batch_size=1, activation_checkpointing=True,
              config={"vocab_size": 512, "n_embd": 128, "intermediate_size": 352}),
        _cell(method="full", seq_len=512, micro_batch_size=1, config={"vocab_size": 512}),
        _cell(method="adapter", seq_len=256, micro_batch_size=2, precision="bf16-true", pattern="shifted",
              config={"vocab_size": 4096}),
        # the head-chunked loss: Adapter v2's head (bias and scale) and full fine-tuning's head weight
        _cell(method="adapter_v2", seq_len=384, micro_batch_size=2, loss="chunked_head", config={"vocab_size": 32000}),
        _cell(method="full", seq_len=256, micro_batch_size=2, precision="bf16-true", loss="chunked_head",
              activation_checkpointing=True, config={"vocab_size": 32000}),
    ],
    ids=["adapter_v2-32k-vocab", "lora-checkpointed", "full", "adapter-bf16-shifted", "adapter_v2-chunked-head",
         "full-bf16-chunked-head-checkpointed"],
)
def test_estimate_within_15_percent_of_measured_cpu_peak(cell):
    """The estimate against the CPU allocator's peak of live bytes over real optimizer steps."""
    cell.steps, cell.timed_steps = 2, 0
    measured = measure_step(cell)
    estimate = estimate_memory(cell.config(), cell.spec(), cell.micro_batch_size, cell.seq_len, cell.precision,
                               activation_checkpointing=cell.activation_checkpointing, loss=cell.loss)
    error = estimate["peak_bytes"] / measured["peak_bytes"] - 1
    print(f"measured {measured['peak_bytes']:,} estimated {estimate['peak_bytes']:,} ({100 * error:+.2f}%)")
    assert measured["peak_kind"] == "cpu_allocator_peak"
    assert abs(error) < 0.15
    assert measured["rss_net_bytes"] >= 0 and measured["tokens_per_s"] > 0  # RSS net is meaningful in a fresh process


def test_7b_adapter_v2_nf4_checkpointed_estimate_fits_24gb():
    config = Config.from_name("7B")
    spec = MethodSpec("adapter_v2", quantize="bnb.nf4")
    est = estimate_memory(config, spec, micro_batch_size=4, seq_len=1024, dtype="bf16-true",
                          activation_checkpointing=True, device_type="cuda")
    assert est["peak_bytes"] < 24e9
    # independent counts: every block linear in NF4 (half a byte per weight plus a float32 absmax per 64), the
    # embedding, the unquantized head and the norms in bfloat16
    C, I, L, V = 4096, 11008, 32, 32000
    linears = L * (4 * C * C + 3 * C * I)
    assert est["weights_by_kind_bytes"]["nf4"] == L * (4 * quantized_linear_bytes(C, C, "bnb.nf4")
                                                       + 3 * quantized_linear_bytes(C, I, "bnb.nf4"))
    assert est["weights_by_kind_bytes"]["nf4"] == pytest.approx(linears * (0.5 + 4 / 64), rel=1e-5)
    prompts, gates, norms = 30 * 10 * C, 30 * 32, (2 * L + 1) * C
    v2_bias_scale = 2 * (L * (4 * C + 2 * I + C) + V)  # q, k, v, o, gate, up, down and the head
    assert est["trainable_params"] == prompts + gates + norms + v2_bias_scale
    assert est["weights_by_kind_bytes"]["bfloat16"] == 2 * (2 * V * C + norms + prompts + gates + v2_bias_scale)
    assert est["activations_bytes"] == L * 4 * 1024 * C * 2  # one bfloat16 block input per checkpointed block
    without = estimate_memory(config, spec, 4, 1024, "bf16-true", activation_checkpointing=False, device_type="cuda")
    assert without["peak_bytes"] > 24e9 > est["peak_bytes"]


def test_training_and_chunked_losses_equal_cross_entropy():
    torch.manual_seed(0)
    B, T, V = 3, 37, 101
    labels = torch.randint(0, V, (B, T))
    labels[0, :5] = -100
    # float64 logits against F.cross_entropy on the same rows
    logits = torch.randn(B, T, V, dtype=torch.float64, requires_grad=True)
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)
    reference = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1))
    chunked = chunked_cross_entropy(logits, targets, chunk_size=8)
    torch.testing.assert_close(chunked, reference, rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(chunked, logits)[0], torch.autograd.grad(reference, logits)[0],
                               rtol=0, atol=1e-15)
    # the engine's fused cross-entropy: value and gradient of F.cross_entropy, a fully ignored row included
    labels64 = labels.clone()
    labels64[1] = -100
    targets64 = F.pad(labels64[:, 1:], (0, 1), value=-100)
    reference = F.cross_entropy(logits.reshape(-1, V), targets64.reshape(-1))
    value, count = loss_fn(logits, labels64)
    assert count == int((targets64 != -100).sum())
    torch.testing.assert_close(value, reference, rtol=0, atol=1e-14)
    torch.testing.assert_close(torch.autograd.grad(value, logits, retain_graph=True)[0],
                               torch.autograd.grad(reference, logits)[0], rtol=0, atol=1e-15)
    # its backward consumes the saved log-probabilities: a second pass is autograd's loud error, not a wrong grad
    with pytest.raises(RuntimeError, match="inplace operation"):
        torch.autograd.grad(value, logits)
    # the training loss (labels shifted) and the chunked one against the textbook form that shifts the logits
    for dtype, atol in ((torch.float32, 1e-6), (torch.bfloat16, 1e-5)):
        logits = torch.randn(B, T, V).to(dtype).requires_grad_()
        expected = F.cross_entropy(logits[:, :-1].reshape(-1, V).float(), labels[:, 1:].reshape(-1))
        n = int((labels[:, 1:] != -100).sum())
        grad = torch.autograd.grad(expected, logits)[0]
        for fn in (loss_fn, lambda x, y: chunked_loss_fn(x, y, chunk_size=5)):
            value, count = fn(logits, labels)
            assert count == n == int((labels[:, 1:] != -100).sum())
            torch.testing.assert_close(value, expected, rtol=0, atol=atol)
            g = torch.autograd.grad(value, logits)[0]
            assert g.dtype == dtype
            torch.testing.assert_close(g.float(), grad.float(), rtol=0, atol=atol)
    # hidden states + head: the logits are never materialized whole; gradients reach the head's parameters
    head = nn.Linear(16, V, bias=True).double()
    hidden = torch.randn(B, T, 16, dtype=torch.float64, requires_grad=True)
    reference = F.cross_entropy(head(hidden).reshape(-1, V), targets.reshape(-1))
    chunked = chunked_cross_entropy(hidden, targets, chunk_size=5, head=head)
    torch.testing.assert_close(chunked, reference, rtol=0, atol=1e-12)
    for a, b in zip(torch.autograd.grad(chunked, [hidden, head.weight, head.bias]),
                    torch.autograd.grad(reference, [hidden, head.weight, head.bias])):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)
    with pytest.raises(UserError, match="chunk_size"):
        chunked_cross_entropy(logits, targets, chunk_size=0)


def test_memory_saving_losses_lower_the_measured_peak_as_estimated():
    peaks, estimates = {}, {}
    for loss in ("cross_entropy", "chunked", "chunked_head"):
        cell = _cell(method="lora", seq_len=256, micro_batch_size=2, precision="bf16-true", loss=loss, steps=2,
                     timed_steps=0, config={"vocab_size": 32000, "n_layer": 2})
        peaks[loss] = measure_step(cell)["peak_bytes"]
        estimates[loss] = estimate_memory(cell.config(), cell.spec(), 2, 256, "bf16-true", loss=loss)["peak_bytes"]
        assert abs(estimates[loss] / peaks[loss] - 1) < 0.15
    # bf16 logits: the engine's loss holds a float32 copy and the float32 log-probabilities, chunking neither
    assert peaks["chunked"] < 0.7 * peaks["cross_entropy"]
    assert peaks["chunked"] / peaks["cross_entropy"] == pytest.approx(
        estimates["chunked"] / estimates["cross_entropy"], abs=0.05)
    # the head-chunked loss never has the (B, T, V) logits (here 2 chunks of 256 rows: half of them at a time)
    assert peaks["chunked_head"] < 0.9 * peaks["chunked"]
    assert peaks["chunked_head"] / peaks["chunked"] == pytest.approx(
        estimates["chunked_head"] / estimates["chunked"], abs=0.05)


def test_out_of_memory_is_a_result():
    cell = Cell(method="lora", model_name="stories260K", seq_len=4096, micro_batch_size=8, memory_limit_gb=0.05)
    result = measure_in_subprocess(cell, timeout_s=300)
    assert result["status"] == "oom", result
    assert "allocate" in result["error"]


def _sweep_module():
    spec = importlib.util.spec_from_file_location("memory_sweep", REPO / "scripts" / "memory_sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sweep_measures_estimates_and_searches(tmp_path):
    sweep = _sweep_module()
    rows = sweep.main(model_name="stories260K", methods="lora,adapter_v2+sparse", contexts="128", steps=2,
                      timed_steps=0, out_dir=tmp_path / "grid")
    assert [r["status"] for r in rows] == ["ok"] * 2
    for row in rows:
        assert row["peak_kind"] == "cpu_allocator_peak" and abs(row["est_error_pct"]) < 15
        assert row["rss_peak_gb"] > row["rss_net_gb"] >= 0  # net is 0 while a tiny run stays under the import peak
    for name in ("sweep.csv", "sweep.md", "sweep.png"):
        assert (tmp_path / "grid" / name).stat().st_size > 0
    assert "adapter_v2+sparse" in (tmp_path / "grid" / "sweep.md").read_text()

    # the search on estimates stops at the model's window (LLaMA 7B: 2048) and says so
    rows = sweep.main(model_name="7B", methods="adapter_v2", quantize="bnb.nf4", precisions="bf16-true",
                      checkpointing="true", micro_batch_sizes="4", device="cuda", estimate_only=True,
                      find_max_context=True, budget_gb=24, context_step=256, out_dir=tmp_path / "window")
    assert max(r["context"] for r in rows) == 2048
    assert "**2048** tokens (the whole window of 2048 tokens fits)" in (tmp_path / "window" / "sweep.md").read_text()
    # with RoPE scaling (x8: a 16384-token window) the answer fits, one more step does not
    scaling = {"type": "linear", "factor": 8}
    rows = sweep.main(model_name="7B", methods="adapter_v2", quantize="bnb.nf4", precisions="bf16-true",
                      checkpointing="true", micro_batch_sizes="4", device="cuda", estimate_only=True,
                      find_max_context=True, budget_gb=24, context_step=256, rope_scaling=json.dumps(scaling),
                      out_dir=tmp_path / "search")
    fitting = [r["context"] for r in rows if r["est_peak_gb"] <= 24]
    best = max(fitting)
    config, spec = Config.from_name("7B").with_rope_scaling(scaling), MethodSpec("adapter_v2", quantize="bnb.nf4")
    over = estimate_memory(config, spec, 4, best + 256, "bf16-true", activation_checkpointing=True, device_type="cuda")
    assert 2048 < best < 16384 and over["peak_bytes"] > 24e9
    assert f"**{best}** tokens (searched up to the window of 16384 tokens (linear x8" in (
        tmp_path / "search" / "sweep.md").read_text()
    with pytest.raises(UserError, match="seq_len=4096 exceeds the model's window, block_size=2048"):
        estimate_memory(Config.from_name("7B"), spec, 4, 4096, "bf16-true")


def test_user_mistakes_are_one_line_errors(tmp_path):
    config = Config.from_name("stories260K")
    with pytest.raises(UserError, match="strided"):
        estimate_memory(config, MethodSpec("lora", attention={"pattern": "strided"}), 1, 64)
    with pytest.raises(UserError, match="optimizer"):
        estimate_memory(config, MethodSpec("lora"), 1, 64, optimizer="sgd")
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "memory_sweep.py"), "--methods", "qlora",
                           "--estimate_only", "true", "--out_dir", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: unknown method 'qlora'")
    assert "Traceback" not in proc.stderr
