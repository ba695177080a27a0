import math
from dataclasses import asdict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lit_adapter.model.tiled_attention as tiled
from lit_adapter.model.attention import (
    AttentionConfig,
    FixedAttention,
    LocalAttention,
    ShiftedSparseAttention,
    SparseAttention,
    StridedAttention,
    apply_attention,
    build_attention_kernel,
)
from lit_adapter.model.config import Config
from lit_adapter.errors import UserError
from lit_adapter.memory import AllocatorPeak
from lit_adapter.model.gpt import GPT, CausalSelfAttention
from test_adapter import build as build_adapter, set_gates

NH = 4  # query heads in the kernel tests


KERNELS = {
    "local-1": lambda: LocalAttention(1),
    "local-5": lambda: LocalAttention(5),
    "local-16": lambda: LocalAttention(16),
    "strided-4": lambda: StridedAttention(4),
    "strided-7": lambda: StridedAttention(7),
    "fixed-8-2": lambda: FixedAttention(8, 2),
    "fixed-6-1": lambda: FixedAttention(6, 1),
    "shifted-8": lambda: ShiftedSparseAttention(8, NH),
    "shifted-5": lambda: ShiftedSparseAttention(5, NH),
}
# every pattern on both paths: the fused CPU flash kernel and the plain matmul fallback (other devices, float16)
KERNEL_PATHS = [
    pytest.param(name, fused, id=f"{name}-{'fused' if fused else 'plain'}")
    for name in sorted(KERNELS)
    for fused in (True, False)
]


def qkv(T, B=2, n_kv=NH, hs=8, dtype=torch.float32):
    """Leaf q (B, NH, T, hs) and k, v (B, n_kv, T, hs); the returned k, v are expanded to NH heads like GQA."""
    q = torch.randn(B, NH, T, hs, dtype=dtype, requires_grad=True)
    k = torch.randn(B, n_kv, T, hs, dtype=dtype, requires_grad=True)
    v = torch.randn(B, n_kv, T, hs, dtype=dtype, requires_grad=True)
    expand = lambda t: t.repeat_interleave(NH // n_kv, dim=1)  # noqa: E731
    return (q, k, v), (q, expand(k), expand(v))


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


# ---------------------------------------------------------------------------------------------------------------
# the patterns themselves, against the papers' definitions


def paper_visible(name, kernel, head, i, j):
    """Brute-force definitions written from the papers, one (head, query, key) at a time."""
    if j > i:
        return False
    if isinstance(kernel, LocalAttention):
        return i - j < kernel.window
    if isinstance(kernel, StridedAttention):  # Child et al. eq. (A1 ∪ A2): t = max(0, i - l)
        l = kernel.stride
        return j >= max(0, i - l) or (i - j) % l == 0
    if isinstance(kernel, FixedAttention):  # A1: same block; A2: j mod l in {l - c, ..., l - 1}
        l, c = kernel.block_size, kernel.summary_size
        return j // l == i // l or j % l >= l - c
    G = kernel.group_size  # shifted: the second half of the heads starts its groups at G // 2
    if head < kernel.num_heads // 2:
        return j // G == i // G
    s = G // 2
    group = lambda p: -1 if p < s else (p - s) // G  # noqa: E731
    return group(i) == group(j)


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_dense_mask_matches_paper_definitions(name):
    kernel, T = KERNELS[name](), 23
    mask = kernel.dense_mask(NH, T).expand(NH, T, T)
    expected = torch.tensor(
        [[[paper_visible(name, kernel, h, i, j) for j in range(T)] for i in range(T)] for h in range(NH)]
    )
    assert torch.equal(mask, expected)
    assert mask.diagonal(dim1=1, dim2=2).all()  # every query sees itself, so no row is empty


def test_dense_mask_examples():
    assert torch.arange(10)[StridedAttention(3).dense_mask(1, 10)[0, 7]].tolist() == [1, 4, 5, 6, 7]
    assert torch.arange(10)[FixedAttention(4, 1).dense_mask(1, 10)[0, 9]].tolist() == [3, 7, 8, 9]
    assert torch.arange(10)[LocalAttention(3).dense_mask(1, 10)[0, 5]].tolist() == [3, 4, 5]
    shifted = ShiftedSparseAttention(4, 2).dense_mask(2, 10)
    assert torch.arange(10)[shifted[0, 5]].tolist() == [4, 5]
    assert torch.arange(10)[shifted[1, 5]].tolist() == [2, 3, 4, 5]
    assert torch.arange(10)[shifted[1, 1]].tolist() == [0, 1]


def test_shifted_matches_longlora_roll_except_wraparound():
    """LongLoRA's S²-Attn: roll the second half of the heads by -G/2, causal attention in groups, roll back.

    Without the wrap-around both agree; the first G/2 tokens of the shifted heads differ, because LongLoRA puts
    them into the last group (after the latest tokens), where they see the future.
    """
    B, T, G, hs = 2, 32, 8, 8
    (q, k, v), _ = qkv(T, B=B, hs=hs)
    half, s = NH // 2, G // 2

    def longlora(q, k, v):
        rolled = [torch.cat([t[:, :half], t[:, half:].roll(-s, dims=2)], dim=1) for t in (q, k, v)]
        grouped = [t.reshape(B, NH, T // G, G, hs) for t in rolled]
        out = F.scaled_dot_product_attention(*grouped, is_causal=True).reshape(B, NH, T, hs)
        return torch.cat([out[:, :half], out[:, half:].roll(s, dims=2)], dim=1)

    ours, theirs = ShiftedSparseAttention(G, NH)(q, k, v), longlora(q, k, v)
    torch.testing.assert_close(ours[:, :, s:], theirs[:, :, s:], atol=1e-6, rtol=0)
    torch.testing.assert_close(ours[:, :half], theirs[:, :half], atol=1e-6, rtol=0)
    assert (ours[:, half:, :s] - theirs[:, half:, :s]).abs().amin() > 1e-4


# ---------------------------------------------------------------------------------------------------------------
# block-sparse kernels == dense SDPA under the explicit mask, forward and backward


@pytest.mark.parametrize("name, fused", KERNEL_PATHS)
@pytest.mark.parametrize("T", [1, 13, 32, 45])
@pytest.mark.parametrize("n_kv", [NH, 2], ids=["mha", "gqa"])
def test_sparse_equals_masked_dense(name, fused, T, n_kv, monkeypatch):
    monkeypatch.setattr(SparseAttention, "fused_cpu_parts", fused)
    kernel = KERNELS[name]()
    leaves, (q, k, v) = qkv(T, n_kv=n_kv)
    out = kernel(q, k, v)
    mask = kernel.dense_mask(NH, T)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.unsqueeze(0))
    assert out.shape == ref.shape == (2, NH, T, 8)
    assert rel_err(out, ref) < 1e-5 and (out - ref).abs().max() < 1e-5

    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, leaves, grad)
    theirs = torch.autograd.grad(ref, leaves, grad)
    for a, b in zip(ours, theirs):
        assert torch.isfinite(a).all()
        assert grads_close(a, b, grad)


@pytest.mark.parametrize("name, fused", KERNEL_PATHS)
def test_float64_is_exact(name, fused, monkeypatch):
    """In float64 the block-sparse result and its gradients agree with the masked reference to rounding."""
    monkeypatch.setattr(SparseAttention, "fused_cpu_parts", fused)
    kernel = KERNELS[name]()
    leaves, (q, k, v) = qkv(45, n_kv=2, dtype=torch.float64)
    out, ref = kernel(q, k, v), kernel.reference(q, k, v)
    assert out.dtype == torch.float64 and (out - ref).abs().max() < 1e-12
    grad = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, leaves, grad), torch.autograd.grad(ref, leaves, grad)):
        assert (a - b).abs().max() < 1e-12


@pytest.mark.parametrize("name", ["strided-7", "fixed-8-2", "local-5", "shifted-8"])
def test_bfloat16_close_to_float32(name):
    kernel = KERNELS[name]()
    _, (q, k, v) = qkv(37)
    ref = kernel.reference(q, k, v)
    out = kernel(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert out.dtype == torch.bfloat16
    assert rel_err(out.float(), ref) < 3e-2


@pytest.mark.parametrize("name, fused", KERNEL_PATHS)
def test_causal(name, fused, monkeypatch):
    monkeypatch.setattr(SparseAttention, "fused_cpu_parts", fused)
    kernel, T = KERNELS[name](), 30
    _, (q, k, v) = qkv(T)
    with torch.no_grad():
        base = kernel(q, k, v)
        for t in (0, 7, 16, 28):
            q2, k2, v2 = q.clone(), k.clone(), v.clone()
            for x in (q2, k2, v2):
                x[:, :, t + 1] += 3.0 * torch.randn_like(x[:, :, t + 1])
            out = kernel(q2, k2, v2)
            assert torch.equal(out[:, :, : t + 1], base[:, :, : t + 1])  # nothing earlier moves, not even by 1 ulp
            assert (out[:, :, t + 1] - base[:, :, t + 1]).abs().max() > 1e-3


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_kv_cache_path_equals_full_sequence(name):
    kernel, T, S = KERNELS[name](), 29, 40
    _, (q, k, v) = qkv(T)
    with torch.no_grad():
        full = kernel(q, k, v)
        # a cache of S slots whose unwritten slots (>= T) hold garbage that must stay invisible
        k_cache = torch.cat([k, 100 * torch.randn(2, NH, S - T, 8)], dim=2)
        v_cache = torch.cat([v, 100 * torch.randn(2, NH, S - T, 8)], dim=2)
        for rows in (torch.arange(0, 1), torch.arange(9, 14), torch.arange(T - 1, T), torch.arange(T)):
            out = kernel(q[:, :, rows], k_cache, v_cache, input_pos=rows)
            assert (out - full[:, :, rows]).abs().max() < 1e-5


def grads_close(ours: torch.Tensor, reference: torch.Tensor, incoming: torch.Tensor) -> bool:
    """Within 1e-5 of the reference's scale, the scale never below a tenth of the incoming gradient's: where a
    query sees one key only (T = 1, a window of 1) its and that key's gradients are exactly 0, and each side returns
    float32 rounding noise of the incoming gradient instead (up to ~1e-6 on some CPUs), which no relative bound on
    the reference's own noise can hold."""
    scale = max(reference.abs().max().item(), 0.1 * incoming.abs().max().item())
    return (ours - reference).abs().max().item() < 1e-5 * scale


def fwd_bwd(fn, leaves, inputs, grad):
    out = fn(*inputs)
    return (out, *torch.autograd.grad(out, leaves, grad))


@pytest.mark.parametrize("name, fused", KERNEL_PATHS)
@pytest.mark.parametrize("budget", [40, 300])
def test_split_calls_stay_exact(name, fused, budget, monkeypatch):
    """Calls cut to a tiny budget (single query rows and heads, one-block summary chunks) give the same numbers."""
    monkeypatch.setattr(SparseAttention, "fused_cpu_parts", fused)
    monkeypatch.setattr(tiled, "CALL_ROWS", budget)
    kernel = KERNELS[name]()
    leaves, (q, k, v) = qkv(45, n_kv=2)
    if budget == 40 and name.startswith("fixed"):
        assert len(kernel.build_plan(q, fused)[0].gathers) > 2  # the summaries really come in several chunks
    grad = torch.randn(2, NH, 45, 8)
    out, *ours = fwd_bwd(kernel, leaves, (q, k, v), grad)
    ref, *theirs = fwd_bwd(kernel.reference, leaves, (q, k, v), grad)
    assert rel_err(out, ref) < 1e-5 and (out - ref).abs().max() < 1e-5
    assert all(grads_close(a, b, grad) for a, b in zip(ours, theirs))


@pytest.mark.parametrize("pattern", ["local", "strided", "fixed", "shifted"])
def test_calls_stay_within_budget(pattern):
    """Every kernel call's temporaries fit tiled.CALL_ROWS at the benchmark's shapes."""
    for T in (4096, 16384):
        kernel = build_attention_kernel(AttentionConfig(pattern=pattern).resolve(T), num_heads=8)
        q = torch.empty(1, 8, T, 64, device="meta")
        plan, scored = kernel.build_plan(q, fused=True)
        meta = torch.empty(1, 8, T, 1, device="meta")
        sources = [meta] + [g(meta).flatten(2, 3) for g in plan.gathers]
        assert 0 < scored < 8 * T * T / 3
        for call in plan.calls:
            (N, H, Tq, _), Tk = call.q_view(meta).shape, call.kv_view(sources[call.source]).shape[2]
            assert N * H * (Tq + 2 * Tk) <= tiled.CALL_ROWS


def saved_bytes(fn, *inputs):
    """Bytes of the distinct storages autograd saves while ``fn`` runs."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    return sum(storages.values())


@pytest.mark.parametrize("name", sorted(KERNELS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saves_what_dense_flash_saves(name, dtype):
    """q, k, v, the output and the float32 log-sum-exp: no gathered tile, mask or partial output."""
    kernel = KERNELS[name]()
    (q, k, v), _ = qkv(45, dtype=dtype)
    sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    expected = 4 * q.untyped_storage().nbytes() + 2 * NH * 45 * 4
    assert saved_bytes(kernel, q, k, v) == saved_bytes(sdpa, q, k, v) == expected


def test_peak_memory_not_above_dense_sdpa(monkeypatch):
    """The CPU allocator's peak over forward + backward, against dense flash SDPA, at the 8k ratio of budget to size.

    At T = 8192 with 8 heads a call's budget is a quarter of one head-sized sequence (16384 of 65536 rows); here
    T = 2048 with the same ratio, so the test sees the benchmark's proportions in a fraction of its time.
    """
    T, nh, hs = 2048, 8, 64
    monkeypatch.setattr(tiled, "CALL_ROWS", nh * T // 4)
    leaves = [torch.randn(1, nh, T, hs, requires_grad=True) for _ in range(3)]
    grad = torch.randn(1, nh, T, hs)

    def peak(fn):
        for t in leaves:
            t.grad = None
        with AllocatorPeak() as tracker:
            tracker.mark()
            fn(*leaves).backward(grad)
        return tracker.peak_bytes - tracker.at_mark_bytes

    dense = peak(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    tensor = leaves[0].untyped_storage().nbytes()
    assert dense >= 4 * tensor  # the output and three gradients
    for pattern in ("local", "strided", "fixed", "shifted"):
        kernel = build_attention_kernel(AttentionConfig(pattern=pattern).resolve(T), num_heads=nh)
        assert peak(kernel) <= dense, pattern


# ---------------------------------------------------------------------------------------------------------------
# the work really is sparse


def test_scored_elements_grow_linearly_for_local_and_shifted():
    for kernel in (LocalAttention(64), ShiftedSparseAttention(128, 2)):
        small, large = kernel.scored_elements(1024), kernel.scored_elements(4096)
        assert 3.5 < large / small < 4.5, (kernel, small, large)  # dense would grow 16x
        assert large < 4096 * 4096 / 12
    # overhead of the gathered tiles over the entries the pattern really keeps
    kernel = LocalAttention(64)
    kept = kernel.dense_mask(1, 4096).sum().item()
    assert kernel.scored_elements(4096) < 2.1 * kept


def test_scored_elements_grow_as_t_sqrt_t_for_strided_and_fixed():
    # Child et al. choose stride / block ~ sqrt(T): the cost then grows 8x when T grows 4x (dense: 16x)
    for make in (lambda l: StridedAttention(l), lambda l: FixedAttention(l, 4)):
        small, large = make(32).scored_elements(1024), make(64).scored_elements(4096)
        assert 6.5 < large / small < 9.5, (small, large)
        assert large < 4096 * 4096 / 8
        kept = make(64).dense_mask(1, 4096).sum().item()
        assert large < 3 * kept


def test_full_window_is_no_more_work_than_dense():
    assert LocalAttention(1000).scored_elements(100) == 100 * 100
    assert FixedAttention(128, 16).scored_elements(100) == 100 * 100


# ---------------------------------------------------------------------------------------------------------------
# in the model


def tiny_model(name="tiny"):
    model = GPT(Config.from_name(name))
    model.init_weights()
    return model.eval()


MODEL_PATTERNS = {
    "local": AttentionConfig(pattern="local", window=4),
    "strided": AttentionConfig(pattern="strided", stride=3),
    "fixed": AttentionConfig(pattern="fixed", block_size=5, summary_size=2),
    "shifted": AttentionConfig(pattern="shifted", group_size=8),
}


@pytest.mark.parametrize("pattern", sorted(MODEL_PATTERNS))
def test_model_logits_change_only_where_pattern_hides_something(pattern):
    model, T = tiny_model(), 24
    idx = torch.randint(0, 512, (2, T))
    with torch.no_grad():
        dense = model(idx)
        apply_attention(model, MODEL_PATTERNS[pattern])
        sparse = model(idx)
    kernel = model.transformer.h[0].attn.attention_kernel
    mask = kernel.dense_mask(model.config.n_head, T)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    first_hidden = int((mask != causal).any(dim=-1).any(dim=0).nonzero()[0])  # first row that loses a key
    assert first_hidden > 0
    diff = (sparse - dense).abs().amax(dim=(0, 2))  # (T,)
    assert diff[:first_hidden].max() < 1e-5
    # every later logit depends on a hidden score, directly or through the first layer
    assert diff[first_hidden:].min() > 1e-4 * dense.abs().max()


@pytest.mark.parametrize(
    "cfg",
    [
        AttentionConfig(pattern="local", window=40),
        AttentionConfig(pattern="strided", stride=40),
        AttentionConfig(pattern="fixed", block_size=64, summary_size=1),
        AttentionConfig(pattern="shifted", group_size=80),
    ],
    ids=lambda c: c.pattern,
)
def test_model_equals_dense_when_pattern_covers_sequence(cfg):
    model, T = tiny_model("tiny-gqa"), 40
    idx = torch.randint(0, 512, (2, T))
    with torch.no_grad():
        dense = model(idx)
        apply_attention(model, cfg)
        sparse = model(idx)
    assert (sparse - dense).abs().max() < 1e-5


@pytest.mark.parametrize("pattern", sorted(MODEL_PATTERNS))
@pytest.mark.parametrize("name", ["tiny", "tiny-gqa"])
def test_incremental_decoding_equals_full_forward(pattern, name):
    model, T, prefill = tiny_model(name), 21, 6
    apply_attention(model, MODEL_PATTERNS[pattern])
    idx = torch.randint(0, 512, (2, T))
    with torch.no_grad():
        full = model(idx)  # block-sparse path
        model.set_kv_cache(batch_size=2)
        logits = model(idx[:, :prefill], input_pos=torch.arange(prefill))
        assert (logits - full[:, :prefill]).abs().max() < 1e-5
        for t in range(prefill, T):
            step = model(idx[:, t: t + 1], input_pos=torch.tensor([t]))
            assert (step[:, 0] - full[:, t]).abs().max() < 1e-5


class MaskedReference(nn.Module):
    """A pattern as dense SDPA under its explicit mask (the KV-cache path is the pattern's own)."""

    def __init__(self, kernel: SparseAttention) -> None:
        super().__init__()
        self.kernel = kernel

    def forward(self, q, k, v, input_pos=None):
        return self.kernel.reference(q, k, v) if input_pos is None else self.kernel(q, k, v, input_pos)


def set_kernels(model, make):
    for block in model.transformer.h:
        block.attn.attention_kernel = make(block.attn.attention_kernel)


def model_grads(model, idx, checkpointing):
    model.zero_grad(set_to_none=True)
    model.gradient_checkpointing = checkpointing
    logits = model.train()(idx)
    (logits * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
    return logits, [p.grad for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("pattern", sorted(MODEL_PATTERNS))
def test_model_backward_with_checkpointing_equals_masked_dense(pattern):
    """Every weight's gradient in the tiny GQA model: tiled kernel, with and without activation checkpointing,
    against dense SDPA under the pattern's mask."""
    model, T = tiny_model("tiny-gqa"), 24
    apply_attention(model, MODEL_PATTERNS[pattern])
    idx = torch.randint(0, 512, (2, T))
    logits, grads = model_grads(model, idx, checkpointing=False)
    for checkpointing, make in ((True, lambda k: k), (False, MaskedReference)):
        set_kernels(model, make)
        other_logits, others = model_grads(model, idx, checkpointing)
        assert (logits - other_logits).abs().max() < 1e-5
        for a, b in zip(grads, others):
            assert (a - b).abs().max() <= 1e-5 * b.abs().max() + 1e-7
        set_kernels(model, lambda k: k.kernel if isinstance(k, MaskedReference) else k)


@pytest.mark.parametrize("pattern", sorted(MODEL_PATTERNS))
def test_llama_adapter_prompt_attention_on_the_patterns(pattern):
    """LLaMA-Adapter's gated prompt attention over each pattern: logits and the prompt's and gates' gradients equal
    those over dense SDPA under the pattern's mask; incremental decoding equals the full forward."""
    _, model, _ = build_adapter("tiny-gqa", std=0.3)
    set_gates(model)
    apply_attention(model, MODEL_PATTERNS[pattern])
    idx = torch.randint(0, 512, (2, 20))
    logits, grads = model_grads(model, idx, checkpointing=True)
    assert grads and all(torch.isfinite(g).all() and g.abs().max() > 0 for g in grads)
    set_kernels(model, MaskedReference)
    ref_logits, ref_grads = model_grads(model, idx, checkpointing=False)
    assert rel_err(logits, ref_logits) < 1e-5
    for a, b in zip(grads, ref_grads):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max() + 1e-7
    set_kernels(model, lambda k: k.kernel)
    with torch.no_grad():
        model.eval().set_kv_cache(batch_size=2)
        steps = [model(idx[:, :7], input_pos=torch.arange(7))]
        steps += [model(idx[:, t:t + 1], input_pos=torch.tensor([t])) for t in range(7, 20)]
        model.clear_kv_cache()
    assert rel_err(torch.cat(steps, dim=1), logits) < 1e-5  # logits of std 0.3 weights reach about 3


def test_apply_attention_sets_every_layer_and_dense_resets():
    model = tiny_model()
    apply_attention(model, AttentionConfig(pattern="strided", stride=8))
    layers = [m for m in model.modules() if isinstance(m, CausalSelfAttention)]
    assert len(layers) == model.config.n_layer
    assert all(isinstance(m.attention_kernel, StridedAttention) and m.attention_kernel.stride == 8 for m in layers)
    assert not list(model.transformer.h[0].attn.attention_kernel.parameters())
    apply_attention(model, AttentionConfig())
    assert all(m.attention_kernel is None for m in layers)
    # an unresolved shifted group size comes from the model's context: 0.25 * block_size
    apply_attention(model, AttentionConfig(pattern="shifted"))
    assert layers[1].attention_kernel.group_size == int(0.25 * model.config.block_size) == 32
    assert layers[1].attention_kernel.num_heads == model.config.n_head


# ---------------------------------------------------------------------------------------------------------------
# configuration


def test_config_resolve_and_round_trip():
    cfg = AttentionConfig(pattern="shifted", group_size_ratio=0.25)
    resolved = cfg.resolve(2048)
    assert resolved.group_size == 512 and cfg.group_size is None
    assert AttentionConfig(pattern="shifted", group_size=100).resolve(2048).group_size == 100
    assert AttentionConfig(pattern="local").resolve(2048) == AttentionConfig(pattern="local")
    assert AttentionConfig(**asdict(resolved)) == resolved
    assert build_attention_kernel(AttentionConfig()) is None
    assert isinstance(build_attention_kernel(resolved, num_heads=8), ShiftedSparseAttention)
    assert math.isclose(AttentionConfig().group_size_ratio, 0.25)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(pattern="sparse"), "unknown attention pattern 'sparse'"),
        (dict(pattern="local", window=0), "attention.window must be a positive integer"),
        (dict(stride=-2), "attention.stride must be a positive integer"),
        (dict(block_size=8, summary_size=9), "summary_size=9 exceeds attention.block_size=8"),
        (dict(summary_size=0), "attention.summary_size must be a positive integer"),
        (dict(group_size_ratio=0.0), "group_size_ratio must be in (0, 1]"),
        (dict(group_size_ratio=1.5), "group_size_ratio must be in (0, 1]"),
        (dict(group_size=0), "attention.group_size must be a positive integer or None"),
    ],
)
def test_config_rejects_impossible_values(kwargs, message):
    with pytest.raises(UserError) as err:
        AttentionConfig(**kwargs)
    assert message in str(err.value)


@pytest.mark.parametrize("call_rows", [tiled.CALL_ROWS, 64], ids=["whole", "split"])
@pytest.mark.parametrize("name, fused", KERNEL_PATHS)
def test_prefix_on_the_tiled_kernel(name, fused, call_rows, monkeypatch):
    """A prefix is one more call over its keys for all queries: exact against dense SDPA over [prefix, keys] under
    the pattern's mask with a column of ones, with the gradients of q, k, v and the prefix, also with cut calls."""
    monkeypatch.setattr(tiled, "CALL_ROWS", call_rows)
    kernel = KERNELS[name]()
    kernel.fused_cpu_parts = fused
    torch.manual_seed(0)
    B, T, hs, P = 2, 29, 8, 3
    tensors = [torch.randn(B, NH, n, hs, dtype=torch.float64, requires_grad=True) for n in (T, T, T, P, P)]
    q, k, v, pk, pv = tensors
    y = kernel(q, k, v, prefix=(pk, pv))
    grad = torch.randn_like(y)
    grads = torch.autograd.grad(y, tensors, grad)
    mask = kernel.dense_mask(NH, T)
    mask = torch.cat([mask.new_ones(mask.shape[0], T, P), mask], dim=-1).unsqueeze(0)
    ref = F.scaled_dot_product_attention(q, torch.cat([pk, k], 2), torch.cat([pv, v], 2), attn_mask=mask)
    torch.testing.assert_close(y, ref)
    for got, want in zip(grads, torch.autograd.grad(ref, tensors, grad)):
        torch.testing.assert_close(got, want)
    with torch.no_grad():
        torch.testing.assert_close(kernel(q, k, v, prefix=(pk, pv)), ref)


@pytest.mark.parametrize("name, fused", KERNEL_PATHS)
@pytest.mark.parametrize("n_kv", [2, 1], ids=["2-groups", "1-group"])
def test_grouped_keys_equal_dense_without_a_repeated_copy(name, fused, n_kv, monkeypatch):
    """The patterns take grouped k, v (B, ng, T, hs) as the model hands them: the output and the gradients of q
    and of the grouped k, v equal dense SDPA over the per-head repeated keys under the explicit mask, and the
    kernel never repeats them (``repeat_interleave`` refused; shifted's halves split inside a group with one
    group)."""
    monkeypatch.setattr(SparseAttention, "fused_cpu_parts", fused)
    kernel = KERNELS[name]()
    T = 45
    (q, k, v), (_, k_rep, v_rep) = qkv(T, n_kv=n_kv)
    mask = kernel.dense_mask(NH, T)
    ref = F.scaled_dot_product_attention(q, k_rep, v_rep, attn_mask=mask.unsqueeze(0))
    grad = torch.randn_like(ref)
    theirs = torch.autograd.grad(ref, (q, k, v), grad)

    def refuse(*args, **kwargs):
        raise AssertionError("repeat_interleave in the tiled kernel")

    monkeypatch.setattr(torch.Tensor, "repeat_interleave", refuse)
    monkeypatch.setattr(torch, "repeat_interleave", refuse)
    out = kernel(q, k, v)
    ours = torch.autograd.grad(out, (q, k, v), grad)
    assert out.shape == ref.shape == (2, NH, T, 8)
    assert rel_err(out, ref) < 1e-5 and (out - ref).abs().max() < 1e-5
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape
        assert grads_close(a, b, grad)
