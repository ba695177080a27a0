"""Memory of one fine-tuning step: an analytic estimator, the measurements that check it, and memory savers.

The estimator (:func:`estimate_memory`) predicts the peak of *live tensor bytes* during a training step of the
engine in :mod:`lit_adapter.train.run` (forward, next-token cross-entropy, backward, gradient clipping, AdamW step),
the quantity that ``torch.cuda.max_memory_allocated`` reports on a GPU. It adds up

* the weights, by storage type: floating-point tensors in the run's dtype, and bitsandbytes' packed integers plus
  their quantization statistics for a quantized base (LLM.int8(), Dettmers et al. 2022; NF4, Dettmers et al. 2023);
* the trainable tensors' gradients and the optimizer state (AdamW: two moments in the parameter's dtype, as
  ``torch.optim.AdamW`` allocates them; bitsandbytes' 8-bit AdamW: one byte per moment plus block statistics);
* the activations autograd saves for the backward pass. They are derived from our exact model code, operation by
  operation (:mod:`lit_adapter.memory.saved`, :func:`saved_activations`): which op saves which tensor depends on
  what requires a gradient, so each method saves a different set. The walk knows the base model's ops
  (:mod:`lit_adapter.memory.ops`: RMSNorm keeps a float32 copy of its input, SDPA keeps q, k, v, its output and the
  log-sum-exp: O(T) memory with the fused kernels and an O(T^2) probability matrix on the math path, the sparse
  patterns keep the fused kernels' set) and asks the method's own terms
  (:class:`~lit_adapter.memory.terms.MemoryTerms`, from ``Method.memory_terms``) where it changes them.
  With activation checkpointing a block keeps only its input, and one block's set is rebuilt during its backward;
* the logits and the loss: the engine's ``loss_fn`` shifts the labels (the logits stay a view) and saves the
  float32 ``(B*T, V)`` log-probabilities (bf16 logits are first converted, a transient float32 copy); its backward
  turns that buffer into the gradient in place (``losses.CrossEntropy``), where ``F.cross_entropy`` would hold
  three such matrices. For small models and for 7B at long contexts this is still most of the peak.
  :func:`chunked_loss_fn` (``--train.loss chunked``) never holds more than a chunk of float32 logits (the peak
  drops to the logits and their gradient, in their own dtype) and :func:`~lit_adapter.train.losses.chunked_head_loss_fn`
  (``--train.loss chunked_head``) never holds more than a chunk of logits at all;
* short-lived working memory of the forward and backward passes and of the optimizer step.

The peak is the largest sum over the phases of a step (forward, loss, backward of each layer, optimizer step).
Framework overhead (the resident size of the Python process after ``import torch``) is not tensor memory; on CPU
it is stated separately. :func:`measure_step` runs the engine's step on random weights and measures the same
quantity: on CUDA the allocator's peak, on CPU the peak of live bytes that the c10 CPU allocator reports to the
profiler (:class:`AllocatorPeak`), next to the process's peak resident set size (raw, and net of the baseline
after imports). ``python -m lit_adapter.memory '<cell json>'`` runs one measurement in a fresh process, which is
how ``scripts/memory_sweep.py`` survives out-of-memory cells.

The names below are imported on first use (PEP 562), so that a method module can import
:mod:`lit_adapter.memory.ops` and :mod:`lit_adapter.memory.terms` without importing the estimator, which builds
the methods' models.
"""

import importlib
from typing import Any

_PUBLIC = {
    "LOSSES": "lit_adapter.train.losses",  # the estimator's loss kinds
    **{name: "lit_adapter.memory.estimate" for name in (
        "estimate_memory", "format_estimate", "optimizer_state_bytes", "quantized_linear_bytes", "weight_bytes")},
    **{name: "lit_adapter.memory.measure" for name in (
        "AllocatorPeak", "Cell", "build_random_model", "current_rss_bytes", "make_optimizer",
        "measure_framework_overhead", "measure_in_subprocess", "measure_saved_activations", "measure_step",
        "peak_rss_bytes")},
    **{name: "lit_adapter.memory.saved" for name in (
        "ESTIMATED_PATTERNS", "GB", "OPTIMIZERS", "PRECISIONS", "SDPA_BACKENDS", "precision_dtype",
        "saved_activations")},
    **{name: "lit_adapter.memory.terms" for name in ("MemoryTerms", "AttentionSite", "HeadEpilogue")},
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # once imported, a plain attribute
    return value
