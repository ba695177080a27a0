"""Padding-free packing inside the model: several examples laid end to end in one row, none seeing another.

Why: micro-batches padded to their longest example spend about half of their positions on padding at Dolly
lengths (issue 23). A packed row holds only real tokens; :class:`PackedLayout` says where each example starts,
and the model keeps every example to itself:

* positions restart at 0 for each example (RoPE or learned positions), so an example's logits are those of the
  example run alone;
* attention stays inside each example. On CPU (and whenever a method computes the attention itself, or a sparse
  pattern replaces it) :meth:`PackedLayout.attend` runs the layer's attention once per example, on views of q, k
  and v: only each example's own causal work, and every method's attention hook and every sparse pattern applies
  at example-relative positions exactly as for an example alone. On CUDA, dense attention without a hook runs as
  one FlexAttention call with a document block mask, built once per forward.

The batch format (``lit_adapter.data.packing``) gives ``cu_seqlens`` ``(N + 1,)``: example ``i`` is
``input_ids[0, cu_seqlens[i]:cu_seqlens[i + 1]]``.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F


class PackedLayout:
    """Where the examples of a packed row are: ``lengths`` (rows of each, virtual tokens included) in order."""

    def __init__(self, lengths: List[int]) -> None:
        if not lengths or min(lengths) < 1:
            raise ValueError(f"a packed row needs examples of at least one token, got lengths {lengths}")
        self.lengths = lengths
        self._block_mask = None

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: "torch.Tensor | PackedLayout") -> "PackedLayout":
        """The layout of ``cu_seqlens`` offsets, or ``cu_seqlens`` itself when it is a layout already.

        From a device tensor this is a host read of N + 1 integers (a synchronisation on a GPU): the per-example
        calls need the lengths as ints. Training builds its layout on the host instead, from the batch's
        ``lengths`` (``lit_adapter.data.packing``), and hands it over as is.
        """
        if isinstance(cu_seqlens, PackedLayout):
            return cu_seqlens
        return cls(torch.diff(cu_seqlens.detach().to("cpu", torch.long)).tolist())

    def positions(self, offset: int = 0, device=None) -> torch.Tensor:
        """``(L,)`` positions, restarting at ``offset`` for each example."""
        return torch.cat([torch.arange(offset, offset + n, device=device) for n in self.lengths])

    def split(self, t: torch.Tensor, dim: int) -> List[torch.Tensor]:
        """The examples' views of ``t`` along ``dim`` (the packed row's axis)."""
        return list(t.split(self.lengths, dim=dim))

    def attend(self, attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The layer's attention of each example over its own keys: q (1, nh, L, hs), k, v (1, nh, L, hs) ->
        (1, nh, L, hs). ``attn`` is the ``CausalSelfAttention``; its ``adapter`` hook and ``attention_kernel``
        run per example, as they would for the example alone."""
        if attn.adapter is None and attn.attention_kernel is None and q.is_cuda and len(self.lengths) > 1:
            return self._flex(q, k, v)
        outs = []
        for q_i, k_i, v_i in zip(self.split(q, 2), self.split(k, 2), self.split(v, 2)):
            if attn.adapter is not None:
                outs.append(attn.adapter(attn, q_i, k_i, v_i, None))
            else:
                outs.append(attn.scaled_dot_product_attention(q_i, k_i, v_i))
        return torch.cat(outs, dim=2)

    def _flex(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """One FlexAttention call whose block mask keeps each query to the earlier keys of its own example
        (blocks wholly outside every example are skipped, so the work is each example's own)."""
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        L = q.shape[2]
        if self._block_mask is None:
            # (L,) example of each row, filled on the device: a host tensor copied over (or repeat_interleave's
            # output size) would make the host wait for the device
            doc = torch.cat([torch.full((n,), i, dtype=torch.int32, device=q.device)
                             for i, n in enumerate(self.lengths)])

            def document_causal(b, h, q_idx, kv_idx):
                return (doc[q_idx] == doc[kv_idx]) & (kv_idx <= q_idx)

            self._block_mask = create_block_mask(document_causal, None, None, L, L, device=q.device)
        # compiled on CUDA: uncompiled FlexAttention materialises the whole (L, L) score matrix
        kernel = compiled_flex_attention() if q.is_cuda else flex_attention
        return kernel(q, k, v, block_mask=self._block_mask)


_COMPILED = None


def compiled_flex_attention():
    """``torch.compile(flex_attention)``, built once per process (each call site would recompile)."""
    global _COMPILED
    if _COMPILED is None:
        from torch.nn.attention.flex_attention import flex_attention

        _COMPILED = torch.compile(flex_attention, dynamic=True)
    return _COMPILED


def dense_packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PackedLayout,
                           mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reference for tests: the full (L, L) document-causal mask in one SDPA call (T² work; never used to train)."""
    doc = torch.repeat_interleave(torch.arange(len(layout.lengths)), torch.tensor(layout.lengths)).to(q.device)
    L = q.shape[2]
    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    allowed = (doc[:, None] == doc[None, :]) & causal
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed if mask is None else allowed & mask)
