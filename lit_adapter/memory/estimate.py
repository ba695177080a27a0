"""The analytic peak-memory estimate of one training step (:func:`estimate_memory`) and its printout.

It adds up the weights by storage type, the trainable tensors' gradients and optimizer state, the activations
autograd keeps (:mod:`lit_adapter.memory.saved`), the logits and the loss chain (walked allocation by allocation
through :mod:`lit_adapter.train.losses`), and the short-lived working memory of each phase; the peak is the largest
phase. See the package docstring for what is counted and ``tests/test_memory.py`` for how it is checked.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Union

import torch
import torch.nn as nn

from lit_adapter.model.config import Config
from lit_adapter.errors import UserError
from lit_adapter.train.losses import DEFAULT_CHUNK, LOSSES
from lit_adapter.tuners.registry import build_model, mark_trainable, unquantized
from lit_adapter.model.quantize import default_skip
from lit_adapter.model.rope import context_error, rope_table_rows
from lit_adapter.memory.ops import Dims, element_size
from lit_adapter.memory.saved import (
    ESTIMATED_PATTERNS,
    GB,
    OPTIMIZERS,
    SDPA_BACKENDS,
    block_dims,
    block_saved,
    head_saved,
    head_saved_chunked,
    head_weight_trains,
    make_dims,
    precision_dtype,
)
from lit_adapter.memory.terms import HeadEpilogue


def quantized_linear_bytes(in_features: int, out_features: int, mode: str) -> int:
    """Bytes bitsandbytes keeps for one frozen ``(out, in)`` weight (as measured on its CPU and CUDA layers).

    int8: the int8 matrix and one float32 scale per output row. NF4/FP4: two weights per byte and one float32
    absmax per block of 64. NF4 with double quantization: the absmax values themselves in 8 bits, with one float32
    scale per 256 of them and a 256-entry code book.
    """
    n = in_features * out_features
    if mode == "bnb.int8":
        return n + 4 * out_features
    blocks = -(-n // 64)
    if mode == "bnb.nf4-dq":
        return -(-n // 2) + blocks + 4 * -(-blocks // 256) + 4 * 256 + 4 * 16 + 4
    if mode in ("bnb.nf4", "bnb.fp4"):
        return -(-n // 2) + 4 * blocks + 4 * 16
    raise UserError(f"unknown quantize mode {mode!r}")


def _meta_model(config: Config, spec) -> nn.Module:
    with torch.device("meta"):
        model = build_model(spec, config)
    mark_trainable(model, spec)
    return model


def weight_bytes(model: nn.Module, dtype: torch.dtype, quantize: Optional[str],
                 skip: Callable[[str], bool] = default_skip) -> Dict[str, int]:
    """Bytes of ``model``'s tensors by storage kind, as ``methods.prepare_model`` leaves them.

    Every floating-point tensor is cast to ``dtype``; with ``quantize`` the linears that
    :func:`lit_adapter.model.quantize.quantize_linears` replaces are counted at their quantized size instead.
    """
    quantized_weights = set()
    out: Dict[str, int] = {}
    if quantize is not None:
        for name, module in model.named_modules():
            if type(module) is nn.Linear and not skip(name):
                quantized_weights.add(id(module.weight))
                key = quantize.replace("bnb.", "")
                out[key] = out.get(key, 0) + quantized_linear_bytes(module.in_features, module.out_features, quantize)
    seen = set()
    dtype_name = str(dtype).replace("torch.", "")
    for p in model.parameters():
        if id(p) in seen or id(p) in quantized_weights:
            continue
        seen.add(id(p))
        out[dtype_name] = out.get(dtype_name, 0) + p.numel() * element_size(dtype)
    return out


def quant_state_bytes(model: nn.Module, quantize: Optional[str], skip: Callable[[str], bool]) -> Dict[str, int]:
    """Of :func:`weight_bytes`' quantized kinds, the bytes that are not the packed 4-bit codes (absmax, code book):
    they are no parameter, so fsdp leaves them whole on every process (``lit_adapter.model.quantize``)."""
    if quantize in (None, "bnb.int8"):
        return {}
    total = 0
    for name, module in model.named_modules():
        if type(module) is nn.Linear and not skip(name):
            n = module.in_features * module.out_features
            total += quantized_linear_bytes(module.in_features, module.out_features, quantize) - -(-n // 2)
    return {quantize.replace("bnb.", ""): total}


def optimizer_state_bytes(trainable: List[nn.Parameter], dtype: torch.dtype, optimizer: str) -> int:
    """AdamW's state for ``trainable`` (shapes only; meta tensors are fine)."""
    if optimizer == "adamw":
        # torch.optim.AdamW: exp_avg and exp_avg_sq like the parameter, plus a float32 step counter per tensor
        return sum(2 * p.numel() * element_size(dtype) + 4 for p in trainable)
    if optimizer == "adamw8bit":
        total = 0
        for p in trainable:
            n = p.numel()
            if n >= 4096:  # bitsandbytes' min_8bit_size: smaller tensors keep 32-bit state
                total += 2 * n + 2 * 4 * -(-n // 256) + 2 * 256 * 4
            else:
                total += 2 * 4 * n
        return total
    raise UserError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")


def _loss_chain(dims: Dims, epilogue: HeadEpilogue, loss: str, weight_trains: bool = False) -> int:
    """Peak bytes of logits + loss from the head's forward to the gradient at the head's input.

    Walks ``losses.forward_loss`` allocation by allocation. Nothing of it outlives the step's backward: the
    training loop keeps only the loss, so the logits go as soon as nothing saved for the backward needs them.
    ``epilogue`` counts the output-sized tensors a method's elementwise epilogue on the head keeps and allocates.
    """
    B, T, V, d = dims.B, dims.T, dims.V, dims.d
    N = B * T  # the labels are shifted, so every position is a row (the last one is ignored)
    logits = N * V * d
    alive, peak = 0, 0

    def alloc(n: int) -> None:
        nonlocal alive, peak
        alive += n
        peak = max(peak, alive)

    if loss == "chunked_head":
        # One chunk of c rows at a time under checkpointing, nothing saved across chunks. The forward (and its
        # recomputation in the backward) holds the chunk's logits (and what an epilogue keeps of the head's
        # output), their float32 copy (bf16) and the float32 log-probabilities; the backward turns those into the
        # gradient in place (``losses.CrossEntropy``), converts it to the logits' dtype, and an epilogue then forms
        # its own products beside it. The chunks' (c, C) input gradients pile up to (N, C) and are concatenated
        # once at the end.
        c = min(N, DEFAULT_CHUNK) * V
        kept = epilogue.kept * c * d
        epilogue_backward = (1 + epilogue.kept + epilogue.backward) * c * d if epilogue.backward else 0
        forward = c * d + (c * 4 if d != 4 else 0) + c * 4 + kept
        backward = max(forward, c * 4 + (c * d if d != 4 else 0) + kept, epilogue_backward)
        hidden_grads = N * dims.C * d
        peak = max(forward, backward + hidden_grads, 2 * hidden_grads)
        if weight_trains:  # the head weight trains: the head's .grad (from the first chunk on), and each later
            W = V * dims.C * d  # chunk's own weight gradient beside it while the chunk's logit gradient is alive
            peak = max(peak, backward + hidden_grads + W, 2 * W + c * d + hidden_grads, 2 * hidden_grads + W)
        return peak
    alloc(logits)
    if loss == "chunked":
        # forward: a (chunk, V) float32 copy (unless float32) and logsumexp's buffer per chunk, keeping only the
        # (B, T) log-sum-exp and the logits themselves (saved); backward: the (B, T, V) gradient written from one
        # float32 (chunk, V) buffer, then the saved logits go
        chunk = min(T, DEFAULT_CHUNK) * V * 4
        alloc(B * T * 4)
        alloc(chunk * (2 if d != 4 else 1))
        alive -= chunk * (2 if d != 4 else 1)
        alloc(logits)
        alloc(chunk)
        alive -= chunk
        alive -= logits
    else:
        upcast = N * V * 4 if d != 4 else 0  # log_softmax(dtype=float32) converts first; float32 logits are used as is
        alloc(upcast)
        alloc(N * V * 4)  # the float32 log-probabilities (saved); the backward turns them into the gradient in place
        alive -= upcast
        alive -= logits  # nothing saved needs the logits: they go when forward_loss returns
        if d != 4:
            alloc(N * V * d)  # the gradient in the logits' dtype, then the float32 buffer goes
            alive -= N * V * 4
    alloc(epilogue.backward * logits)  # an epilogue's products in its backward, beside the logits' gradient
    return peak


def estimate_memory(
    config: Config,
    spec,
    micro_batch_size: int,
    seq_len: int,
    dtype: Union[str, torch.dtype] = "32-true",
    activation_checkpointing: bool = False,
    quantize: Optional[str] = "spec",
    optimizer: str = "adamw",
    device_type: str = "cpu",
    sdpa: str = "flash",
    loss: str = "cross_entropy",
    framework_overhead_bytes: int = 0,
    micro_batch_tokens: Optional[int] = None,
    shards: int = 1,
) -> Dict[str, Any]:
    """Predicted peak live tensor bytes of one training step of ``spec`` on ``config``, with its breakdown.

    ``dtype`` is a precision (``32-true``, ``bf16-true``, ``16-true``) or a torch dtype: the weights', activations'
    and (as in the engine) the trainable tensors' dtype. ``quantize`` defaults to ``spec.quantize``. ``sdpa`` is the
    attention backend: ``flash`` for the fused kernels (CPU flash, CUDA flash or memory-efficient; O(T) memory) or
    ``math`` (O(T^2)). ``loss="chunked"`` estimates :func:`chunked_loss_fn` in place of ``losses.loss_fn``.
    ``framework_overhead_bytes`` (the process's resident size after imports, CPU) is reported beside the peak,
    not in it. Bytes are exact counts; ``*_gb`` values are in units of 1e9 bytes.

    ``micro_batch_tokens`` (packing, ``--data.packing``): a micro-batch is a packed row of up to that many tokens,
    its examples each at most ``seq_len``; it replaces ``micro_batch_size`` and is estimated as
    ``ceil(micro_batch_tokens / seq_len)`` rows of ``seq_len`` tokens: the same per-token tensors and no attention
    call longer than one example, rounded up. Rows a method puts in front of each example are counted once per
    ``seq_len`` tokens, where a packed row of many short examples has them once per example: an under-count there.
    ``shards`` > 1 is one process of ``--fabric.strategy fsdp`` over that many (:mod:`lit_adapter.train.sharding`):
    weights, gradients and optimizer state are divided among them, and each process also holds, whole, the root
    unit's weights (embedding, final norm, head: gathered for the whole forward and backward) and two blocks'
    (the one running and the one FSDP2 prefetches); activations are per process, as on one device. FSDP2's
    communication buffers are counted where they meet the peak: a block's all-gather output beside its unsharded
    parameters (forward), each unit's whole gradients until its reduce-scatter and the previous block's
    reduce-scatter input and output until the next one waits for it (backward), the root's whole gradients at the
    embedding's backward, the step's last moment (``embedding_backward``); the optimizer step sees only shards.
    """
    if micro_batch_tokens is not None:
        if micro_batch_tokens < 1:
            raise UserError(f"micro_batch_tokens must be >= 1, got {micro_batch_tokens}")
        micro_batch_size = -(-micro_batch_tokens // seq_len)
    if quantize == "spec":
        quantize = spec.quantize
    for value, allowed, what in ((optimizer, OPTIMIZERS, "optimizer"), (sdpa, SDPA_BACKENDS, "sdpa"),
                                 (loss, LOSSES, "loss"), (device_type, ("cpu", "cuda"), "device_type")):
        if value not in allowed:
            raise UserError(f"unknown {what} {value!r}; choose one of {', '.join(allowed)}")
    if micro_batch_size < 1 or seq_len < 2:
        raise UserError("micro_batch_size must be >= 1 and seq_len >= 2")
    if seq_len > config.block_size:  # the model cannot run it: estimate only what it can (scaled windows included)
        raise UserError(context_error(config.block_size, config.rope_scaling, seq_len, "the estimate's seq_len"))
    dtype = precision_dtype(dtype)
    dims = make_dims(config, micro_batch_size, seq_len, dtype, device_type, quantize)
    N, C, I, d = dims.N, dims.C, dims.I, dims.d
    t = spec.definition.memory_terms(spec.settings)
    bdims = block_dims(dims, t)  # the blocks' rows: the real tokens and any the method puts in front of them
    bN = bdims.N

    model = _meta_model(config, spec)
    weights = weight_bytes(model, dtype, quantize, skip=unquantized(spec))
    rope = 2 * rope_table_rows(config.block_size, config.rope_scaling, seq_len) * config.head_size * 4
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in {id(p): p for p in trainable}.values())
    n_total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    grads = n_trainable * d
    opt_state = optimizer_state_bytes(trainable, dtype, optimizer)
    # the root unit's trained tensors (embedding, final norm, head, a method's root modules), whole: under fsdp they
    # are gathered, and their gradients unsharded, until the root's reduce-scatter at the end of the backward
    block_ids = {id(p) for p in model.transformer.h.parameters()}
    root_grads = sum(p.numel() for p in {id(p): p for p in trainable if id(p) not in block_ids}.values()) * d
    # a trained tied embedding: the head's gradient waits in autograd's input buffer while the embedding's backward
    # writes a dense (V, C) gradient and then their sum: three (V, C) tensors at once, the last moment of a backward
    wte = model.transformer.wte.weight
    tied_sum = 2 * wte.numel() * d if config.tie_embeddings and wte.requires_grad else 0
    gathered = gather_buffer = 0
    block_grads_whole = [sum(p.numel() for p in b.parameters() if p.requires_grad) * d for b in model.transformer.h]
    if shards > 1:
        whole_weights = sum(weights.values())
        block_weights = [sum(weight_bytes(b, dtype, quantize, skip=lambda n: unquantized(spec)(f"transformer.h.0.{n}")
                                          ).values()) for b in model.transformer.h[:1]]
        in_blocks = block_weights[0] * config.n_layer
        gathered = (whole_weights - in_blocks) + 2 * block_weights[0]
        # FSDP2's all-gather writes into its own output buffer, beside the unit's unsharded parameters
        gather_buffer = block_weights[0]
        # sharded QLoRA: the packed 4-bit codes are sharded, their quantization state stays whole on every process
        kept_whole = quant_state_bytes(model, quantize, unquantized(spec))
        weights = {k: -(-(v - kept_whole.get(k, 0)) // shards) + kept_whole.get(k, 0) for k, v in weights.items()}
        grads, opt_state = -(-grads // shards), -(-opt_state // shards)
    state = sum(weights.values()) + rope + opt_state + gathered

    # what each block keeps, and what it needs while it is recomputed and differentiated
    x_rg = t.embedding or t.extra_rows() > 0
    kept, saved, layer_grads = [], [], []
    for i in range(config.n_layer):
        s, out_rg = block_saved(bdims, t, i, x_rg, spec.attention, sdpa)
        saved.append(s)
        # a checkpointed block keeps its input (the previous block's output) while any of its tensors needs a grad
        ckpt_input = bN * C * d if (x_rg or out_rg) else 0
        kept.append(ckpt_input if activation_checkpointing else s.total)
        x_rg = out_rg
        block = model.transformer.h[i]
        layer_grads.append(-(-sum(p.numel() for p in block.parameters() if p.requires_grad) * d // shards))
    embedding_kept = N * 8 if t.embedding else 0
    # under chunked_head the head's own saves are recomputed chunk by chunk; the hidden states stay
    head = head_saved_chunked(dims, t, x_rg) if loss == "chunked_head" else head_saved(dims, t, x_rg)[0]
    logits = N * dims.V * d if loss != "chunked_head" else min(N, DEFAULT_CHUNK) * dims.V * d
    loss_peak = _loss_chain(dims, t.head_epilogue(), loss, weight_trains=head_weight_trains(dims, t))
    head_grads = grads - sum(layer_grads)  # embedding, ln_f and lm_head (tied ones once)

    # short-lived memory: RoPE's float32 temporaries (forward); a block's gradients of x, of the MLP product and
    # of its two factors (backward); a dequantized weight while a quantized linear runs
    dequant = max(I * C, C * C) * d if quantize else 0
    forward_tmp = 3 * bN * C * 4 + bN * C * d + dequant + gather_buffer
    backward_tmp = 3 * bN * I * d + dequant
    if sdpa == "math":  # the (B, nh, T, S) scores and softmax in the forward; their gradients in the backward
        scores = dims.B * dims.nh * bdims.T * (bdims.T + t.extra_keys()) * 4
        forward_tmp += 2 * scores
        backward_tmp = max(backward_tmp, 2 * scores)
    backward_tmp += t.backward_working_bytes(dims)  # e.g. the gradient of an output the method adds

    def reducing(i: int) -> int:
        """Under fsdp, block ``i``'s reduce-scatter: its whole gradients (the input) and their shard (the output),
        alive until the next unit's reduce-scatter waits for it."""
        if shards == 1 or i >= config.n_layer:
            return 0
        return block_grads_whole[i] + -(-block_grads_whole[i] // shards)

    phases: Dict[str, int] = {}
    phases["forward"] = state + embedding_kept + sum(kept) + forward_tmp  # the last block's forward
    phases["loss"] = state + embedding_kept + sum(kept) + head.total + loss_peak
    backward_peak = 0
    for i in reversed(range(config.n_layer)):
        below = embedding_kept + sum(kept[:i])
        if shards > 1:  # the root's gradients whole, the blocks' done sharded, this block's whole until reduced
            grads_so_far = root_grads + sum(layer_grads[i + 1:]) + block_grads_whole[i]
        else:
            grads_so_far = head_grads + sum(layer_grads[i:]) if t.base_linears else grads
        if activation_checkpointing:
            # in float32 RMSNorm's "copy" of the block input is the kept input itself
            recomputed = saved[i].total - (saved[i].tensors.get("x", 0) if d == 4 else 0)
            layer = kept[i] + recomputed + max(forward_tmp, backward_tmp)
        else:
            layer = saved[i].total + backward_tmp
        # N * C * d: the gradient flowing down the residual stream
        backward_peak = max(backward_peak, state + bN * C * d + below + layer + grads_so_far + reducing(i + 1))
    phases["backward"] = backward_peak
    # the embedding's backward, the last of the step: every block's gradients done (sharded under fsdp), the root's
    # whole, the tied sum, and under fsdp the first block's reduce-scatter still in flight
    phases["embedding_backward"] = (state + embedding_kept + N * C * d + sum(layer_grads) + root_grads + tied_sum
                                    + reducing(0))
    largest = max((p.numel() for p in trainable), default=0)
    # per-tensor (CPU: two of the largest shard) vs foreach (CUDA: all of them) temporaries
    adam_tmp = (2 * -(-largest // shards) * d) if device_type == "cpu" else grads
    if optimizer == "adamw8bit":
        adam_tmp = 0
    phases["optimizer"] = state - gathered + grads + adam_tmp  # every unit is resharded after the backward
    phase = max(phases, key=phases.get)
    peak = phases[phase]

    per_layer = [s.total for s in saved]
    estimate = {
        "peak_bytes": peak,
        "peak_gb": peak / GB,
        "peak_phase": phase,
        "phases_bytes": phases,
        "weights_bytes": sum(weights.values()),
        "gathered_weights_bytes": gathered,
        "shards": shards,
        "weights_by_kind_bytes": weights,
        "rope_cache_bytes": rope,
        "total_params": n_total,
        "trainable_params": n_trainable,
        "grads_bytes": grads,
        "optimizer_bytes": opt_state,
        "activations_bytes": embedding_kept + sum(kept),
        "activations_per_layer_bytes": max(per_layer) if per_layer else 0,
        "activations_per_layer_checkpointed_bytes": bN * C * d,
        "head_saved_bytes": head.total,
        "logits_bytes": logits,
        "loss_peak_bytes": loss_peak,
        "framework_overhead_bytes": framework_overhead_bytes,
        "process_peak_bytes": peak + framework_overhead_bytes,
        "settings": {
            "model": config.name or "custom", "method": spec.describe(), "micro_batch_size": micro_batch_size,
            "seq_len": seq_len, "micro_batch_tokens": micro_batch_tokens, "window": config.describe_window(),
            "dtype": str(dtype).replace("torch.", ""), "quantize": quantize,
            "activation_checkpointing": activation_checkpointing, "optimizer": optimizer,
            "device_type": device_type, "sdpa": sdpa, "loss": loss,
        },
    }
    return estimate


def format_estimate(est: Dict[str, Any]) -> str:
    """A short, aligned breakdown of :func:`estimate_memory`'s result."""
    gb = lambda n: f"{n / GB:9.3f} GB"  # noqa: E731
    s = est["settings"]
    lines = [
        f"estimate for {s['model']} {s['method']}: "
        + (f"packed micro-batches of {s['micro_batch_tokens']} tokens (as {s['micro_batch_size']} x {s['seq_len']}) "
           if s.get("micro_batch_tokens") else f"micro batch {s['micro_batch_size']} x {s['seq_len']} tokens ")
        + f"(window {s['window']}), "
        f"{s['dtype']}, quantize={s['quantize']}, checkpointing={s['activation_checkpointing']}, "
        f"{s['optimizer']}, sdpa={s['sdpa']}, loss={s['loss']}",
        f"  weights            {gb(est['weights_bytes'])}  "
        + ", ".join(f"{k}: {v / GB:.3f}" for k, v in est["weights_by_kind_bytes"].items()),
        f"  trainable params   {est['trainable_params']:,} of {est['total_params']:,}",
        f"  gradients          {gb(est['grads_bytes'])}",
        f"  optimizer state    {gb(est['optimizer_bytes'])}",
        f"  activations kept   {gb(est['activations_bytes'])}  (largest block without checkpointing "
        f"{est['activations_per_layer_bytes'] / GB:.3f} GB; with it "
        f"{est['activations_per_layer_checkpointed_bytes'] / GB:.3f} GB)",
        f"  ln_f + head kept   {gb(est['head_saved_bytes'])}",
        f"  logits             {gb(est['logits_bytes'])}  (loss chain peak {est['loss_peak_bytes'] / GB:.3f} GB)",
        "  phases             " + ", ".join(f"{k} {v / GB:.3f}" for k, v in est["phases_bytes"].items()),
        f"  PEAK               {gb(est['peak_bytes'])}  (in the {est['peak_phase']} phase)",
    ]
    if est["shards"] > 1:
        lines.insert(2, f"  + gathered weights {gb(est['gathered_weights_bytes'])}  (fsdp over {est['shards']} "
                        "processes: weights, gradients and optimizer state above are this process's shard; the "
                        "root unit and two blocks are gathered whole; activations and the all-gather and "
                        "reduce-scatter buffers are per process)")
    if est["framework_overhead_bytes"]:
        lines.append(f"  + process overhead {gb(est['framework_overhead_bytes'])}  (CPU: resident size after imports)")
    return "\n".join(lines)


def print_memory_estimate(spec, config, seq_len: int, train, accelerator: str,
                          precision: str, micro_batch_tokens: Optional[int] = None, shards: int = 1) -> None:
    """The analytic peak-memory estimate of one training step of this run (``lit_adapter.memory``), as an estimate.

    Mixed precisions are estimated as their ``-true`` counterpart (the weights' dtype), which under-counts the
    float32 master weights of ``*-mixed`` runs; that is said in the output.
    """
    if config.norm_class != "RMSNorm" or config.mlp_class != "LLaMAMLP":
        print(f"peak memory estimate: not available for {config.name or 'this model'} (the estimator models LLaMA's "
              f"blocks, RMSNorm and SwiGLU, not {config.norm_class} and {config.mlp_class}; "
              "no estimate is better than a wrong one)")
        return
    if spec.attention.pattern not in ESTIMATED_PATTERNS:
        print(f"peak memory estimate: not available for {spec.attention.pattern} attention (the estimator models "
              f"{', '.join(ESTIMATED_PATTERNS)}; scripts/memory_sweep.py measures any pattern)")
        return
    estimated_as = {"bf16-mixed": "bf16-true", "16-mixed": "16-true"}.get(precision, precision)
    on_gpu = accelerator in ("cuda", "gpu") or (accelerator == "auto" and torch.cuda.is_available())
    try:
        estimate = estimate_memory(config, spec, train.micro_batch_size, seq_len, estimated_as,
                                   train.activation_checkpointing, device_type="cuda" if on_gpu else "cpu",
                                   optimizer="adamw" if train.optimizer == "adamw" else "adamw8bit",
                                   loss=train.loss, micro_batch_tokens=micro_batch_tokens, shards=shards)
    except UserError as err:  # a combination the estimator does not model (e.g. trained rows + sparse)
        print(f"peak memory estimate: not available ({err})")
        return
    note = "" if estimated_as == precision else f" ({precision} estimated as {estimated_as}: no float32 master copy)"
    print(f"peak memory estimate per device (analytic, not measured){note}:")
    print(format_estimate(estimate))
