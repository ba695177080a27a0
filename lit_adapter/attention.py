"""Sparse causal attention patterns that skip the masked work.

Four patterns replace the dense causal attention of :class:`lit_adapter.model.CausalSelfAttention`:

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
blocks the pattern touches: local and the structured parts of strided/fixed gather key blocks per query block and
apply the small residual mask built from ``mask_mod``; shifted runs plain causal attention inside its groups. A
pattern that is the union of two structured parts computes each part with its log-sum-exp and merges the two
partial softmaxes exactly. With ``input_pos`` (KV-cache decoding) the rows of ``dense_mask`` for those positions
are used with dense SDPA, which is cheap for a few query rows.

``forward(..., prefix=(pk, pv))`` adds keys and values that every query sees in the same softmax (the virtual
tokens of prompt tuning, P-tuning and prefix tuning) while the pattern applies to the other keys: the prefix is one
more disjoint part of the union (merged exactly by log-sum-exp), or, for the shifted groups, concatenated in front
of every group's keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, List, Literal, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_adapter.errors import UserError

Pattern = Literal["dense", "strided", "fixed", "local", "shifted"]
PATTERNS = ("dense", "strided", "fixed", "local", "shifted")

# Masked scores in the log-sum-exp parts. Finite on purpose: a part with no visible key in a row then gets a
# finite log-sum-exp near -1e30, so its merge weight is exactly 0 and no NaN reaches the gradients.
_MASKED_SCORE = -1e30


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


class Part(NamedTuple):
    """One disjoint part of a pattern in the layout its kernel runs in.

    ``q``, ``k``, ``v``: (N, H, Tq, hs) and (N, H, Tk, hs); ``mask``: boolean, broadcastable to (N, H, Tq, Tk);
    ``to_common`` maps a per-query tensor (N, H, Tq, d) of this layout to (B, nh, T, d), ``from_common`` back
    (with zero rows where the layout has padding).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor
    to_common: Callable[[torch.Tensor], torch.Tensor]
    from_common: Callable[[torch.Tensor], torch.Tensor]


class SparseAttention(nn.Module):
    """Base of the patterns: the dense reference, the KV-cache path, the union of parts and the work count."""

    # On CPU the parts of a union run in PyTorch's fused flash kernel, whose log-sum-exp output makes the merge
    # exact; elsewhere (or with this switched off) they run as plain matmul + softmax.
    fused_cpu_parts = True

    def __init__(self) -> None:
        super().__init__()
        # Query-key scores computed by the last forward, per (batch element, head); the sparsity tests read it.
        self.last_scored_elements = 0.0
        self._scored = 0
        # (q, prefix keys, prefix values) during a forward with a prefix, else None
        self._prefix: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None

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
        """``q``, ``k``, ``v``: (B, nh, T, hs) with key/value groups already expanded; returns (B, nh, T, hs).

        ``prefix``: keys and values (B, nh, P, hs) that every query sees besides those the pattern selects.
        """
        B, nh, T, _ = q.shape
        self._scored = 0
        if input_pos is not None:
            mask = self.dense_mask(nh, T, k.shape[-2], q_positions=input_pos)  # (nh or 1, T, S)
            if prefix is not None:
                visible = mask.new_ones(mask.shape[0], T, prefix[0].shape[-2])  # (nh or 1, T, P)
                k, v = torch.cat([prefix[0], k], dim=2), torch.cat([prefix[1], v], dim=2)  # (B, nh, P + S, hs)
                mask = torch.cat([visible, mask], dim=-1)
            y = self._sdpa(q, k, v, attn_mask=mask.unsqueeze(0))
        else:
            if k.shape[-2] != T:
                raise ValueError(f"without input_pos keys and queries need the same length, got {k.shape[-2]}, {T}")
            self._prefix = None if prefix is None else (q, *prefix)
            try:
                y = self.sparse_forward(q, k, v)
            finally:
                self._prefix = None
        self.last_scored_elements = self._scored / (B * nh)
        return y

    def sparse_forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The block-sparse computation for a full causal sequence (query ``i`` at position ``i``)."""
        raise NotImplementedError

    def reference(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Dense SDPA under the explicit boolean ``dense_mask``; quadratic, for tests and benchmarks only."""
        mask = self.dense_mask(q.shape[1], q.shape[-2], device=q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.unsqueeze(0))

    @torch.no_grad()
    def scored_elements(self, T: int, num_heads: int = 2) -> float:
        """Measures the query-key scores per head that the sparse path computes for a sequence of ``T`` tokens."""
        x = torch.zeros(1, num_heads, T, 1)
        self(x, x, x)
        return self.last_scored_elements

    def _sdpa(self, q, k, v, attn_mask=None, is_causal=False) -> torch.Tensor:
        self._scored += q.shape[:-1].numel() * k.shape[-2]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)

    def _attend(self, part: Part) -> torch.Tensor:
        """One part's attention in the common layout (with the prefix, if any, merged in)."""
        if self._prefix is not None:
            return self._union([part])
        return part.to_common(self._sdpa(part.q, part.k, part.v, attn_mask=part.mask))

    def _causal(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Plain causal attention of a whole (B, nh, T, hs) sequence (with the prefix, if any, merged in)."""
        if self._prefix is None:
            return self._sdpa(q, k, v, is_causal=True)
        T = q.shape[-2]
        mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril().view(1, 1, T, T)
        return self._union([Part(q, k, v, mask, _identity, _identity)])

    def _union(self, parts: List[Part]) -> torch.Tensor:
        """Exact attention over the union of disjoint parts, (B, nh, T, hs) in the dtype of the queries."""
        if self._prefix is not None:  # every query sees the whole prefix: one more disjoint part
            q, pk, pv = self._prefix
            visible = torch.ones(1, 1, q.shape[-2], pk.shape[-2], dtype=torch.bool, device=q.device)
            parts = [*parts, Part(q, pk, pv, visible, _identity, _identity)]
        for part in parts:
            self._scored += part.q.shape[:-1].numel() * part.k.shape[-2]
        dtype = parts[0].q.dtype
        if self.fused_cpu_parts and _fused_cpu_supported(parts[0].q):
            tensors = [t for part in parts for t in (part.q, part.k, part.v)]
            return _FusedCPUUnion.apply(parts, *tensors).to(dtype)
        outputs = []
        for part in parts:
            out, lse = _attend_with_lse(part.q, part.k, part.v, part.mask)
            outputs.append((part.to_common(out), part.to_common(lse)))
        return merge_partial_softmaxes(outputs)[0].to(dtype)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax statistics and merges run in at least float32."""
    return torch.promote_types(dtype, torch.float32)


def _attend_with_lse(q, k, v, mask) -> Tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention with its log-sum-exp (..., Tq, 1), with plain matmuls."""
    acc = _accumulation_dtype(q.dtype)
    scores = torch.matmul(q, k.transpose(-1, -2)).to(acc) * (1.0 / math.sqrt(q.shape[-1]))
    scores = scores.masked_fill(~mask, _MASKED_SCORE)
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    probs = torch.exp(scores - lse)
    return torch.matmul(probs.to(v.dtype), v).to(acc), lse


def merge_partial_softmaxes(parts: List[Tuple[torch.Tensor, torch.Tensor]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention over the union of disjoint key sets from each set's output and log-sum-exp (..., 1)."""
    lse = torch.logsumexp(torch.stack([part_lse for _, part_lse in parts]), dim=0)
    return sum(out * torch.exp(part_lse - lse) for out, part_lse in parts), lse


def _fused_cpu_supported(q: torch.Tensor) -> bool:
    # float16 cannot hold the finite mask value that keeps empty rows' log-sum-exp meaningful.
    return (
        q.device.type == "cpu"
        and q.dtype in (torch.float32, torch.bfloat16, torch.float64)
        and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward")
    )


class _FusedCPUUnion(torch.autograd.Function):
    """The parts in PyTorch's CPU flash kernel, merged by log-sum-exp.

    Backward runs each part's flash backward with the *merged* output and log-sum-exp: the kernel recomputes the
    probabilities as ``exp(score - lse)``, which with the merged statistics are exactly the union's softmax
    restricted to the part, so the per-part gradients add up to the exact gradient (as in split-KV flash
    attention). A part whose row sees nothing gets a log-sum-exp near -1e30 and merge weight 0.
    """

    @staticmethod
    def forward(ctx, parts: List[Part], *tensors: torch.Tensor) -> torch.Tensor:
        # ``tensors`` repeats the parts' q, k, v so that autograd routes their gradients.
        dtype = parts[0].q.dtype
        # the kernel takes additive masks in the dtype of the queries
        masks = [torch.zeros(p.mask.shape, dtype=dtype).masked_fill_(~p.mask, _MASKED_SCORE) for p in parts]
        outputs = []
        for part, mask in zip(parts, masks):
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                part.q, part.k, part.v, 0.0, False, attn_mask=mask
            )
            acc = _accumulation_dtype(dtype)
            outputs.append((part.to_common(out.to(acc)), part.to_common(lse.unsqueeze(-1).to(acc))))
        out, lse = merge_partial_softmaxes(outputs)
        out = out.to(parts[0].q.dtype)
        ctx.layouts = [(part.to_common, part.from_common) for part in parts]
        ctx.save_for_backward(*tensors, *masks, out, lse)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        *saved, out, lse = ctx.saved_tensors
        n = len(ctx.layouts)
        qkv, masks = saved[: 3 * n], saved[3 * n:]
        grads = []
        for i, (_, from_common) in enumerate(ctx.layouts):
            q, k, v = qkv[3 * i: 3 * i + 3]
            # Padded rows come back as zeros: a zero gradient there makes their (finite) probabilities irrelevant.
            grads += torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                from_common(grad_out.to(q.dtype)).contiguous(),
                q, k, v,
                from_common(out).contiguous(),
                from_common(lse).squeeze(-1).contiguous(),
                0.0, False, attn_mask=masks[i],
            )
        return (None, *grads)


def _pad_seq(x: torch.Tensor, before: int, after: int) -> torch.Tensor:
    """Zero rows before and after the sequence dimension (-2) of (..., T, d)."""
    return F.pad(x, (0, 0, before, after)) if before or after else x


def _tiled(B: int, nh: int, T: int, nb: int, tile: int):
    """Layout maps between (B, nh, T, d) and query tiles (B * nh, nb, tile, d)."""

    def to_common(x):
        return x.reshape(B, nh, nb * tile, -1)[:, :, :T]

    def from_common(x):
        return _pad_seq(x, 0, nb * tile - T).reshape(B * nh, nb, tile, -1)

    return to_common, from_common


def _query_tile(window: int) -> int:
    # Query tiles near the window length keep the wasted band work (tile - 1 extra keys per row) bounded while
    # giving the kernel matrices large enough to be efficient.
    return max(16, min(window, 128))


def band_part(pattern: SparseAttention, q, k, v, band: int, part_mod=None) -> Part:
    """Each query over the ``band`` positions ending at itself, gathered per query tile.

    Each tile of queries gathers the contiguous keys from ``band - 1`` before its first query to its last query,
    so the work is ``T * (tile + band - 1)`` instead of ``T * T``. Inside the gathered keys ``pattern.mask_mod``
    (and ``part_mod``, which restricts to one part of a union) decides what is seen.
    """
    B, nh, T, hs = q.shape
    tile = min(_query_tile(band), T)
    nb = -(-T // tile)
    # Keys before position 0 are zero padding so that every tile gathers the same span; one tile needs none.
    before = band - 1 if nb > 1 else 0
    span = tile + before
    device = q.device

    # (B, nh, before + nb * tile, hs) -> (B, nh, nb, span, hs) -> (B * nh, nb, span, hs): the gathered key blocks
    def gather(x):
        x = _pad_seq(x, before, nb * tile - T).unfold(2, span, tile).transpose(-1, -2)
        return x.reshape(B * nh, nb, span, hs)

    q_pos = torch.arange(nb * tile, device=device).view(nb, tile, 1)  # (nb, tile, 1)
    k_pos = (torch.arange(nb, device=device) * tile - before).view(nb, 1, 1) + torch.arange(
        span, device=device
    ).view(1, 1, span)  # (nb, 1, span)
    # Padded queries (positions >= T) keep their diagonal so that no row is empty; their outputs are dropped.
    mask = (k_pos >= 0) & (k_pos <= q_pos) & (q_pos - k_pos < band)
    mask = mask & pattern.mask_mod(torch.zeros((), dtype=torch.long, device=device), q_pos, k_pos)
    if part_mod is not None:
        mask = mask & part_mod(q_pos, k_pos)
    to_common, from_common = _tiled(B, nh, T, nb, tile)
    return Part(from_common(q), gather(k), gather(v), mask.unsqueeze(0), to_common, from_common)


class LocalAttention(SparseAttention):
    """Sliding window: query ``i`` sees keys ``i - window < j <= i``."""

    def __init__(self, window: int) -> None:
        super().__init__()
        self.window = window

    def extra_repr(self) -> str:
        return f"window={self.window}"

    def mask_mod(self, head, q_idx, kv_idx):
        return (q_idx - kv_idx) < self.window

    def sparse_forward(self, q, k, v):
        return self._attend(band_part(self, q, k, v, min(self.window, q.shape[-2])))


class StridedAttention(SparseAttention):
    """Child et al.'s strided pattern: the previous ``stride`` tokens plus every ``stride``-th earlier token.

    The two parts are made disjoint: the band ``i - j < stride`` (gathered per query tile) and the strided
    positions ``i - j >= stride`` with ``(i - j) % stride == 0``. The latter are causal attention within each
    residue class ``i % stride``, a dense (T / stride)² problem per class after a reshape.
    """

    def __init__(self, stride: int) -> None:
        super().__init__()
        self.stride = stride

    def extra_repr(self) -> str:
        return f"stride={self.stride}"

    def mask_mod(self, head, q_idx, kv_idx):
        distance = q_idx - kv_idx
        return (distance < self.stride) | (distance % self.stride == 0)

    def sparse_forward(self, q, k, v):
        B, nh, T, hs = q.shape
        l = self.stride
        n = -(-T // l)  # positions per residue class
        if n == 1:  # no token is a full stride back: the band is everything
            return self._attend(band_part(self, q, k, v, T))
        band = band_part(self, q, k, v, l, part_mod=lambda qp, kp: qp - kp < l)

        # position m * l + r <-> (residue r, step m): (B, nh, T, d) <-> (B * nh, l, n, d)
        def from_common(x):
            return _pad_seq(x, 0, n * l - T).view(B, nh, n, l, -1).transpose(2, 3).reshape(B * nh, l, n, -1)

        def to_common(x):
            return x.view(B, nh, l, n, -1).transpose(2, 3).reshape(B, nh, n * l, -1)[:, :, :T]

        pos = torch.arange(n * l, device=q.device).view(n, l).t()  # (l, n): pos[r, m] = m * l + r
        q_pos, k_pos = pos.unsqueeze(-1), pos.unsqueeze(-2)  # (l, n, 1), (l, 1, n)
        head = torch.zeros((), dtype=torch.long, device=q.device)
        mask = (q_pos - k_pos >= l) & self.mask_mod(head, q_pos, k_pos)  # (l, n, n); rows m = 0 see nothing
        strided = Part(from_common(q), from_common(k), from_common(v), mask.unsqueeze(0), to_common, from_common)
        return self._union([band, strided])


class FixedAttention(SparseAttention):
    """Child et al.'s fixed pattern: a token sees its own block and the last ``summary_size`` tokens of each block.

    Disjoint parts: causal attention inside the block (block-diagonal), and attention to the summary tokens of
    strictly earlier blocks (a ``T x (T / block_size * summary_size)`` problem).
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

    def sparse_forward(self, q, k, v):
        B, nh, T, hs = q.shape
        l, c = self.block_size, self.summary_size
        device = q.device
        head = torch.zeros((), dtype=torch.long, device=device)
        if T <= l:  # one block: plain causal attention
            return self._causal(q, k, v)
        nb = -(-T // l)
        to_common, from_common = _tiled(B, nh, T, nb, l)
        pos = torch.arange(nb * l, device=device).view(nb, l)
        q_pos, k_pos = pos.unsqueeze(-1), pos.unsqueeze(-2)  # (nb, l, 1), (nb, 1, l)
        own_mask = (k_pos <= q_pos) & self.mask_mod(head, q_pos, k_pos)  # (nb, l, l)
        k_blocks, v_blocks = from_common(k), from_common(v)  # (B * nh, nb, l, hs)
        own = Part(from_common(q), k_blocks, v_blocks, own_mask.unsqueeze(0), to_common, from_common)

        # The summary tokens of every block: (B, nh, nb * c, hs).
        k_sum = k_blocks[:, :, l - c:].reshape(B, nh, nb * c, hs)
        v_sum = v_blocks[:, :, l - c:].reshape(B, nh, nb * c, hs)
        summary_pos = pos[:, l - c:].reshape(-1)
        q_pos = torch.arange(T, device=device).view(T, 1)
        sum_mask = (summary_pos // l < q_pos // l) & self.mask_mod(head, q_pos, summary_pos)  # (T, nb * c)
        summaries = Part(q, k_sum, v_sum, sum_mask.view(1, 1, T, nb * c), _identity, _identity)
        return self._union([own, summaries])


class ShiftedSparseAttention(SparseAttention):
    """LongLoRA's S²-Attn: causal attention within groups of ``G = group_size`` tokens.

    Heads ``< num_heads // 2`` use the groups ``[m * G, (m + 1) * G)``. The other heads use groups that start at
    ``G // 2 + m * G`` (group id ``(i + G - G // 2) // G``, i.e. ``(i + G / 2) // G`` for even ``G``): the
    partition LongLoRA gets by rolling those heads by ``G // 2``, minus the roll's wrap-around, so the first
    ``G // 2`` tokens form a group of their own instead of joining the last tokens.
    """

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

    def sparse_forward(self, q, k, v):
        if q.shape[1] != self.num_heads:
            raise ValueError(f"shifted attention was built for {self.num_heads} heads, got {q.shape[1]}")
        half = self.num_heads // 2
        first = self.group_size // 2  # the shifted heads' groups start at G // 2 + m * G
        prefix = None if self._prefix is None else self._prefix[1:]
        pre, post = (None, None) if prefix is None else ([t[:, :half] for t in prefix], [t[:, half:] for t in prefix])
        outputs = []
        if half:
            outputs.append(self._groups(q[:, :half], k[:, :half], v[:, :half], pre))
        shifted = []
        if first:
            shifted.append(self._groups(q[:, half:, :first], k[:, half:, :first], v[:, half:, :first], post))
        if q.shape[-2] > first:
            shifted.append(self._groups(q[:, half:, first:], k[:, half:, first:], v[:, half:, first:], post))
        outputs.append(torch.cat(shifted, dim=2) if len(shifted) > 1 else shifted[0])
        return torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]

    def _groups(self, q, k, v, prefix=None):
        """Causal attention inside consecutive groups of ``group_size`` (the last one may be shorter).

        ``prefix`` (keys, values (B, nh, P, hs)) is concatenated in front of every group's keys, visible to all.
        """
        B, nh, T, hs = q.shape
        G = self.group_size
        if T <= G and prefix is None:
            return self._sdpa(q, k, v, is_causal=True)
        ng = -(-T // G)
        G = min(G, T)

        def groups(x):  # (B, nh, T, hs) -> (B * nh, ng, G, hs); padding sits after every real query
            return _pad_seq(x, 0, ng * G - T).reshape(B * nh, ng, G, hs)

        if prefix is None:
            out = self._sdpa(groups(q), groups(k), groups(v), is_causal=True)
        else:
            P = prefix[0].shape[-2]
            pk, pv = (t.reshape(B * nh, 1, P, hs).expand(-1, ng, -1, -1) for t in prefix)  # (B * nh, ng, P, hs)
            causal = torch.ones(G, G, dtype=torch.bool, device=q.device).tril()
            mask = torch.cat([causal.new_ones(G, P), causal], dim=-1)  # (G, P + G)
            out = self._sdpa(groups(q), torch.cat([pk, groups(k)], dim=2), torch.cat([pv, groups(v)], dim=2),
                             attn_mask=mask)
        return out.reshape(B, nh, ng * G, hs)[:, :, :T]


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
    from lit_adapter.model import CausalSelfAttention

    if cfg.pattern == "shifted" and cfg.group_size is None:
        cfg = cfg.resolve(model.config.block_size)
    for module in model.modules():
        if isinstance(module, CausalSelfAttention):
            module.attention_kernel = build_attention_kernel(cfg, module.config.n_head)
    return model
