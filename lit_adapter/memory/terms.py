"""What a fine-tuning method tells the memory estimator: :class:`MemoryTerms`, returned by
``Method.memory_terms(settings)``.

The estimator (:mod:`lit_adapter.memory.saved`) walks the base model's ops block by block and knows no method.
Where a method changes what autograd keeps, the walk asks the method's terms: at every linear layer, at the
attention, at a sublayer's output, and for the rows the blocks run on. A method's module subclasses
:class:`MemoryTerms` (a frozen dataclass carrying the settings it needs) and overrides only the hooks it changes,
calling the ops of :mod:`lit_adapter.memory.ops`; the defaults are the frozen base model's. The generic facts
(norms, base linears, embedding train) are fields, because the estimator also counts from them what is generic:
whether the embedding's backward keeps the token ids, whether a tied head's weight trains.

Every hook writes into the :class:`~lit_adapter.memory.ops.Saved` ledger it is given and returns whether the
tensor it produces requires a gradient (which decides what later ops save). Parameters, gradients and optimizer
state need no hook: the estimator counts them from the method's model built on the meta device.
"""

from __future__ import annotations

from dataclasses import dataclass

from lit_adapter.memory.ops import Dims, LinearSite, Saved, base_linear


@dataclass(frozen=True)
class AttentionSite:
    """A block's attention where the walk calls it: what the ``attention_output`` hook is told."""

    layer: int
    q_rg: bool
    """Whether the queries (:data:`~lit_adapter.memory.ops.QUERIES`) require a gradient."""
    backend: str
    """``flash`` (the fused SDPA kernels) or ``math``."""


@dataclass(frozen=True)
class HeadEpilogue:
    """Output-sized (rows, vocab) tensors an elementwise epilogue on the head adds to the loss chain (the logits
    are the largest tensors of a step, so these are counted outside the per-tensor ledger as well)."""

    kept: int = 0
    """How many it keeps for backward (while the logits exist, chunk by chunk under the head-chunked loss)."""
    backward: int = 0
    """How many its backward allocates beside the logits' gradient."""


@dataclass(frozen=True)
class MemoryTerms:
    """The frozen base model's terms; a method subclasses this and overrides the hooks where it differs."""

    norms: bool = False
    """The RMSNorm weights train."""
    base_linears: bool = False
    """Every base linear's weight trains."""
    embedding: bool = False
    """The token embedding trains (and, tied, the head's weight)."""

    def linear(self, saved: Saved, site: LinearSite, dims: Dims) -> bool:
        """At every linear of the blocks and at the head: what the layer as the method wraps it keeps; returns
        whether its output requires a gradient. An override usually calls this for the base layer, with a site of
        another input where the method transforms the input first (``dataclasses.replace(site, x=..., x_rg=...)``)."""
        return base_linear(saved, site, dims, self.base_linears)

    def extra_keys(self) -> int:
        """Trained keys and values in front of the real ones in every layer's attention (each query attends over
        ``extra_keys() + T`` keys under a mask, and every layer's attention output requires a gradient)."""
        return 0

    def attention_output(self, saved: Saved, site: AttentionSite, dims: Dims) -> bool:
        """After a block's attention (before ``o_proj``): a method that adds to its output (a second attention,
        over keys of its own) keeps what that adds and returns True; the output is then a new tensor requiring a
        gradient."""
        return False

    def sublayer_output(self, saved: Saved, site: str, x: str, layer: int, dims: Dims) -> bool:
        """On a sublayer's output: ``site`` is ``attn`` and ``mlp`` (the output before the residual add, ledger name
        ``x``) or ``block`` (the block's output). A method that transforms it keeps what that needs and returns
        True (the output then requires a gradient)."""
        return False

    def extra_rows(self) -> int:
        """Rows the blocks run on in front of every sequence's real tokens, all requiring a gradient from the first
        block on; ``ln_f``, the head and the loss see the real rows only."""
        return 0

    def backward_working_bytes(self, dims: Dims) -> int:
        """Short-lived bytes a block's backward needs beyond the base block's (the gradient of an output the
        method adds), with ``dims`` of the real rows."""
        return 0

    def head_epilogue(self) -> HeadEpilogue:
        """Output-sized tensors of an elementwise epilogue the method puts on the head (see :class:`HeadEpilogue`)."""
        return HeadEpilogue()
