"""The kernel behind :mod:`lit_adapter.model.attention`'s sparse patterns: attention as a plan of tiled kernel calls.

A pattern's :class:`Plan` lists disjoint rectangles of (query, key) pairs, each one :class:`Call` of the attention
kernel on views of q, k and v. :func:`tiled_forward` runs the calls and merges rows that several calls cover
through their log-sum-exps (exact, as split-KV flash attention); :class:`TiledAttention` saves only q, k, v, the
output and the log-sum-exp (what dense flash SDPA keeps) and its backward rebuilds the plan and runs each call's
backward with the merged statistics. On CPU the calls run in PyTorch's fused flash kernel, elsewhere as plain
matmul + softmax in float32.
"""

from __future__ import annotations

import math
from typing import Callable, List, NamedTuple, Optional, Tuple

import torch

# Masked scores. Finite on purpose: a call with no visible key in a row would get a finite log-sum-exp near -1e30,
# so its merge weight is exactly 0 and no NaN reaches the gradients.
_MASKED_SCORE = -1e30

# Most temporaries one kernel call may hold, in rows of ``head_size`` values: a call over (N, H) heads with Tq
# queries and Tk keys costs N * H * (Tq + 2 * Tk), the size of the gradients its backward returns before they are
# added into dq, dk and dv (its forward returns less). 16384 rows are 4 MiB at head size 64 in float32: dense
# SDPA's CPU backward itself allocates about one more q-sized tensor than its gradients (32 MiB at T = 16384 with
# 8 heads), so calls this small keep the tiled kernels' peak at or below dense's. Bigger calls are split.
CALL_ROWS = 16384

# ``Call.source`` of a call over the prefix keys and values (``forward(..., prefix=(pk, pv))``): every query sees them.
PREFIX = -1

View = Callable[[torch.Tensor], torch.Tensor]


class Call(NamedTuple):
    """One call of the attention kernel: a rectangle of (query, key) pairs of a pattern.

    ``q_view`` maps any (B, nh, T, d) tensor laid out like the queries (q, the output, the log-sum-exp as
    (B, nh, T, 1), the upstream gradient, dq) to the (N, H, Tq, d) view that this call reads or writes;
    ``kv_view`` maps the keys' tensors (k, v, dk, dv, or with ``source`` s > 0 the plan's gathered copy
    ``gathers[s - 1]``, with ``source`` ``PREFIX`` the prefix's pk, pv, dpk, dpv) to (N, H, Tk, d). ``mask``:
    additive (Tq, Tk), 0 where visible and ``_MASKED_SCORE`` elsewhere, shared by all N x H heads; ``causal``: query ``a`` sees keys ``<= a`` (Tq == Tk). ``merge``: an earlier call
    of the plan already wrote these rows, so this one is merged into them by log-sum-exp.
    """

    q_view: View
    kv_view: View
    mask: Optional[torch.Tensor] = None
    causal: bool = False
    merge: bool = False
    source: int = 0


class Plan(NamedTuple):
    """A pattern as kernel calls. Calls are grouped by ``source`` (the prefix's last); those that write rows come
    before the merges into them.

    ``gathers[s - 1]`` maps a (B, nh, T, d) key tensor to a (B, nh, m, c, d) view of positions that no single view
    of the sequence holds (fixed's summary tokens); the calls with ``source`` s read its copy (B, nh, m * c, d).
    """

    calls: List[Call]
    gathers: List[View]


def seq(start: int, end: int, h0: int = 0, h1: Optional[int] = None) -> View:
    """(B, nh, T, d) -> (B, h1 - h0, end - start, d): a slice of positions and heads, every sequence of the batch."""
    return lambda x: x[:, h0:h1, start:end]


def consecutive_runs(b: int, h0: int, h1: int, start: int, size: int, count: int) -> View:
    """(B, nh, T, d) -> (h1 - h0, count, size, d): ``count`` consecutive runs of ``size`` positions of sequence b."""
    return lambda x: x[b, h0:h1, start:start + count * size].unflatten(1, (count, size))


def _sub(view: View, n: slice, h: slice, rows: slice) -> View:
    return lambda x: view(x)[n, h, rows]


def _split(call: Call, q_shape: torch.Size, k_shape: torch.Size) -> List[Call]:
    """Cuts a call whose temporaries exceed ``CALL_ROWS`` along N, then H, then (if not causal) its query rows."""
    N, H, Tq = q_shape[0], q_shape[1], q_shape[2]
    Tk = k_shape[2]
    per_head = Tq + 2 * Tk
    if N * H * per_head <= CALL_ROWS:
        return [call]
    heads = max(1, CALL_ROWS // per_head)  # (n, h) pairs per call
    if heads >= H:
        n_step, h_step, q_step = max(1, heads // H), H, Tq
    else:
        n_step, h_step, q_step = 1, heads, Tq
        if heads == 1 and not call.causal:  # one head is still too big: fewer query rows (a causal call cannot)
            q_step = max(1, min(Tq, CALL_ROWS - 2 * Tk))
    pieces = []
    for n0 in range(0, N, n_step):
        for h0 in range(0, H, h_step):
            for t0 in range(0, Tq, q_step):
                rows = slice(t0, t0 + q_step)
                mask = None if call.mask is None else call.mask[rows]
                view = _sub(call.q_view, slice(n0, n0 + n_step), slice(h0, h0 + h_step), rows)
                kv_view = _sub(call.kv_view, slice(n0, n0 + n_step), slice(h0, h0 + h_step), slice(None))
                pieces.append(call._replace(q_view=view, kv_view=kv_view, mask=mask))
    return pieces


def finish(plan: Plan, B: int, nh: int, T: int, hs: int, prefix_length: int = 0) -> Tuple[Plan, int]:
    """The plan with its big calls split, and the query-key scores it computes (for ``last_scored_elements``)."""
    meta = torch.empty(B, nh, T, 1, device="meta")
    sources = {i + 1: g(meta).flatten(2, 3) for i, g in enumerate(plan.gathers)}
    sources.update({0: meta, PREFIX: torch.empty(B, nh, prefix_length, 1, device="meta")})
    calls, scored = [], 0
    for call in plan.calls:
        q_shape, k_shape = call.q_view(meta).shape, call.kv_view(sources[call.source]).shape
        scored += q_shape[:3].numel() * k_shape[2]
        calls.extend(_split(call, q_shape, k_shape))
    return Plan(calls, plan.gathers), scored


def members(q: torch.Tensor, kv_heads: int) -> List[torch.Tensor]:
    """Grouped-query attention without a copy of the keys: q (B, nh, T, d) as its ``r = nh / ng`` members.

    Query head ``h`` reads key/value group ``h // r``, so member ``j``, the heads ``j, j + r, ...`` (the view
    ``q[:, j::r]``, (B, ng, T, d)), lines up one to one with the ng grouped heads of k and v. The kernel runs a
    pattern's plan once per member on these views (and on the same views of the output, the log-sum-exp and the
    gradients), reading k and v as they are. Repeating k and v for every query head instead would copy them ``r``
    times and keep the copies for the backward.
    """
    if q.shape[1] % kv_heads:
        raise ValueError(f"{q.shape[1]} query heads cannot share {kv_heads} key/value groups")
    r = q.shape[1] // kv_heads
    return [q[:, j::r] for j in range(r)]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax statistics and merges run in at least float32."""
    return torch.promote_types(dtype, torch.float32)


def fused_cpu_supported(q: torch.Tensor) -> bool:
    # float16 cannot hold the finite mask value; the plain path then builds its masks in float32.
    return (
        q.device.type == "cpu"
        and q.dtype in (torch.float32, torch.bfloat16, torch.float64)
        and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward")
    )


def additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, _MASKED_SCORE)


def _plain_scores(q, k, call: Call) -> torch.Tensor:
    """Scaled scores (N, H, Tq, Tk) in the accumulation dtype, masked like the fused kernel masks them."""
    acc = accumulation_dtype(q.dtype)
    scores = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    if call.mask is not None:
        scores = scores + call.mask.to(acc)
    if call.causal:
        hidden = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).triu_(1)
        scores = scores.masked_fill(hidden, _MASKED_SCORE)
    return scores


def _attend(q, k, v, call: Call, fused: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """One call's output (N, H, Tq, hs) and log-sum-exp (N, H, Tq)."""
    if fused:
        mask = None if call.mask is None else call.mask[None, None]
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, call.causal, attn_mask=mask)
    scores = _plain_scores(q, k, call)
    lse = torch.logsumexp(scores, dim=-1)
    return torch.matmul(torch.exp(scores - lse.unsqueeze(-1)), v.to(scores.dtype)), lse


def _attend_backward(grad, q, k, v, out, lse, call: Call, fused: bool):
    """One call's (dq, dk, dv) from the *merged* output and log-sum-exp of its rows.

    The kernel recomputes the probabilities as ``exp(score - lse)``; with the merged statistics these are exactly
    the full pattern's softmax restricted to the call's keys, so the calls' gradients add up to the exact gradient
    (as in split-KV flash attention).
    """
    if fused:
        mask = None if call.mask is None else call.mask[None, None]
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad, q, k, v, out, lse, 0.0, call.causal, attn_mask=mask
        )
    scores = _plain_scores(q, k, call)
    acc, scale = scores.dtype, 1.0 / math.sqrt(q.shape[-1])
    probs = torch.exp(scores - lse.unsqueeze(-1).to(acc))  # (N, H, Tq, Tk)
    grad = grad.to(acc)
    dv = torch.matmul(probs.transpose(-1, -2), grad)
    dp = torch.matmul(grad, v.to(acc).transpose(-1, -2))
    ds = probs * (dp - (grad * out.to(acc)).sum(-1, keepdim=True))
    return torch.matmul(ds, k.to(acc)) * scale, torch.matmul(ds.transpose(-1, -2), q.to(acc)) * scale, dv


def _sources(plan: Plan, k: torch.Tensor, v: torch.Tensor, prefix=None):
    """Yields (call, keys, values) with each gathered copy alive only while its calls run."""
    current, keys, values = 0, k, v
    for call in plan.calls:
        if call.source != current:
            current = call.source
            if current == PREFIX:
                keys, values = prefix
            else:
                gather = plan.gathers[current - 1]
                keys, values = gather(k).flatten(2, 3), gather(v).flatten(2, 3)  # (B, nh, m * c, hs) copies
        yield call, keys, values


def tiled_forward(plans: List[Plan], q, k, v, fused: bool, prefix=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Runs the plans: the output (B, T, nh, hs) (dense SDPA's memory order) and the log-sum-exp (B, nh, T).

    ``plans[j]`` is the plan of query member ``j`` (:func:`members`: one plan, the whole of q, without grouped
    keys); k and v are (B, ng, T, hs). ``prefix``: the (pk, pv) that the plans' ``PREFIX`` calls read, (B, ng, P, hs).
    """
    B, nh, T, hs = q.shape
    acc = accumulation_dtype(q.dtype)
    out = q.new_empty(B, T, nh, hs)
    merges = any(call.merge for plan in plans for call in plan.calls)
    # merges need the accumulation dtype; float32 and float64 merge in place in the output
    target = out.transpose(1, 2) if acc == q.dtype or not merges else q.new_empty(B, nh, T, hs, dtype=acc)
    lse = q.new_empty(B, nh, T, dtype=acc)
    lse_rows = lse.unsqueeze(-1)  # (B, nh, T, 1): the views of the queries apply to it
    views = zip(plans, members(q, k.shape[1]), members(target, k.shape[1]), members(lse_rows, k.shape[1]))
    for plan, q_m, target_m, lse_m in views:
        for call, keys, values in _sources(plan, k, v, prefix):
            o, l = _attend(call.q_view(q_m), call.kv_view(keys), call.kv_view(values), call, fused)
            o_rows, l_rows, l = call.q_view(target_m), call.q_view(lse_m), l.unsqueeze(-1)
            if call.merge:
                merged = torch.logaddexp(l_rows, l)
                o_rows.mul_(torch.exp(l_rows - merged)).add_(o * torch.exp(l - merged))
                l_rows.copy_(merged)
            else:
                o_rows.copy_(o)
                l_rows.copy_(l)
    if target.dtype != q.dtype:
        out.transpose(1, 2).copy_(target)
    return out, lse


def tiled_backward(plans: List[Plan], q, k, v, out, lse, grad, fused: bool, prefix=None):
    """(dq, dk, dv) of the plans, with q's, k's and v's memory order, and with a ``prefix`` (pk, pv) also
    (dpk, dpv); ``out``, ``grad``: (B, nh, T, hs). Every query member adds into the same grouped dk, dv."""
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    d_prefix = () if prefix is None else tuple(torch.zeros_like(t) for t in prefix)
    ng = k.shape[1]
    views = zip(plans, *(members(t, ng) for t in (q, dq, out, lse.unsqueeze(-1), grad)))
    for plan, q_m, dq_m, out_m, lse_m, grad_m in views:
        gathered = None  # (gather, d keys, d values) of the gathered copy in use
        for call, keys, values in _sources(plan, k, v, prefix):
            if call.source > 0 and (gathered is None or gathered[0] is not plan.gathers[call.source - 1]):
                _scatter(gathered, dk, dv)
                gathered = (plan.gathers[call.source - 1], torch.zeros_like(keys), torch.zeros_like(values))
            if call.source == PREFIX:
                d_keys, d_values = d_prefix
            else:
                d_keys, d_values = (dk, dv) if not call.source else gathered[1:]
            gq, gk, gv = _attend_backward(
                call.q_view(grad_m), call.q_view(q_m), call.kv_view(keys), call.kv_view(values), call.q_view(out_m),
                call.q_view(lse_m)[..., 0], call, fused,
            )
            call.q_view(dq_m).add_(gq)
            call.kv_view(d_keys).add_(gk)
            call.kv_view(d_values).add_(gv)
        _scatter(gathered, dk, dv)
    return (dq, dk, dv, *d_prefix)


def _scatter(gathered, dk, dv) -> None:
    """Adds the gradients of a gathered copy back to the positions it was copied from."""
    if gathered is not None:
        gather, d_keys, d_values = gathered
        gather(dk).add_(d_keys.view(gather(dk).shape))
        gather(dv).add_(d_values.view(gather(dv).shape))


class TiledAttention(torch.autograd.Function):
    """A pattern's attention that saves q, k, v (and the prefix's pk, pv), the output and the log-sum-exp, and
    recomputes the rest."""

    @staticmethod
    def forward(ctx, kernel: torch.nn.Module, plans: List[Plan], fused: bool, q, k, v, *prefix):  # a SparseAttention
        prefix = tuple(prefix) or None
        out, lse = tiled_forward(plans, q, k, v, fused, prefix)
        ctx.save_for_backward(q, k, v, *(prefix or ()), out, lse)
        ctx.kernel, ctx.fused = kernel, fused  # the plans are rebuilt in backward: their masks are not kept meanwhile
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        q, k, v, *prefix, out, lse = ctx.saved_tensors
        prefix = tuple(prefix) or None
        plans = ctx.kernel.member_plans(q, k.shape[1], ctx.fused, 0 if prefix is None else prefix[0].shape[-2])[0]
        grad = grad_out.transpose(1, 2)
        if grad.stride(-1) != 1:  # e.g. the expanded gradient of a sum; the kernel reads rows of head_size
            grad = grad.contiguous()
        return (None, None, None, *tiled_backward(plans, q, k, v, out.transpose(1, 2), lse, grad, ctx.fused, prefix))
