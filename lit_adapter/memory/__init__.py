"""Memory of one fine-tuning step: an analytic estimator, the measurements that check it, and memory savers.

The estimator (:func:`estimate_memory`) predicts the peak of *live tensor bytes* during a training step of the
engine in :mod:`lit_adapter.training` (forward, next-token cross-entropy, backward, gradient clipping, AdamW step),
the quantity that ``torch.cuda.max_memory_allocated`` reports on a GPU. It adds up

* the weights, by storage type: floating-point tensors in the run's dtype, and bitsandbytes' packed integers plus
  their quantization statistics for a quantized base (LLM.int8(), Dettmers et al. 2022; NF4, Dettmers et al. 2023);
* the trainable tensors' gradients and the optimizer state (AdamW: two moments in the parameter's dtype, as
  ``torch.optim.AdamW`` allocates them; bitsandbytes' 8-bit AdamW: one byte per moment plus block statistics);
* the activations autograd saves for the backward pass. They are derived from our exact model code, operation by
  operation (:mod:`lit_adapter.memory.saved`, :func:`saved_activations`): which op saves which tensor depends on what requires a gradient, so each
  method saves a different set (LLaMA-Adapter saves nothing below its first adapted layer, Adapter v2 saves the
  output of every wrapped linear for its scale's gradient, LoRA's CPU dropout saves a float mask, RMSNorm keeps a
  float32 copy of its input, SDPA keeps q, k, v, its output and the log-sum-exp: O(T) memory with the fused
  kernels and an O(T^2) probability matrix on the math path; the sparse patterns keep their gathered blocks).
  With activation checkpointing a block keeps only its input, and one block's set is rebuilt during its backward;
* the logits and the loss: the engine's ``loss_fn`` shifts the labels (the logits stay a view) and saves the
  float32 ``(B*T, V)`` log-probabilities (bf16 logits are first converted, a transient float32 copy); its backward
  turns that buffer into the gradient in place (``losses.CrossEntropy``), where ``F.cross_entropy`` would hold
  three such matrices. For small models and for 7B at long contexts this is still most of the peak.
  :func:`chunked_loss_fn` (``--train.loss chunked``) never holds more than a chunk of float32 logits (the peak
  drops to the logits and their gradient, in their own dtype) and :func:`~lit_adapter.losses.chunked_head_loss_fn`
  (``--train.loss chunked_head``) never holds more than a chunk of logits at all;
* short-lived working memory of the forward and backward passes and of the optimizer step.

The peak is the largest sum over the phases of a step (forward, loss, backward of each layer, optimizer step).
Framework overhead (the resident size of the Python process after ``import torch``) is not tensor memory; on CPU
it is stated separately. :func:`measure_step` runs the engine's step on random weights and measures the same
quantity: on CUDA the allocator's peak, on CPU the peak of live bytes that the c10 CPU allocator reports to the
profiler (:class:`AllocatorPeak`), next to the process's peak resident set size (raw, and net of the baseline
after imports). ``python -m lit_adapter.memory '<cell json>'`` runs one measurement in a fresh process, which is
how ``scripts/memory_sweep.py`` survives out-of-memory cells.
"""


from lit_adapter.losses import LOSSES  # noqa: E402  (re-exported: the estimator's loss kinds)
from lit_adapter.memory.estimate import (  # noqa: E402
    estimate_memory,
    format_estimate,
    optimizer_state_bytes,
    quantized_linear_bytes,
    weight_bytes,
)
from lit_adapter.memory.measure import (  # noqa: E402
    AllocatorPeak,
    Cell,
    build_random_model,
    current_rss_bytes,
    make_optimizer,
    measure_framework_overhead,
    measure_in_subprocess,
    measure_saved_activations,
    measure_step,
    peak_rss_bytes,
)
from lit_adapter.memory.saved import (  # noqa: E402
    ESTIMATED_PATTERNS,
    GB,
    OPTIMIZERS,
    PRECISIONS,
    SDPA_BACKENDS,
    precision_dtype,
    saved_activations,
)

__all__ = [
    "AllocatorPeak", "Cell", "ESTIMATED_PATTERNS", "GB", "LOSSES", "OPTIMIZERS", "PRECISIONS", "SDPA_BACKENDS",
    "build_random_model", "current_rss_bytes", "estimate_memory", "format_estimate", "make_optimizer",
    "measure_framework_overhead", "measure_in_subprocess", "measure_saved_activations", "measure_step",
    "optimizer_state_bytes", "peak_rss_bytes", "precision_dtype", "quantized_linear_bytes", "saved_activations",
    "weight_bytes",
]
