"""The next-token loss, three ways with the same value and gradient and different memory (``--train.loss``).

* ``cross_entropy`` (:func:`loss_fn`): over all ``(B, T, V)`` logits in float32; the backward turns the saved
  log-probabilities into the gradient in place (:class:`CrossEntropy`);
* ``chunked`` (:func:`chunked_loss_fn`): 256 positions at a time, never a float32 copy of all logits;
* ``chunked_head`` (:func:`chunked_head_loss_fn`): the head too runs 256 positions at a time (recomputed in the
  backward), so the logits never exist whole.

:func:`forward_loss` is the model's forward followed by one of them: the training loop, validation, the memory
measurements and the benchmarks all call it, so they measure the same computation. docs/memory.md has the numbers.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_adapter.errors import UserError
from lit_adapter.model.packing import PackedLayout

LOSSES = ("cross_entropy", "chunked", "chunked_head")
DEFAULT_CHUNK = 256
"""Rows of logits per chunk for the chunked losses."""


class CrossEntropy(torch.autograd.Function):
    """``F.cross_entropy(rows.float(), targets, ignore_index=...)`` whose backward reuses the saved log-probabilities.

    PyTorch's own pair (``log_softmax`` then ``nll_loss``) saves the float32 log-probabilities and, in the backward,
    allocates a zero-filled ``(N, V)`` gradient for ``nll_loss`` and another for ``log_softmax``. Here the saved
    buffer itself becomes the gradient: ``exp`` turns it into the softmax, one is subtracted at each target and each
    row is scaled by ``grad / count`` (zero for ignored rows; ``mean=False`` sums). Same value and gradient, two fewer float32
    ``(N, V)`` matrices at the peak and three fewer passes over them (docs/throughput.md). Because the buffer is
    consumed, the graph can be backpropagated once (a second pass raises autograd's in-place error).
    """

    @staticmethod
    def forward(ctx, rows: torch.Tensor, targets: torch.Tensor, ignore_index: int, mean: bool = True) -> torch.Tensor:
        log_probs = torch.log_softmax(rows, dim=-1, dtype=torch.promote_types(rows.dtype, torch.float32))  # (N, V)
        valid = targets != ignore_index  # (N,)
        safe = targets.masked_fill(~valid, 0)
        count = valid.sum()
        picked = log_probs.gather(1, safe[:, None]).squeeze(1)  # (N,)
        divisor = count.clamp(min=1) if mean else torch.ones_like(count)
        ctx.save_for_backward(log_probs, safe, valid, divisor)
        ctx.rows_dtype = rows.dtype
        return -(picked * valid).sum() / divisor

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        log_probs, safe, valid, divisor = ctx.saved_tensors
        grad = log_probs.exp_()  # softmax, in the saved buffer
        grad.scatter_add_(1, safe[:, None], grad.new_full((grad.shape[0], 1), -1.0))
        grad.mul_((valid * (grad_output / divisor))[:, None])
        return grad.to(ctx.rows_dtype), None, None, None


def next_token_targets(labels: torch.Tensor, ignore_index: int = -100) -> Tuple[torch.Tensor, torch.Tensor]:
    """The (B, T) targets aligned with the logits (position t predicts token t + 1) and how many are not ignored.

    The count is a 0-dim tensor on the labels' device, not an ``int``: reading it would synchronise the host with
    the GPU on every micro-batch (the step reads its values once, ``Trainer.step``). A batch without targets needs
    no special case: the losses divide by ``count.clamp(min=1)``, so it is 0 with a zero gradient.

    The labels are shifted, not the logits: ``logits[:, :-1]`` cannot be viewed as rows when B > 1, so slicing the
    logits would copy them and its backward would zero-fill another (B, T, V) gradient (see docs/throughput.md).
    The last position gets ``ignore_index``, so a mean runs over exactly the same targets. Every loss kind uses it.
    """
    targets = F.pad(labels[:, 1:], (0, 1), value=ignore_index)  # (B, T)
    return targets, (targets != ignore_index).sum()


def loss_fn(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token cross-entropy over the unmasked targets, and how many targets there were.

    The targets come from :func:`next_token_targets`; the cross-entropy is computed in float32 (at least) by
    :class:`CrossEntropy`, equal to ``F.cross_entropy(rows.float(), ...)``.
    """
    targets, count = next_token_targets(labels, ignore_index)
    rows = logits.reshape(-1, logits.size(-1))  # (B*T, V), a view
    return CrossEntropy.apply(rows, targets.reshape(-1), ignore_index), count


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Cross-entropy over ``(B, T, V)`` logits that never holds a float32 copy of all of them.

    Forward computes each chunk's log-sum-exp in float32 and keeps only that ``(B, T)`` vector; backward rebuilds
    each chunk's softmax from it and writes the gradient (in the logits' dtype) chunk by chunk.
    """

    @staticmethod
    def forward(ctx, logits, targets, chunk_size: int, ignore_index: int):
        B, T, V = logits.shape
        acc = torch.promote_types(logits.dtype, torch.float32)  # at least float32, as F.cross_entropy(x.float())
        lse = torch.empty(B, T, device=logits.device, dtype=acc)
        total = torch.zeros((), device=logits.device, dtype=acc)
        valid = targets != ignore_index
        safe = torch.where(valid, targets, torch.zeros_like(targets))
        for b in range(B):
            for t0 in range(0, T, chunk_size):
                rows = logits[b, t0 : t0 + chunk_size].to(acc)  # (chunk, V)
                lse[b, t0 : t0 + chunk_size] = torch.logsumexp(rows, dim=-1)
                picked = rows.gather(-1, safe[b, t0 : t0 + chunk_size, None]).squeeze(-1)
                del rows  # before the next chunk's copy exists
                nll = lse[b, t0 : t0 + chunk_size] - picked
                total += (nll * valid[b, t0 : t0 + chunk_size]).sum()
        count = valid.sum()
        ctx.save_for_backward(logits, lse, safe, valid, count)
        ctx.chunk_size = chunk_size
        return total / count.clamp(min=1)

    @staticmethod
    def backward(ctx, grad_output):
        logits, lse, safe, valid, count = ctx.saved_tensors
        B, T, V = logits.shape
        grad = torch.empty_like(logits)
        scale = grad_output.to(lse.dtype) / count.clamp(min=1)
        for b in range(B):
            for t0 in range(0, T, ctx.chunk_size):
                t1 = t0 + ctx.chunk_size
                # softmax - one_hot(target), scaled; one float32 (chunk, V) buffer, updated in place
                probs = logits[b, t0:t1].to(lse.dtype, copy=True).sub_(lse[b, t0:t1, None]).exp_()
                probs.scatter_add_(-1, safe[b, t0:t1, None], -torch.ones_like(probs[:, :1]))
                probs.mul_(valid[b, t0:t1, None] * scale)
                grad[b, t0:t1] = probs
                del probs  # before the next chunk's buffer exists
        return grad, None, None, None


def chunked_cross_entropy(
    logits_or_hidden: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK,
    head: Optional[nn.Module] = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Mean cross-entropy over ``targets != ignore_index``, equal to ``F.cross_entropy`` on float32 logits.

    * ``head=None``: ``logits_or_hidden`` are ``(B, T, V)`` logits (any dtype) aligned with ``targets`` ``(B, T)``.
      Nothing of size ``B*T*V`` is kept besides the logits themselves; the backward writes the gradient in the
      logits' dtype. Compared with ``F.cross_entropy(logits.float())`` this drops the float32 copy, the saved
      ``log_softmax`` output and the two float32 gradients of its backward.
    * ``head`` given (the model's ``lm_head``, whatever wraps it): ``logits_or_hidden`` are the final hidden states
      ``(B, T, C)``; the logits are computed chunk by chunk under activation checkpointing, so the full logits never
      exist (``chunk_size`` rows of them at a time, in the forward and again in the backward).
    """
    if chunk_size < 1:
        raise UserError(f"chunk_size must be >= 1, got {chunk_size}")
    if logits_or_hidden.dim() == 2:
        logits_or_hidden, targets = logits_or_hidden.unsqueeze(0), targets.unsqueeze(0)
    if head is None:
        return _ChunkedCrossEntropy.apply(logits_or_hidden, targets, chunk_size, ignore_index)
    from torch.utils.checkpoint import checkpoint

    def chunk_loss(hidden: torch.Tensor, chunk_targets: torch.Tensor) -> torch.Tensor:
        return CrossEntropy.apply(head(hidden), chunk_targets, ignore_index, False)  # summed over the chunk

    rows = logits_or_hidden.reshape(-1, logits_or_hidden.size(-1))  # (B*T, C)
    flat_targets = targets.reshape(-1)
    total = rows.new_zeros((), dtype=torch.promote_types(rows.dtype, torch.float32))
    # split (not slicing in a loop): its backward concatenates the chunks' gradients once, where each slice's
    # backward would zero-fill a whole (B*T, C) gradient
    for hidden, chunk_targets in zip(rows.split(chunk_size), flat_targets.split(chunk_size)):
        total = total + checkpoint(chunk_loss, hidden, chunk_targets, use_reentrant=False)
    return total / (targets != ignore_index).sum().clamp(min=1)


def chunked_loss_fn(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, chunk_size: int = DEFAULT_CHUNK
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Drop-in for :func:`loss_fn` (same value and gradient) that neither copies nor upcasts all logits.

    The targets are shifted instead of the logits (:func:`next_token_targets`), so the gradient is one
    ``(B, T, V)`` tensor in the logits' dtype.
    """
    targets, count = next_token_targets(labels, ignore_index)
    return chunked_cross_entropy(logits, targets, chunk_size=chunk_size, ignore_index=ignore_index), count


def chunked_head_loss_fn(
    hidden: torch.Tensor, labels: torch.Tensor, head, ignore_index: int = -100, chunk_size: int = DEFAULT_CHUNK
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The same loss from the final hidden states ``(B, T, C)`` and the model's head (``GPT.output_logits``).

    The logits exist ``chunk_size`` rows at a time, in the forward and again (recomputed) in the backward: no
    ``(B, T, V)`` tensor at all, for one extra head matmul per step.
    """
    targets, count = next_token_targets(labels, ignore_index)
    return chunked_cross_entropy(hidden, targets, chunk_size=chunk_size, head=head, ignore_index=ignore_index), count


def target_rows(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """The positions ``(n,)`` of the flattened ``(B * T)`` rows whose next-token target is not ignored.

    Computed where a batch is collated, on the host, so that it travels to the device with the batch: taking it
    there from a boolean mask (``nonzero``) would make the host wait for the device on every micro-batch.
    :func:`forward_loss` runs the head and the loss on these rows only.
    """
    return torch.nonzero(next_token_targets(labels, ignore_index)[0].reshape(-1) != ignore_index).flatten()


def forward_loss(model, input_ids: torch.Tensor, labels: torch.Tensor, loss: str = "cross_entropy",
                 autocast=contextlib.nullcontext, cu_seqlens: Optional[torch.Tensor] = None,
                 lengths: Optional[Sequence[int]] = None, rows: Optional[torch.Tensor] = None,
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The model's forward and the loss of kind ``loss`` (``TrainArgs.loss``): (mean loss, target count as a
    0-dim tensor, see :func:`next_token_targets`).

    The logits are not returned: nothing saved for the backward needs them, so they are freed here rather than
    held through the backward and the optimizer step (a (B, T, V) tensor less at the peak). ``chunked_head``
    calls the head outside ``model.forward``; ``autocast`` (Fabric's) gives it the forward's precision context.
    ``cu_seqlens`` marks a packed row (``lit_adapter.data.packing``): the model keeps its examples apart;
    ``lengths``, the examples' lengths as host ints, stands for it without reading it back from the device.

    ``rows`` (:func:`target_rows` of ``labels``, made on the host): the head and the loss run on these positions
    only. With Dolly's template the prompt is masked out of the loss (often 30-50% of the real tokens, and every
    padded position): the vocabulary-wide head is more than half of a small model's step, and its logits and
    their gradient the biggest tensors of it. The head is the model's own (``output_logits``, whatever a method
    wraps around it), so the loss, its gradients and the count are those of the full logits.
    """
    packed = {}
    if lengths is not None:
        packed = {"cu_seqlens": PackedLayout(list(lengths))}
    elif cu_seqlens is not None:
        packed = {"cu_seqlens": cu_seqlens}
    if loss not in LOSSES:  # before the forward, not after it
        raise UserError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
    if rows is not None:
        hidden = model(input_ids, return_hidden=True, **packed)  # (B, T, n_embd)
        targets, count = next_token_targets(labels)
        hidden = hidden.reshape(-1, hidden.size(-1)).index_select(0, rows)  # (n, n_embd)
        targets = targets.reshape(-1).index_select(0, rows)  # (n,)
        if loss == "chunked_head":
            with autocast():
                return chunked_cross_entropy(hidden, targets, head=model.output_logits), count
        with autocast():
            logits = model.output_logits(hidden)  # (n, vocab_size)
        if loss == "chunked":
            return chunked_cross_entropy(logits, targets), count
        return CrossEntropy.apply(logits, targets, -100), count
    if loss == "chunked_head":
        hidden = model(input_ids, return_hidden=True, **packed)  # (B, T, n_embd)
        with autocast():
            return chunked_head_loss_fn(hidden, labels, head=model.output_logits)
    logits = model(input_ids, **packed)  # (B, T, vocab_size)
    return (chunked_loss_fn if loss == "chunked" else loss_fn)(logits, labels)
