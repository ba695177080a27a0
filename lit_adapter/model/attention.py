"""Sparse causal attention patterns that skip the masked work and keep no more memory than dense attention.

Four patterns replace the dense causal attention of :class:`lit_adapter.model.gpt.CausalSelfAttention`:

* ``"strided"`` and ``"fixed"``: the factorized patterns of Child et al. 2019, "Generating Long Sequences with
  Sparse Transformers" (arXiv:1904.10509). Strided with stride ``l``: query ``i`` sees the previous ``l``
  positions and every ``l``-th earlier one (``(i - j) % l == 0``). Fixed with block ``l`` and summary ``c``: query
  ``i`` sees its own block and the last ``c`` positions of every block. Both cost about ``T * sqrt(T)`` for
  ``l ~ sqrt(T)``. Child et al. split the two halves over heads or layers; here every head sees their union.
* ``"local"``: a sliding window, query ``i`` sees ``i - window < j <= i`` (Beltagy et al. 2020's local part).
* ``"shifted"``: LongLoRA's shifted sparse attention S²-Attn (Chen et al. 2023, arXiv:2309.12307): tokens
  attend within groups of ``G`` positions; the second half of the heads uses groups shifted by ``G / 2`` so that
  information flows between neighbouring groups. LongLoRA rolls the shifted heads by ``G // 2``, which puts the
  first tokens into the last group, where they see the future; we keep the shifted groups on the original
  positions (group id ``(i + G / 2) // G`` for even ``G``) so attention stays causal.

Every pattern is a parameter-free module. ``mask_mod(head, q_idx, kv_idx)`` defines it (without causality) and
``dense_mask`` turns it into the boolean reference mask. ``forward`` without ``input_pos`` computes only the
blocks the pattern touches. Each pattern's ``plan`` splits its (query, key) pairs into disjoint rectangles, each
one :class:`Call` of the attention kernel on *views* of q, k and v (slices, or reshapes of the sequence such as
strided's residue classes), with a small mask where the rectangle is not fully visible or causal. One autograd
function (:class:`TiledAttention`) runs the calls: rows that several calls cover are merged exactly through
their log-sum-exps, and it saves only q, k, v, the output and the log-sum-exp, the set dense flash attention
keeps. Its backward rebuilds the plan and runs each call's backward with the merged output and log-sum-exp,
adding the call's gradients into dq, dk, dv. No call holds more than ``tiled_attention.CALL_ROWS`` rows of
temporaries, so the peak stays at dense SDPA's (docs/sparse_attention.md has the measurements). With
``input_pos`` (KV-cache decoding) the rows of ``dense_mask`` for those positions are used with dense SDPA, which is
cheap for a few query rows.

``forward(..., prefix=(pk, pv))`` adds keys and values that every query sees in the same softmax (the virtual
tokens of prompt tuning, P-tuning and prefix tuning) while the pattern applies to the other keys. On the tiled
kernel the prefix is one more unmasked call, all queries over the prefix keys, merged into every row by the same
log-sum-exp logic and recomputed in the backward like the pattern's calls (its gradients go to ``pk``, ``pv``);
with ``input_pos`` the prefix is concatenated in front of the keys with a column of ones in the mask.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import List, Literal, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_adapter.model import tiled_attention as tiled
from lit_adapter.errors import UserError
from lit_adapter.model.tiled_attention import (
    PREFIX, Call, Plan, View, TiledAttention, accumulation_dtype, additive_mask, finish,
    fused_cpu_supported, consecutive_runs, members, seq, tiled_forward,
)

Pattern = Literal["dense", "strided", "fixed", "local", "shifted"]
PATTERNS = ("dense", "strided", "fixed", "local", "shifted")

@dataclass
class AttentionConfig:
    pattern: Pattern = "dense"
    """Causal attention pattern: dense, strided or fixed (Child et al. 2019), local (sliding window) or shifted
    (LongLoRA's S²-Attn)."""
    window: int = 256
    """local: each token sees itself and the window - 1 tokens before it."""
    stride: int = 128
    """strided: each token sees the previous `stride` tokens and every stride-th token before them."""
    block_size: int = 128
    """fixed: length of the blocks; a token sees its own block and the summaries of earlier blocks."""
    summary_size: int = 16
    """fixed: the last `summary_size` tokens of every block are visible to all later tokens (c in the paper)."""
    group_size_ratio: float = 0.25
    """shifted: group size as a fraction of the training context length (used when group_size is not set)."""
    group_size: Optional[int] = None
    """shifted: tokens per attention group; None means group_size_ratio x the training context length."""

    def __post_init__(self) -> None:
        if self.pattern not in PATTERNS:
            raise UserError(f"unknown attention pattern {self.pattern!r}; choose one of {', '.join(PATTERNS)}")
        for name in ("window", "stride", "block_size", "summary_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"attention.{name} must be a positive integer, got {value!r}")
        if self.summary_size > self.block_size:
            raise UserError(
                f"attention.summary_size={self.summary_size} exceeds attention.block_size={self.block_size}: "
                "the summary is the last summary_size tokens of each block"
            )
        if not 0 < self.group_size_ratio <= 1:
            raise UserError(f"attention.group_size_ratio must be in (0, 1], got {self.group_size_ratio}")
        if self.group_size is not None and (
            isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1
        ):
            raise UserError(f"attention.group_size must be a positive integer or None, got {self.group_size!r}")

    def resolve(self, max_seq_length: int) -> "AttentionConfig":
        """Fixes the shifted pattern's group size from the training context length (LongLoRA's ``ratio * T``)."""
        if max_seq_length < 1:
            raise UserError(f"max_seq_length must be positive, got {max_seq_length}")
        if self.pattern != "shifted" or self.group_size is not None:
            return self
        return replace(self, group_size=max(1, int(self.group_size_ratio * max_seq_length)))


class SparseAttention(nn.Module):
    """Base of the patterns: the dense reference, the KV-cache path, the tiled kernel and the work count."""

    # On CPU the calls run in PyTorch's fused flash kernel (which returns the log-sum-exp the merges need);
    # elsewhere, for float16, or with this switched off they run as plain matmul + softmax in float32.
    fused_cpu_parts = True

    def __init__(self) -> None:
        super().__init__()
        # Query-key scores computed by the last forward, per (batch element, head); the sparsity tests read it.
        self.last_scored_elements = 0.0
        self._scored = 0

    fold_label = "attention"
    """An export into plain LLaMA weights asks :meth:`fold_refusal` (``lit_adapter.tuners.base.FoldAnswer``)."""

    def fold_refusal(self) -> Optional[str]:
        return f"is a sparse pattern ({type(self).__name__}); LlamaForCausalLM attends densely"

    def mask_mod(self, head: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        """Whether query position ``q_idx`` may see key position ``kv_idx`` (broadcasting; causality excluded)."""
        raise NotImplementedError

    def dense_mask(
        self, num_heads: int, T: int, S: Optional[int] = None, q_positions: Optional[torch.Tensor] = None,
        device=None,
    ) -> torch.Tensor:
        """Boolean ``(nh or 1, T, S)`` mask: the pattern and causality; queries at ``q_positions`` (default 0..T-1)."""
        S = T if S is None else S
        if q_positions is None:
            q_positions = torch.arange(T, device=device)
        device = q_positions.device
        q_idx = q_positions.view(1, -1, 1)
        kv_idx = torch.arange(S, device=device).view(1, 1, -1)
        head = torch.arange(num_heads, device=device).view(-1, 1, 1)
        return self.mask_mod(head, q_idx, kv_idx) & (kv_idx <= q_idx)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, input_pos: Optional[torch.Tensor] = None,
        prefix: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> torch.Tensor:
        """``q``: (B, nh, T, hs); ``k``, ``v``: (B, ng, S, hs), grouped (ng divides nh); returns (B, nh, T, hs).

        ``prefix``: keys and values (B, ng, P, hs) that every query sees besides those the pattern selects.
        """
        B, nh, T, _ = q.shape
        self._scored = 0
        if input_pos is not None:
            mask = self.dense_mask(nh, T, k.shape[-2], q_positions=input_pos)  # (nh or 1, T, S)
            if prefix is not None:
                visible = mask.new_ones(mask.shape[0], T, prefix[0].shape[-2])  # (nh or 1, T, P)
                k, v = torch.cat([prefix[0], k], dim=2), torch.cat([prefix[1], v], dim=2)  # (B, ng, P + S, hs)
                mask = torch.cat([visible, mask], dim=-1)
            self._scored += q.shape[:-1].numel() * k.shape[-2]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.unsqueeze(0), enable_gqa=k.shape[1] != nh)
        else:
            if k.shape[-2] != T:
                raise ValueError(f"without input_pos keys and queries need the same length, got {k.shape[-2]}, {T}")
            y = self.sparse_forward(q, k, v, prefix)
        self.last_scored_elements = self._scored / (B * nh)
        return y

    def sparse_forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        prefix: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> torch.Tensor:
        """The block-sparse computation for a full causal sequence (query ``i`` at position ``i``), with the
        ``prefix`` keys and values (B, ng, P, hs), if any, visible to every query in the same softmax. k and v stay
        grouped (B, ng, T, hs): the kernel runs the plan per query member (``tiled_attention.members``)."""
        # the kernel reads rows of head_size values; anything else (an expanded tensor) is copied once
        tensors = (q, k, v) if prefix is None else (q, k, v, *prefix)
        tensors = tuple(t if t.stride(-1) == 1 else t.contiguous() for t in tensors)
        q = tensors[0]
        fused = self.fused_cpu_parts and fused_cpu_supported(q)
        P = 0 if prefix is None else tensors[3].shape[-2]
        plans, scored = self.member_plans(q, k.shape[1], fused, P)
        self._scored += scored
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            out = TiledAttention.apply(self, plans, fused, *tensors)
        else:
            out = tiled_forward(plans, *tensors[:3], fused, tensors[3:] or None)[0]
        return out.transpose(1, 2)  # (B, nh, T, hs), a view like dense SDPA's output

    head_dependent = False
    """Whether the pattern differs between heads (then each query member of a group gets its own plan)."""

    def member_plans(self, q: torch.Tensor, kv_heads: int, fused: bool, prefix_length: int = 0
                     ) -> Tuple[List[Plan], int]:
        """One plan per query member of the ``kv_heads`` groups (``tiled_attention.members``), and their score
        count: a head-independent pattern's members share one plan."""
        plans, scored = [], 0
        for j, q_m in enumerate(members(q, kv_heads)):
            if j and not self.head_dependent:
                plans.append(plans[0])
                scored += first
                continue
            plan, first = self.build_plan(q_m, fused, prefix_length,
                                         heads=range(j, q.shape[1], q.shape[1] // kv_heads))
            plans.append(plan)
            scored += first
        return plans, scored

    def build_plan(self, q: torch.Tensor, fused: bool, prefix_length: int = 0,
                   heads: Optional[range] = None) -> Tuple[Plan, int]:
        """The pattern's calls for queries shaped like ``q`` (and, with ``prefix_length`` P > 0, one call of all
        queries over the P prefix keys), split to ``tiled.CALL_ROWS``, and their score count. ``heads``: which of
        the layer's heads q's are (default all, in order; a query member's under grouped-query attention)."""
        B, nh, T, hs = q.shape
        mask_dtype = q.dtype if fused else accumulation_dtype(q.dtype)  # the fused kernel adds masks in q's dtype
        plan = self.plan(B, nh, T, q.device, mask_dtype, range(nh) if heads is None else heads)
        if prefix_length:  # every row is written by the pattern (its diagonal), so the prefix merges into it
            plan = Plan([*plan.calls, Call(seq(0, T), seq(0, prefix_length), merge=True, source=PREFIX)],
                        plan.gathers)
        return finish(plan, B, nh, T, hs, prefix_length)

    def plan(self, B: int, nh: int, T: int, device, mask_dtype: torch.dtype, heads: range) -> Plan:
        """The pattern's (query, key) pairs as disjoint rectangles, one :class:`Call` each; ``heads``: which of the
        layer's heads the ``nh`` heads are (only a head-dependent pattern reads it)."""
        raise NotImplementedError

    def reference(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Dense SDPA under the explicit boolean ``dense_mask``; quadratic, for tests and benchmarks only."""
        mask = self.dense_mask(q.shape[1], q.shape[-2], device=q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.unsqueeze(0), enable_gqa=k.shape[1] != q.shape[1])

    @torch.no_grad()
    def scored_elements(self, T: int, num_heads: int = 2) -> float:
        """Measures the query-key scores per head that the sparse path computes for a sequence of ``T`` tokens."""
        x = torch.zeros(1, num_heads, T, 1)
        self(x, x, x)
        return self.last_scored_elements


def _causal(T: int) -> Plan:
    return Plan([Call(seq(0, T), seq(0, T), causal=True)], [])


def _query_tile(window: int) -> int:
    # Query tiles near the window length keep the wasted band work (tile - 1 extra keys per row) bounded while
    # giving the kernel matrices large enough to be efficient.
    return max(16, min(window, 128))


def band_calls(T: int, band: int, device, mask_dtype: torch.dtype) -> List[Call]:
    """Each query over the ``band`` positions ending at itself (``i - band < j <= i``), per query tile.

    A tile of queries reads the contiguous keys from ``band - 1`` before its first query to its last query (a
    slice: nothing is copied), so the work is ``T * (tile + band - 1)`` instead of ``T * T``. Tiles whose key
    range has the same shape share one mask.
    """
    tile = min(_query_tile(band), T)
    masks = {}
    calls = []
    for start in range(0, T, tile):
        end, first = min(start + tile, T), max(0, start - band + 1)
        if first == start and band >= end - start:  # the first tile: plain causal attention
            calls.append(Call(seq(start, end), seq(start, end), causal=True))
            continue
        key = (start - first, end - start, end - first)
        if key not in masks:
            q_pos = torch.arange(key[1], device=device).view(-1, 1) + key[0]  # relative to the first key
            k_pos = torch.arange(key[2], device=device).view(1, -1)
            masks[key] = additive_mask((k_pos <= q_pos) & (q_pos - k_pos < band), mask_dtype)
        calls.append(Call(seq(start, end), seq(first, end), mask=masks[key]))
    return calls


class LocalAttention(SparseAttention):
    """Sliding window: query ``i`` sees keys ``i - window < j <= i``."""

    def __init__(self, window: int) -> None:
        super().__init__()
        self.window = window

    def extra_repr(self) -> str:
        return f"window={self.window}"

    def mask_mod(self, head, q_idx, kv_idx):
        return (q_idx - kv_idx) < self.window

    def plan(self, B, nh, T, device, mask_dtype, heads):
        return Plan(band_calls(T, min(self.window, T), device, mask_dtype), [])


class StridedAttention(SparseAttention):
    """Child et al.'s strided pattern: the previous ``stride`` tokens plus every ``stride``-th earlier token.

    Two disjoint parts: the band ``i - j < stride`` (query tiles as for ``local``), and the positions
    ``stride, 2 stride, ...`` back. Position ``m * stride + r`` is step ``m`` of residue class ``r``; the second
    part is causal attention among the earlier steps of the same class. Viewing one sequence's
    ``(nh, n * stride, hs)`` as ``(nh, stride, n, hs)`` (heads x classes x steps) makes it a batch of causal
    problems of ``n = T / stride`` tokens on a view, with queries at steps ``1..n-1`` and keys at ``0..n-2``.
    """

    def __init__(self, stride: int) -> None:
        super().__init__()
        self.stride = stride

    def extra_repr(self) -> str:
        return f"stride={self.stride}"

    def mask_mod(self, head, q_idx, kv_idx):
        distance = q_idx - kv_idx
        return (distance < self.stride) | (distance % self.stride == 0)

    def plan(self, B, nh, T, device, mask_dtype, heads):
        l = self.stride
        if T <= l:  # no token is a full stride back: the band is everything
            return _causal(T)
        calls = band_calls(T, l, device, mask_dtype)
        n, rest = divmod(T, l)  # full steps; the classes r < rest have one more step, m = n

        def classes(b: int, steps: slice, r1: Optional[int] = None) -> View:
            # (B, nh, T, d) -> (nh, classes, steps, d): x[b, h, m * l + r] at [h, r, m]
            return lambda x: x[b, :, :n * l].unflatten(1, (n, l)).transpose(1, 2)[:, :r1, steps]

        for b in range(B):
            if n > 1:
                calls.append(Call(classes(b, slice(1, n)), classes(b, slice(0, n - 1)), causal=True, merge=True))
            if rest:  # the last, partial step sees all n earlier steps of its class
                last = lambda x, b=b: x[b, :, n * l:T].unsqueeze(2)  # noqa: E731  (nh, rest, 1, d)
                calls.append(Call(last, classes(b, slice(None), rest), merge=True))
        return Plan(calls, [])


class FixedAttention(SparseAttention):
    """Child et al.'s fixed pattern: a token sees its own block and the last ``summary_size`` tokens of each block.

    Disjoint parts: causal attention inside each block (the full blocks of a sequence as one view), and attention to
    the summary tokens of strictly earlier blocks. The summary tokens are no single view of the sequence; they are
    copied in chunks of ``m`` blocks (``m * summary_size`` rows, freed when the chunk's calls are done). Each query
    block reads the chunks' blocks before it: unmasked rectangles, one per chunk.
    """

    def __init__(self, block_size: int, summary_size: int) -> None:
        super().__init__()
        self.block_size = block_size
        self.summary_size = summary_size

    def extra_repr(self) -> str:
        return f"block_size={self.block_size}, summary_size={self.summary_size}"

    def mask_mod(self, head, q_idx, kv_idx):
        l, c = self.block_size, self.summary_size
        return (q_idx // l == kv_idx // l) | (kv_idx % l >= l - c)

    def plan(self, B, nh, T, device, mask_dtype, heads):
        l, c = self.block_size, self.summary_size
        if T <= l:  # one block: plain causal attention
            return _causal(T)
        full, rest = divmod(T, l)
        blocks = full + (rest > 0)
        calls = [Call(consecutive_runs(b, 0, nh, 0, l, full), consecutive_runs(b, 0, nh, 0, l, full), causal=True) for b in range(B)]
        if rest:
            calls.append(Call(seq(full * l, T), seq(full * l, T), causal=True))
        # Summaries of blocks 0 .. blocks - 2 (the last block's are seen by nobody), in chunks whose copies of k
        # and v and of their gradients stay within one call's budget.
        per_chunk = max(1, tiled.CALL_ROWS // (4 * B * nh * c))
        gathers = []
        for first in range(0, blocks - 1, per_chunk):
            last = min(first + per_chunk, blocks - 1)  # key blocks [first, last)
            gathers.append(lambda x, a=first * l, e=last * l: x[:, :, a:e].unflatten(2, (-1, l))[:, :, :, l - c:])
            source = len(gathers)
            for block in range(first + 1, last):  # query blocks that see only part of the chunk
                seen = (block - first) * c
                calls.append(Call(seq(block * l, (block + 1) * l), seq(0, seen), merge=True, source=source))
            # every later query sees the whole chunk: one rectangle, split by rows if large
            calls.append(Call(seq(last * l, T), seq(0, (last - first) * c), merge=True, source=source))
        return Plan(calls, gathers)


class ShiftedSparseAttention(SparseAttention):
    """LongLoRA's S²-Attn: causal attention within groups of ``G = group_size`` tokens.

    Heads ``< num_heads // 2`` use the groups ``[m * G, (m + 1) * G)``. The other heads use groups that start at
    ``G // 2 + m * G`` (group id ``(i + G - G // 2) // G``, i.e. ``(i + G / 2) // G`` for even ``G``): the
    partition LongLoRA gets by rolling those heads by ``G // 2``, minus the roll's wrap-around, so the first
    ``G // 2`` tokens form a group of their own instead of joining the last tokens. Every group is a causal call
    on a view (the full groups of a sequence as one (heads, groups, G, hs) view).
    """

    head_dependent = True

    def __init__(self, group_size: int, num_heads: int) -> None:
        super().__init__()
        self.group_size = group_size
        self.num_heads = num_heads

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}, num_heads={self.num_heads}"

    def mask_mod(self, head, q_idx, kv_idx):
        G = self.group_size
        shift = torch.where(head >= self.num_heads // 2, G - G // 2, 0)
        return (q_idx + shift) // G == (kv_idx + shift) // G

    def plan(self, B, nh, T, device, mask_dtype, heads):
        if heads.step * nh != self.num_heads:
            raise ValueError(f"shifted attention was built for {self.num_heads} heads, got {heads.step * nh}")
        # the unshifted heads (the layer's first half) come first among q's heads, as each member's do
        G, half = self.group_size, sum(h < self.num_heads // 2 for h in heads)
        first = min(G // 2, T)  # the shifted heads' groups start at G // 2 + m * G
        calls = []

        def groups(h0: int, h1: int, start: int) -> None:
            full, rest = divmod(T - start, G)
            if full:
                calls.extend(Call(consecutive_runs(b, h0, h1, start, G, full), consecutive_runs(b, h0, h1, start, G, full), causal=True)
                             for b in range(B))
            if rest:
                tail = seq(start + full * G, T, h0, h1)
                calls.append(Call(tail, tail, causal=True))

        if half:
            groups(0, half, 0)
        if half < nh:  # a query member of a group may hold heads of one half only
            if first:
                calls.append(Call(seq(0, first, half, nh), seq(0, first, half, nh), causal=True))
            groups(half, nh, first)
        return Plan(calls, [])


def build_attention_kernel(cfg: AttentionConfig, num_heads: Optional[int] = None) -> Optional[SparseAttention]:
    """The pattern module of ``cfg`` (``None`` for dense); ``shifted`` needs ``num_heads`` and a resolved group size."""
    if cfg.pattern == "dense":
        return None
    if cfg.pattern == "local":
        return LocalAttention(cfg.window)
    if cfg.pattern == "strided":
        return StridedAttention(cfg.stride)
    if cfg.pattern == "fixed":
        return FixedAttention(cfg.block_size, cfg.summary_size)
    if cfg.group_size is None:
        raise ValueError("the shifted pattern needs a group size: call AttentionConfig.resolve(max_seq_length) first")
    if num_heads is None:
        raise ValueError("the shifted pattern needs num_heads to know which half of the heads is shifted")
    return ShiftedSparseAttention(cfg.group_size, num_heads)


def apply_attention(model: nn.Module, cfg: AttentionConfig) -> nn.Module:
    """Sets the pattern of ``cfg`` on every attention layer of ``model`` (dense restores the default).

    An unresolved shifted group size is taken from the model's ``block_size``.
    """
    from lit_adapter.model.gpt import CausalSelfAttention

    if cfg.pattern == "shifted" and cfg.group_size is None:
        cfg = cfg.resolve(model.config.block_size)
    for module in model.modules():
        if isinstance(module, CausalSelfAttention):
            module.attention_kernel = build_attention_kernel(cfg, module.config.n_head)
    return model
