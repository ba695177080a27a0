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
  information flows between neighbouring groups. LongLoRA rolls the shifted heads, which lets the last group see
  the first tokens; we keep the groups on the original positions (group id ``(i + G // 2) // G``) so attention
  stays causal.

Every pattern is a parameter-free module. ``mask_mod(head, q_idx, kv_idx)`` defines it (without causality) and
``dense_mask`` turns it into the boolean reference mask. ``forward`` without ``input_pos`` computes only the
blocks the pattern touches: local and the structured parts of strided/fixed gather key blocks per query block and
apply the small residual mask built from ``mask_mod``; shifted runs plain causal attention inside its groups. A
pattern that is the union of two structured parts computes each part with its log-sum-exp and merges the two
partial softmaxes exactly. With ``input_pos`` (KV-cache decoding) the rows of ``dense_mask`` for those positions
are used with dense SDPA, which is cheap for a few query rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import List, Literal, Optional, Tuple

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


class SparseAttention(nn.Module):
    """Base of the patterns: the dense reference, the KV-cache path and the count of computed scores."""

    def __init__(self) -> None:
        super().__init__()
        # Query-key scores computed by the last forward, per (batch element, head); the sparsity tests read it.
        self.last_scored_elements = 0.0
        self._scored = 0

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
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, input_pos: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """``q``, ``k``, ``v``: (B, nh, T, hs) with key/value groups already expanded; returns (B, nh, T, hs)."""
        B, nh, T, _ = q.shape
        self._scored = 0
        if input_pos is not None:
            mask = self.dense_mask(nh, T, k.shape[-2], q_positions=input_pos)  # (nh or 1, T, S)
            y = self._sdpa(q, k, v, attn_mask=mask.unsqueeze(0))
        else:
            if k.shape[-2] != T:
                raise ValueError(f"without input_pos keys and queries must have the same length, got {k.shape[-2]}, {T}")
            y = self.sparse_forward(q, k, v)
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

    # Every attention call goes through one of these two, so that the work done is counted.
    def _sdpa(self, q, k, v, attn_mask=None, is_causal=False) -> torch.Tensor:
        self._scored += q.shape[:-1].numel() * k.shape[-2]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)

    def _attend_with_lse(self, q, k, v, mask) -> Tuple[torch.Tensor, torch.Tensor]:
        """Softmax attention that also returns its log-sum-exp, in float32; ``mask`` broadcasts to the scores."""
        self._scored += q.shape[:-1].numel() * k.shape[-2]
        scores = torch.matmul(q, k.transpose(-1, -2)).float() * (1.0 / math.sqrt(q.shape[-1]))
        scores = scores.masked_fill(~mask, _MASKED_SCORE)
        lse = torch.logsumexp(scores, dim=-1, keepdim=True)  # (..., Tq, 1)
        probs = torch.exp(scores - lse)
        return torch.matmul(probs.to(v.dtype), v).float(), lse


def merge_partial_softmaxes(parts: List[Tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Exact softmax attention over the union of disjoint key sets from per-set outputs and log-sum-exps."""
    lse = torch.logsumexp(torch.stack([part_lse for _, part_lse in parts]), dim=0)
    return sum(out * torch.exp(part_lse - lse) for out, part_lse in parts)


def _pad_seq(x: torch.Tensor, before: int, after: int) -> torch.Tensor:
    """Zero rows before and after the sequence dimension of (B, nh, T, hs)."""
    return F.pad(x, (0, 0, before, after)) if before or after else x


def _query_tile(window: int) -> int:
    # Query blocks near the window length keep the wasted band work (tile - 1 extra keys per row) bounded while
    # giving the kernel matrices large enough to be efficient.
    return max(16, min(window, 128))


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
        return banded_attention(self, q, k, v, min(self.window, q.shape[-2]))


def banded_attention(
    pattern: SparseAttention, q, k, v, band: int, with_lse: bool = False, part_mod=None
):
    """Attention of each query over the ``band`` positions ending at itself, gathered per query block.

    The queries are cut into tiles; each tile gathers the contiguous keys from ``band - 1`` before its first query
    to its last query, so the work is ``T * (tile + band - 1)`` instead of ``T * T``. Inside the gathered keys
    ``pattern.mask_mod`` (and ``part_mod``, which restricts to one part of a union) decides what is seen.
    """
    B, nh, T, hs = q.shape
    tile = min(_query_tile(band), T)
    nb = -(-T // tile)
    span = tile + band - 1
    device = q.device

    # (B, nh, nb * tile + band - 1, hs) -> (B, nh, nb, span, hs) -> (B * nh, nb, span, hs): the gathered key blocks
    def gather(x):
        x = _pad_seq(x, band - 1, nb * tile - T).unfold(2, span, tile).transpose(-1, -2)
        return x.reshape(B * nh, nb, span, hs)

    k_blocks, v_blocks = gather(k), gather(v)
    q_blocks = _pad_seq(q, 0, nb * tile - T).reshape(B * nh, nb, tile, hs)

    q_pos = torch.arange(nb * tile, device=device).view(nb, tile, 1)  # (nb, tile, 1)
    k_pos = (torch.arange(nb, device=device) * tile - (band - 1)).view(nb, 1, 1) + torch.arange(
        span, device=device
    ).view(1, 1, span)  # (nb, 1, span)
    # Padded queries (positions >= T) keep their diagonal so that no row is empty; their outputs are dropped.
    mask = (k_pos >= 0) & (k_pos <= q_pos) & (q_pos - k_pos < band)
    mask = mask & pattern.mask_mod(torch.zeros((), dtype=torch.long, device=device), q_pos, k_pos)
    if part_mod is not None:
        mask = mask & part_mod(q_pos, k_pos)

    if with_lse:
        out, lse = pattern._attend_with_lse(q_blocks, k_blocks, v_blocks, mask)  # (B * nh, nb, tile, hs)
        return out.reshape(B, nh, nb * tile, hs)[:, :, :T], lse.reshape(B, nh, nb * tile, 1)[:, :, :T]
    out = pattern._sdpa(q_blocks, k_blocks, v_blocks, attn_mask=mask.unsqueeze(0))
    return out.reshape(B, nh, nb * tile, hs)[:, :, :T]


class StridedAttention(SparseAttention):
    """Child et al.'s strided pattern: the previous ``stride`` tokens plus every ``stride``-th earlier token.

    The two parts are made disjoint: the band ``i - j < stride`` (gathered per query block) and the strided
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
        if n == 1:  # no token is a full stride back: only the band
            return banded_attention(self, q, k, v, T)
        band = banded_attention(self, q, k, v, l, with_lse=True, part_mod=lambda qp, kp: qp - kp < l)

        # position m * l + r -> (residue r, step m): (B, nh, n, l, hs) -> (B, nh, l, n, hs)
        def by_residue(x):
            return _pad_seq(x, 0, n * l - T).view(B, nh, n, l, hs).transpose(2, 3)

        pos = torch.arange(n * l, device=q.device).view(n, l).t()  # (l, n): pos[r, m] = m * l + r
        q_pos, k_pos = pos.unsqueeze(-1), pos.unsqueeze(-2)  # (l, n, 1), (l, 1, n)
        head = torch.zeros((), dtype=torch.long, device=q.device)
        mask = (q_pos - k_pos >= l) & self.mask_mod(head, q_pos, k_pos)  # (l, n, n), rows m = 0 empty
        out, lse = self._attend_with_lse(by_residue(q), by_residue(k), by_residue(v), mask)  # (B, nh, l, n, .)
        strided = (
            out.transpose(2, 3).reshape(B, nh, n * l, hs)[:, :, :T],
            lse.transpose(2, 3).reshape(B, nh, n * l, 1)[:, :, :T],
        )
        return merge_partial_softmaxes([band, strided]).to(q.dtype)


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
        # A sequence shorter than a block is one block: no padding up to the block length.
        lb = min(l, T)
        nb = -(-T // lb)

        def blocks(x):  # (B, nh, T, hs) -> (B, nh, nb, lb, hs)
            return _pad_seq(x, 0, nb * lb - T).view(B, nh, nb, lb, hs)

        pos = torch.arange(nb * lb, device=device).view(nb, lb)
        q_pos, k_pos = pos.unsqueeze(-1), pos.unsqueeze(-2)  # (nb, lb, 1), (nb, 1, lb)
        own_mask = (k_pos <= q_pos) & self.mask_mod(head, q_pos, k_pos)  # (nb, lb, lb)
        out, lse = self._attend_with_lse(blocks(q), blocks(k), blocks(v), own_mask)
        own = out.reshape(B, nh, nb * lb, hs)[:, :, :T], lse.reshape(B, nh, nb * lb, 1)[:, :, :T]
        if nb == 1:
            return own[0].to(q.dtype)

        # Summary tokens of every block that the sequence reaches: (B, nh, nb * c, hs).
        summary_pos = pos[:, l - c:].reshape(-1)
        k_sum, v_sum = blocks(k)[:, :, :, l - c:].reshape(B, nh, -1, hs), blocks(v)[:, :, :, l - c:].reshape(
            B, nh, -1, hs
        )
        q_pos = torch.arange(T, device=device).view(T, 1)
        sum_mask = (summary_pos // l < q_pos // l) & self.mask_mod(head, q_pos, summary_pos)  # (T, nb * c)
        summaries = self._attend_with_lse(q, k_sum, v_sum, sum_mask)  # rows of the first block see none
        return merge_partial_softmaxes([own, summaries]).to(q.dtype)


class ShiftedSparseAttention(SparseAttention):
    """LongLoRA's S²-Attn: causal attention within groups of ``group_size``; heads ``>= num_heads // 2`` use
    groups shifted by ``group_size // 2`` (group id ``(i + group_size // 2) // group_size``)."""

    def __init__(self, group_size: int, num_heads: int) -> None:
        super().__init__()
        self.group_size = group_size
        self.num_heads = num_heads

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}, num_heads={self.num_heads}"

    def mask_mod(self, head, q_idx, kv_idx):
        shift = torch.where(head >= self.num_heads // 2, self.group_size // 2, 0)
        G = self.group_size
        return (q_idx + shift) // G == (kv_idx + shift) // G

    def sparse_forward(self, q, k, v):
        if q.shape[1] != self.num_heads:
            raise ValueError(f"shifted attention was built for {self.num_heads} heads, got {q.shape[1]}")
        half = self.num_heads // 2
        G, shift = self.group_size, self.group_size // 2
        outputs = []
        if half:
            outputs.append(self._groups(q[:, :half], k[:, :half], v[:, :half]))
        # The shifted heads: the first group holds only G // 2 tokens, the others G.
        shifted = [self._groups(q[:, half:, :shift], k[:, half:, :shift], v[:, half:, :shift])] if shift else []
        if q.shape[-2] > shift:
            shifted.append(self._groups(q[:, half:, shift:], k[:, half:, shift:], v[:, half:, shift:]))
        outputs.append(torch.cat(shifted, dim=2) if len(shifted) > 1 else shifted[0])
        return torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]

    def _groups(self, q, k, v):
        """Causal attention inside consecutive groups of ``group_size`` (the last one may be shorter)."""
        B, nh, T, hs = q.shape
        G = self.group_size
        if T <= G:
            return self._sdpa(q, k, v, is_causal=True)
        ng = -(-T // G)

        def groups(x):  # (B, nh, T, hs) -> (B * nh, ng, G, hs); padding sits after every real query
            return _pad_seq(x, 0, ng * G - T).reshape(B * nh, ng, G, hs)

        out = self._sdpa(groups(q), groups(k), groups(v), is_causal=True)
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
