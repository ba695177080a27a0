"""Memory of one fine-tuning step: an analytic estimator, the measurements that check it, and memory savers.

The estimator (:func:`estimate_memory`) predicts the peak of *live tensor bytes* during a training step of the
engine in :mod:`lit_adapter.training` (forward, next-token cross-entropy, backward, gradient clipping, AdamW step),
the quantity that ``torch.cuda.max_memory_allocated`` reports on a GPU. It adds up

* the weights, by storage type: floating-point tensors in the run's dtype, and bitsandbytes' packed integers plus
  their quantization statistics for a quantized base (LLM.int8(), Dettmers et al. 2022; NF4, Dettmers et al. 2023);
* the trainable tensors' gradients and the optimizer state (AdamW: two moments in the parameter's dtype, as
  ``torch.optim.AdamW`` allocates them; bitsandbytes' 8-bit AdamW: one byte per moment plus block statistics);
* the activations autograd saves for the backward pass. They are derived from our exact model code, operation by
  operation (:func:`saved_activations`): which op saves which tensor depends on what requires a gradient, so each
  method saves a different set (LLaMA-Adapter saves nothing below its first adapted layer, Adapter v2 saves the
  output of every wrapped linear for its scale's gradient, LoRA's CPU dropout saves a float mask, RMSNorm keeps a
  float32 copy of its input, SDPA keeps q, k, v, its output and the log-sum-exp: O(T) memory with the fused
  kernels and an O(T^2) probability matrix on the math path; the sparse patterns keep their gathered blocks).
  With activation checkpointing a block keeps only its input, and one block's set is rebuilt during its backward;
* the logits and the loss: the engine's ``loss_fn`` shifts the labels (the logits stay a view) and saves the
  float32 ``(B*T, V)`` log-probabilities (bf16 logits are first converted, a transient float32 copy); its backward
  turns that buffer into the gradient in place (``training._CrossEntropy``), where ``F.cross_entropy`` would hold
  three such matrices. For small models and for 7B at long contexts this is still most of the peak.
  :func:`chunked_loss_fn` (``--train.loss chunked``) never holds more than a chunk of float32 logits (the peak
  drops to the logits and their gradient, in their own dtype) and :func:`chunked_head_loss_fn`
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

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from lit_adapter.config import Config
from lit_adapter.errors import UserError, looks_like_out_of_memory

GB = 1e9
PRECISIONS = ("32-true", "bf16-true", "16-true")
OPTIMIZERS = ("adamw", "adamw8bit")
SDPA_BACKENDS = ("flash", "math")
LOSSES = ("cross_entropy", "chunked", "chunked_head")  # training.TrainArgs.loss
ESTIMATED_PATTERNS = ("dense", "local", "shifted")  # the attention patterns whose saved tensors are modelled
_DTYPE_OF_PRECISION = {"32-true": torch.float32, "bf16-true": torch.bfloat16, "16-true": torch.float16}


def precision_dtype(precision: Union[str, torch.dtype]) -> torch.dtype:
    if isinstance(precision, torch.dtype):
        return precision
    if precision not in _DTYPE_OF_PRECISION:
        raise UserError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return _DTYPE_OF_PRECISION[precision]


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ----------------------------------------------------------------------------------------------------------------
# Weights


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
    from lit_adapter.methods import build_model, mark_trainable

    with torch.device("meta"):
        model = build_model(spec, config)
    mark_trainable(model, spec)
    return model


def weight_bytes(model: nn.Module, dtype: torch.dtype, quantize: Optional[str]) -> Dict[str, int]:
    """Bytes of ``model``'s tensors by storage kind, as ``methods.prepare_model`` leaves them.

    Every floating-point tensor is cast to ``dtype``; with ``quantize`` the linears that
    :func:`lit_adapter.quantize.quantize_linears` replaces are counted at their quantized size instead.
    """
    from lit_adapter.quantize import _default_skip

    quantized_weights = set()
    out: Dict[str, int] = {}
    if quantize is not None:
        for name, module in model.named_modules():
            if type(module) is nn.Linear and not _default_skip(name):
                quantized_weights.add(id(module.weight))
                key = quantize.replace("bnb.", "")
                out[key] = out.get(key, 0) + quantized_linear_bytes(module.in_features, module.out_features, quantize)
    seen = set()
    dtype_name = str(dtype).replace("torch.", "")
    for p in model.parameters():
        if id(p) in seen or id(p) in quantized_weights:
            continue
        seen.add(id(p))
        out[dtype_name] = out.get(dtype_name, 0) + p.numel() * _element_size(dtype)
    return out


def optimizer_state_bytes(trainable: List[nn.Parameter], dtype: torch.dtype, optimizer: str) -> int:
    """AdamW's state for ``trainable`` (shapes only; meta tensors are fine)."""
    if optimizer == "adamw":
        # torch.optim.AdamW: exp_avg and exp_avg_sq like the parameter, plus a float32 step counter per tensor
        return sum(2 * p.numel() * _element_size(dtype) + 4 for p in trainable)
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


# ----------------------------------------------------------------------------------------------------------------
# Saved activations, op by op


@dataclass
class _Dims:
    B: int
    T: int
    C: int  # n_embd
    I: int  # intermediate_size
    V: int  # vocab_size (the logits' width)
    nh: int
    ng: int
    hs: int
    d: int  # bytes per element of weights and activations
    device_type: str
    quantize: Optional[str] = None

    @property
    def N(self) -> int:
        return self.B * self.T

    @property
    def kv(self) -> int:
        return self.ng * self.hs


@dataclass
class _Trains:
    """What trains (and so what requires a gradient), per method."""

    norms: bool = False
    base_linears: bool = False
    embedding: bool = False
    v2_linears: bool = False
    lora_targets: Tuple[str, ...] = ()
    lora_r: int = 0
    lora_dropout: float = 0.0
    prompt_from_layer: Optional[int] = None
    prompt_length: int = 0

    @classmethod
    def of(cls, spec) -> "_Trains":
        if spec.method == "full":
            return cls(norms=True, base_linears=True, embedding=True)
        if spec.method == "lora":
            s = spec.settings
            return cls(lora_targets=tuple(s.target_names()), lora_r=s.r, lora_dropout=s.dropout)
        s = spec.settings
        t = cls(prompt_from_layer=s.start_layer, prompt_length=s.prompt_length)
        if spec.method == "adapter_v2":
            t.norms, t.v2_linears = True, True
        return t


class _Saved:
    """Bytes of the tensors autograd keeps, by name: a tensor that several ops save is kept once."""

    def __init__(self) -> None:
        self.tensors: Dict[str, int] = {}

    def add(self, name: str, nbytes: int) -> None:
        self.tensors[name] = nbytes

    @property
    def total(self) -> int:
        return sum(self.tensors.values())


def _rmsnorm(saved: _Saved, name: str, x: str, x_rg: bool, weight_trains: bool, dims: _Dims) -> bool:
    # x.float() (a copy unless float32), x.pow(2) and x * rsqrt(...) keep the float32 input and the (N, 1) rsqrt;
    # weight * x.to(dtype) keeps the normalized input only for the weight's gradient.
    if x_rg:
        saved.add(f"{x}.f32" if dims.d != 4 else x, dims.N * dims.C * 4)
        saved.add(f"{name}.rsqrt", dims.N * 4)
    if weight_trains:
        saved.add(f"{name}.normed", dims.N * dims.C * dims.d)
    return x_rg or weight_trains


def _linear(saved: _Saved, name: str, x: str, x_rg: bool, fan_in: int, fan_out: int, dims: _Dims, t: _Trains,
            quantized: bool = True) -> bool:
    """A linear layer as the method wraps it; returns whether its output requires a gradient."""
    N, d = dims.N, dims.d
    if t.base_linears:  # the weight's gradient needs the input
        saved.add(x, N * fan_in * d)
    if quantized and dims.quantize == "bnb.int8" and x_rg:
        # bitsandbytes' int8 matmul keeps its input on the autograd context (ctx.A / ctx.tensors) even though the
        # frozen weight needs no gradient; its 4-bit matmul keeps only the weight
        saved.add(x, N * fan_in * d)
    lora = name.rpartition(".")[2] in t.lora_targets
    if lora:
        if t.lora_dropout > 0:
            # CPU dropout is input * (bernoulli mask / (1 - p)) and keeps the float mask; CUDA's fused kernel
            # keeps a bool mask. Either only when the input requires a gradient.
            if x_rg:
                saved.add(f"{name}.dropout_mask", N * fan_in * (d if dims.device_type == "cpu" else 1))
            saved.add(f"{name}.dropped", N * fan_in * d)
        else:
            saved.add(x, N * fan_in * d)
        saved.add(f"{name}.lora_a_out", N * t.lora_r * d)
    if t.v2_linears:  # scale * (linear(x) + bias): the scale's gradient needs linear(x) + bias
        saved.add(f"{name}.biased", N * fan_out * d)
    return x_rg or t.base_linears or lora or t.v2_linears


def _sdpa_saved(saved: _Saved, tag: str, q: Tuple[str, int], k: Tuple[str, int], v: Tuple[str, int], S: int,
                dims: _Dims, sdpa: str, q_rg: bool = True, k_rg: bool = True) -> None:
    """What ``F.scaled_dot_product_attention`` keeps for queries (B, nh, T, hs) over S keys.

    The fused kernels keep q, k, v, their output and the (B, nh, T) log-sum-exp: O(T) memory. The math path keeps
    float32 copies of the scaled q (for k's gradient) and k (for q's), v in float32 and the (B, nh, T, S) float32
    probabilities (as measured on CPU, where it also upcasts half precision): O(T * S).
    """
    B, nh, T, hs = dims.B, dims.nh, dims.T, dims.hs
    if sdpa == "flash":
        for name, nbytes in (q, k, v):
            saved.add(name, nbytes)
        saved.add(f"{tag}.out", B * nh * T * hs * dims.d)
        saved.add(f"{tag}.lse", B * nh * T * 4)
        return
    if q_rg:
        saved.add(f"{tag}.k_scaled", B * nh * S * hs * 4)
    if k_rg:
        saved.add(f"{tag}.q_scaled", B * nh * T * hs * 4)
    if q_rg or k_rg:
        saved.add(*(v if dims.d == 4 and S == T else (f"{tag}.v_f32", B * nh * S * hs * 4)))
    saved.add(f"{tag}.probs", B * nh * T * S * 4)


def _local_attention(saved: _Saved, window: int, dims: _Dims, k_name: str, v_name: str, kv_bytes: int) -> str:
    """``attention.LocalAttention`` (``band_part``): query tiles and the gathered key/value span of each tile.

    RoPE's output keeps the projection's (B, T, nh, hs) memory order, so regrouping heads and tiles is a view only
    for one sequence (B == 1) without padding; otherwise the tiles and spans are copies. Returns the name of the
    tensor ``o_proj`` receives.
    """
    B, nh, T, hs, d = dims.B, dims.nh, dims.T, dims.hs, dims.d
    from lit_adapter.attention import _query_tile

    band = min(window, T)
    tile = min(_query_tile(band), T)
    nb = -(-T // tile)
    before = band - 1 if nb > 1 else 0
    span = tile + before
    if B == 1 and nb * tile == T:
        saved.add("q_rope", B * nh * T * hs * d)
    else:
        saved.add("attn.q_tiles", B * nh * nb * tile * hs * d)
    if nb > 1:  # the spans are overlapping windows (unfold) of one zero-padded copy of k and of v
        saved.add("attn.k_padded", B * nh * (before + nb * tile) * hs * d)
        saved.add("attn.v_padded", B * nh * (before + nb * tile) * hs * d)
    elif B == 1:
        saved.add(k_name, kv_bytes)
        saved.add(v_name, kv_bytes)
    else:
        saved.add("attn.k_spans", B * nh * T * hs * d)
        saved.add("attn.v_spans", B * nh * T * hs * d)
    saved.add("attn.mask", nb * tile * span * d)  # SDPA keeps the boolean mask converted to an additive one
    saved.add("attn.out", B * nh * nb * tile * hs * d)
    saved.add("attn.lse", B * nh * nb * tile * 4)
    # the output follows the query's memory order: when the tiles are a view of q, transpose + reshape is one too
    return "attn.out" if B == 1 and nb * tile == T else "attn.y"


def _shifted_attention(saved: _Saved, group: int, dims: _Dims, k_name: str, v_name: str, kv_bytes: int) -> None:
    """``attention.ShiftedSparseAttention``: causal SDPA in groups, per half of the heads.

    A head range regrouped into (B * heads, groups, G, hs) is a view of RoPE's (B, T, nh, hs)-ordered output only
    for B == 1 without padding; otherwise SDPA gets (and keeps) copies. The shifted half's first group is a slice,
    which keeps the whole tensors it views.
    """
    B, nh, T, hs, d = dims.B, dims.nh, dims.T, dims.hs, dims.d
    half = nh // 2
    first = group // 2  # the shifted heads' groups start at G // 2 + m * G
    full = (("q_rope", B * nh * T * hs * d), (k_name, kv_bytes), (v_name, kv_bytes))

    def groups(tag: str, heads: int, length: int) -> None:
        rows = length if length <= group else -(-length // group) * group
        if length <= group or (B == 1 and rows == length):
            for name, nbytes in full:
                saved.add(name, nbytes)
        else:
            for part in ("q", "k", "v"):
                saved.add(f"{tag}.{part}", B * heads * rows * hs * d)
        saved.add(f"{tag}.out", B * heads * rows * hs * d)
        saved.add(f"{tag}.lse", B * heads * rows * 4)

    if half:
        groups("attn.plain", half, T)
    if first:
        groups("attn.shift0", nh - half, min(first, T))
    if T > first:
        groups("attn.shift1", nh - half, T - first)


def _block_saved(dims: _Dims, t: _Trains, layer: int, x_rg: bool, attention, sdpa: str) -> Tuple[_Saved, bool]:
    """What one ``Block`` keeps for backward (mirrors model.Block / CausalSelfAttention / LLaMAMLP)."""
    N, C, I, d = dims.N, dims.C, dims.I, dims.d
    s = _Saved()
    h1 = _rmsnorm(s, "norm_1", "x", x_rg, t.norms, dims)
    q_rg = _linear(s, "attn.q_proj", "h1", h1, C, C, dims, t)
    k_rg = _linear(s, "attn.k_proj", "h1", h1, C, dims.kv, dims, t)
    v_rg = _linear(s, "attn.v_proj", "h1", h1, C, dims.kv, dims, t)
    # RoPE's products with the (constant) cos/sin tables keep nothing; q and k become new tensors.
    expanded = dims.ng != dims.nh  # repeat_interleave copies k and v for every query head
    k_name, v_name = ("k_expanded", "v_expanded") if expanded else ("k_rope", "v_out")
    kv_bytes = N * (C if expanded else dims.kv) * d
    base_rg = q_rg or k_rg or v_rg
    # The fused kernels return (B, T, nh, hs) memory, so transpose + reshape is a view of their output.
    y = "attn.out" if sdpa == "flash" else "attn.y"
    if attention.pattern == "dense":
        if base_rg:
            q = ("q_rope", N * C * d)
            _sdpa_saved(s, "attn", q, (k_name, kv_bytes), (v_name, kv_bytes), dims.T, dims, sdpa, q_rg, k_rg)
    elif attention.pattern == "local":
        y = _local_attention(s, attention.window, dims, k_name, v_name, kv_bytes) if base_rg else "attn.y"
    elif attention.pattern == "shifted":
        y = "attn.y"
        if base_rg:
            _shifted_attention(s, attention.resolve(dims.T).group_size, dims, k_name, v_name, kv_bytes)
    else:
        raise UserError(f"the memory estimator models {', '.join(ESTIMATED_PATTERNS)} attention, "
                        f"not {attention.pattern!r}")
    y_rg = base_rg
    has_prompt = t.prompt_from_layer is not None and layer >= t.prompt_from_layer
    if has_prompt:  # a second, non-causal SDPA over the (1, nh, aT, hs) prompt keys and values
        aT = t.prompt_length
        if t.v2_linears:
            s.add("prompt.k.biased", aT * dims.kv * d)
            s.add("prompt.v.biased", aT * dims.kv * d)
        prompt_kv = aT * (C if expanded else dims.kv) * d
        _sdpa_saved(s, "prompt", ("q_rope", N * C * d), ("prompt.k", prompt_kv), ("prompt.v", prompt_kv), aT,
                    dims, sdpa, q_rg, True)
        s.add("prompt.out", N * C * d)  # the gate's product keeps the prompt attention's output
        y_rg = True
        y = "attn.y"  # y + gate * prompt output is a new tensor
    o_rg = _linear(s, "attn.o_proj", y, y_rg, C, C, dims, t)
    x2_rg = x_rg or o_rg
    h2 = _rmsnorm(s, "norm_2", "x2", x2_rg, t.norms, dims)
    g_rg = _linear(s, "mlp.gate_proj", "h2", h2, C, I, dims, t)
    u_rg = _linear(s, "mlp.up_proj", "h2", h2, C, I, dims, t)
    if g_rg:  # silu keeps its input, and silu(gate) * up keeps up for the gradient of silu(gate)
        s.add("mlp.gate", N * I * d)
        s.add("mlp.up", N * I * d)
    if u_rg:  # ... and silu(gate) for the gradient of up
        s.add("mlp.silu", N * I * d)
    m_rg = g_rg or u_rg
    out_rg = _linear(s, "mlp.down_proj", "mlp.prod", m_rg, I, C, dims, t)
    return s, x2_rg or out_rg


def _head_saved(dims: _Dims, t: _Trains, x_rg: bool) -> Tuple[_Saved, bool]:
    s = _Saved()
    h = _rmsnorm(s, "ln_f", "x", x_rg, t.norms, dims)
    out_rg = _linear(s, "lm_head", "hf", h, dims.C, dims.V, dims, t, quantized=False)  # the head stays unquantized
    return s, out_rg


def _head_saved_chunked(dims: _Dims, t: _Trains, x_rg: bool) -> _Saved:
    """What ``ln_f`` and the head keep under the head-chunked loss: ln_f's set and its output (the chunks' input)."""
    s = _Saved()
    h = _rmsnorm(s, "ln_f", "x", x_rg, t.norms, dims)
    if h:
        s.add("hidden", dims.N * dims.C * dims.d)
    return s


def saved_activations(
    config: Config, spec, micro_batch_size: int, seq_len: int, dtype: Union[str, torch.dtype] = torch.float32,
    device_type: str = "cpu", sdpa: str = "flash",
) -> Dict[str, Any]:
    """Bytes autograd keeps for backward without checkpointing: per block, for ``ln_f`` + ``lm_head`` and the loss.

    The loss part is the float32 log-probabilities, the int64 targets and their bool mask (``training.loss_fn``).
    """
    dims = _dims(config, micro_batch_size, seq_len, precision_dtype(dtype), device_type, spec.quantize)
    t = _Trains.of(spec)
    x_rg = t.embedding
    layers = []
    embedding = dims.N * 8 if t.embedding else 0  # the embedding's backward keeps the token ids
    for i in range(config.n_layer):
        s, x_rg = _block_saved(dims, t, i, x_rg, spec.attention, sdpa)
        layers.append(s.total)
    head, _ = _head_saved(dims, t, x_rg)
    rows = dims.N  # the labels are shifted, so every position is a row of the loss (the last one is ignored)
    return {"layers": layers, "embedding": embedding, "head": head.total, "loss": rows * dims.V * 4 + rows * 9}


def _dims(config: Config, B: int, T: int, dtype: torch.dtype, device_type: str,
          quantize: Optional[str] = None) -> _Dims:
    return _Dims(B=B, T=T, C=config.n_embd, I=config.intermediate_size, V=config.vocab_size, nh=config.n_head,
                 ng=config.n_query_groups, hs=config.head_size, d=_element_size(dtype), device_type=device_type,
                 quantize=quantize)


# ----------------------------------------------------------------------------------------------------------------
# The loss


def _loss_chain(dims: _Dims, head_keeps_output: bool, loss: str, head_weight_trains: bool = False) -> int:
    """Peak bytes of logits + loss from the head's forward to the gradient at the head's input.

    Walks ``training.forward_loss`` allocation by allocation. Nothing of it outlives the step's backward: the
    training loop keeps only the loss, so the logits go as soon as nothing saved for the backward needs them.
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
        # recomputation in the backward) holds the chunk's logits (v2: its pre-scale output too), their float32
        # copy (bf16) and the float32 log-probabilities; the backward turns those into the gradient in place
        # (``training._CrossEntropy``), converts it to the logits' dtype, and v2's head then forms its scale's two
        # products. The chunks' (c, C) input gradients pile up to (N, C) and are concatenated once at the end.
        c = min(N, _DEFAULT_CHUNK) * V
        v2 = c * d if head_keeps_output else 0
        forward = c * d + (c * 4 if d != 4 else 0) + c * 4 + v2
        backward = max(forward, c * 4 + (c * d if d != 4 else 0) + v2, 4 * c * d if head_keeps_output else 0)
        hidden_grads = N * dims.C * d
        peak = max(forward, backward + hidden_grads, 2 * hidden_grads)
        if head_weight_trains:  # full fine-tuning: the head's .grad (from the first chunk on), and each later
            W = V * dims.C * d  # chunk's own weight gradient beside it while the chunk's logit gradient is alive
            peak = max(peak, backward + hidden_grads + W, 2 * W + c * d + hidden_grads, 2 * hidden_grads + W)
        return peak
    alloc(logits)
    if loss == "chunked":
        # forward: a (chunk, V) float32 copy (unless float32) and logsumexp's buffer per chunk, keeping only the
        # (B, T) log-sum-exp and the logits themselves (saved); backward: the (B, T, V) gradient written from one
        # float32 (chunk, V) buffer, then the saved logits go
        chunk = min(T, _DEFAULT_CHUNK) * V * 4
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
    if head_keeps_output:  # Adapter v2's head: grad * scale and grad * (linear + bias) (summed for the scale's
        alloc(2 * logits)  # gradient) exist together with the logits' gradient
    return peak


_DEFAULT_CHUNK = 256


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
    chunk_size: int = _DEFAULT_CHUNK,
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

    from lit_adapter.training import _CrossEntropy

    def chunk_loss(hidden: torch.Tensor, chunk_targets: torch.Tensor) -> torch.Tensor:
        return _CrossEntropy.apply(head(hidden), chunk_targets, ignore_index, False)  # summed over the chunk

    rows = logits_or_hidden.reshape(-1, logits_or_hidden.size(-1))  # (B*T, C)
    flat_targets = targets.reshape(-1)
    total = rows.new_zeros((), dtype=torch.promote_types(rows.dtype, torch.float32))
    # split (not slicing in a loop): its backward concatenates the chunks' gradients once, where each slice's
    # backward would zero-fill a whole (B*T, C) gradient
    for hidden, chunk_targets in zip(rows.split(chunk_size), flat_targets.split(chunk_size)):
        total = total + checkpoint(chunk_loss, hidden, chunk_targets, use_reentrant=False)
    return total / (targets != ignore_index).sum().clamp(min=1)


def chunked_loss_fn(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, chunk_size: int = _DEFAULT_CHUNK
) -> Tuple[torch.Tensor, int]:
    """Drop-in for ``training.loss_fn`` (same value and gradient) that neither copies nor upcasts all logits.

    The targets are shifted instead of the logits (``training.next_token_targets``), so the gradient is one
    ``(B, T, V)`` tensor in the logits' dtype.
    """
    from lit_adapter.training import next_token_targets

    targets, count = next_token_targets(labels, ignore_index)
    if count == 0:
        return logits.sum() * 0.0, 0
    return chunked_cross_entropy(logits, targets, chunk_size=chunk_size, ignore_index=ignore_index), count


def chunked_head_loss_fn(
    hidden: torch.Tensor, labels: torch.Tensor, head, ignore_index: int = -100, chunk_size: int = _DEFAULT_CHUNK
) -> Tuple[torch.Tensor, int]:
    """The same loss from the final hidden states ``(B, T, C)`` and the model's head (``GPT.output_logits``).

    The logits exist ``chunk_size`` rows at a time, in the forward and again (recomputed) in the backward: no
    ``(B, T, V)`` tensor at all, for one extra head matmul per step.
    """
    from lit_adapter.training import next_token_targets

    targets, count = next_token_targets(labels, ignore_index)
    if count == 0:
        return hidden.sum() * 0.0, 0
    return chunked_cross_entropy(hidden, targets, chunk_size=chunk_size, head=head, ignore_index=ignore_index), count


# ----------------------------------------------------------------------------------------------------------------
# The estimate


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
) -> Dict[str, Any]:
    """Predicted peak live tensor bytes of one training step of ``spec`` on ``config``, with its breakdown.

    ``dtype`` is a precision (``32-true``, ``bf16-true``, ``16-true``) or a torch dtype: the weights', activations'
    and (as in the engine) the trainable tensors' dtype. ``quantize`` defaults to ``spec.quantize``. ``sdpa`` is the
    attention backend: ``flash`` for the fused kernels (CPU flash, CUDA flash or memory-efficient; O(T) memory) or
    ``math`` (O(T^2)). ``loss="chunked"`` estimates :func:`chunked_loss_fn` in place of ``training.loss_fn``.
    ``framework_overhead_bytes`` (the process's resident size after imports, CPU) is reported beside the peak,
    not in it. Bytes are exact counts; ``*_gb`` values are in units of 1e9 bytes.
    """
    if quantize == "spec":
        quantize = spec.quantize
    for value, allowed, what in ((optimizer, OPTIMIZERS, "optimizer"), (sdpa, SDPA_BACKENDS, "sdpa"),
                                 (loss, LOSSES, "loss"), (device_type, ("cpu", "cuda"), "device_type")):
        if value not in allowed:
            raise UserError(f"unknown {what} {value!r}; choose one of {', '.join(allowed)}")
    if micro_batch_size < 1 or seq_len < 2:
        raise UserError("micro_batch_size must be >= 1 and seq_len >= 2")
    dtype = precision_dtype(dtype)
    dims = _dims(config, micro_batch_size, seq_len, dtype, device_type, quantize)
    N, C, I, d = dims.N, dims.C, dims.I, dims.d
    t = _Trains.of(spec)

    model = _meta_model(config, spec)
    weights = weight_bytes(model, dtype, quantize)
    rope = 2 * config.block_size * config.head_size * 4
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in {id(p): p for p in trainable}.values())
    n_total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    grads = n_trainable * d
    opt_state = optimizer_state_bytes(trainable, dtype, optimizer)
    state = sum(weights.values()) + rope + opt_state

    # what each block keeps, and what it needs while it is recomputed and differentiated
    x_rg = t.embedding
    kept, saved, layer_grads = [], [], []
    for i in range(config.n_layer):
        s, out_rg = _block_saved(dims, t, i, x_rg, spec.attention, sdpa)
        saved.append(s)
        # a checkpointed block keeps its input (the previous block's output) while any of its tensors needs a grad
        ckpt_input = N * C * d if (x_rg or out_rg) else 0
        kept.append(ckpt_input if activation_checkpointing else s.total)
        x_rg = out_rg
        block = model.transformer.h[i]
        layer_grads.append(sum(p.numel() for p in block.parameters() if p.requires_grad) * d)
    embedding_kept = N * 8 if t.embedding else 0
    # under chunked_head the head's own saves are recomputed chunk by chunk; the hidden states stay
    head = _head_saved_chunked(dims, t, x_rg) if loss == "chunked_head" else _head_saved(dims, t, x_rg)[0]
    logits = N * dims.V * d if loss != "chunked_head" else min(N, _DEFAULT_CHUNK) * dims.V * d
    loss_peak = _loss_chain(dims, t.v2_linears, loss, head_weight_trains=t.base_linears)
    head_grads = grads - sum(layer_grads)  # embedding, ln_f and lm_head (tied ones once)

    # short-lived memory: RoPE's float32 temporaries (forward); a block's gradients of x, of the MLP product and
    # of its two factors (backward); a dequantized weight while a quantized linear runs
    dequant = max(I * C, C * C) * d if quantize else 0
    forward_tmp = 3 * N * C * 4 + N * C * d + dequant
    backward_tmp = 3 * N * I * d + dequant
    if sdpa == "math":  # the (B, nh, T, T) scores and softmax in the forward; their gradients in the backward
        forward_tmp += 2 * dims.B * dims.nh * dims.T * dims.T * 4
        backward_tmp = max(backward_tmp, 2 * dims.B * dims.nh * dims.T * dims.T * 4)
    if t.prompt_from_layer is not None:
        backward_tmp += N * C * d  # the gated prompt output's gradient

    phases: Dict[str, int] = {}
    phases["forward"] = state + embedding_kept + sum(kept) + forward_tmp  # the last block's forward
    phases["loss"] = state + embedding_kept + sum(kept) + head.total + loss_peak
    backward_peak = 0
    for i in reversed(range(config.n_layer)):
        below = embedding_kept + sum(kept[:i])
        grads_so_far = head_grads + sum(layer_grads[i:]) if t.base_linears else grads
        if activation_checkpointing:
            # in float32 RMSNorm's "copy" of the block input is the kept input itself
            recomputed = saved[i].total - (saved[i].tensors.get("x", 0) if d == 4 else 0)
            layer = kept[i] + recomputed + max(forward_tmp, backward_tmp)
        else:
            layer = saved[i].total + backward_tmp
        # N * C * d: the gradient flowing down the residual stream
        backward_peak = max(backward_peak, state + N * C * d + below + layer + grads_so_far)
    phases["backward"] = backward_peak
    largest = max((p.numel() for p in trainable), default=0)
    adam_tmp = (2 * largest * d) if device_type == "cpu" else grads  # per-tensor (CPU) vs foreach (CUDA) temporaries
    if optimizer == "adamw8bit":
        adam_tmp = 0
    phases["optimizer"] = state + grads + adam_tmp
    phase = max(phases, key=phases.get)
    peak = phases[phase]

    per_layer = [s.total for s in saved]
    estimate = {
        "peak_bytes": peak,
        "peak_gb": peak / GB,
        "peak_phase": phase,
        "phases_bytes": phases,
        "weights_bytes": sum(weights.values()),
        "weights_by_kind_bytes": weights,
        "rope_cache_bytes": rope,
        "total_params": n_total,
        "trainable_params": n_trainable,
        "grads_bytes": grads,
        "optimizer_bytes": opt_state,
        "activations_bytes": embedding_kept + sum(kept),
        "activations_per_layer_bytes": max(per_layer) if per_layer else 0,
        "activations_per_layer_checkpointed_bytes": N * C * d,
        "head_saved_bytes": head.total,
        "logits_bytes": logits,
        "loss_peak_bytes": loss_peak,
        "framework_overhead_bytes": framework_overhead_bytes,
        "process_peak_bytes": peak + framework_overhead_bytes,
        "settings": {
            "model": config.name or "custom", "method": spec.describe(), "micro_batch_size": micro_batch_size,
            "seq_len": seq_len, "dtype": str(dtype).replace("torch.", ""), "quantize": quantize,
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
        f"estimate for {s['model']} {s['method']}: micro batch {s['micro_batch_size']} x {s['seq_len']} tokens, "
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
    if est["framework_overhead_bytes"]:
        lines.append(f"  + process overhead {gb(est['framework_overhead_bytes'])}  (CPU: resident size after imports)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Measurement


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """High-water mark of this process's resident set (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


_MARKER_BYTES = 7_777_777


class AllocatorPeak:
    """Peak live bytes of the c10 CPU allocator while profiling, the CPU analogue of ``max_memory_allocated``.

    With ``profile_memory=True`` the profiler receives every allocation and free of the CPU allocator with its
    address and size. Replaying them in order gives the bytes allocated during profiling that are still alive at
    each moment (frees of blocks from before profiling are ignored, so start it before the tensors of interest
    exist). :meth:`mark` starts the window over which :attr:`peak_bytes` is taken; :attr:`at_mark_bytes` is the
    live total at its start. Allocations outside c10 (oneDNN scratch space, Python objects) are not seen.
    """

    def __init__(self) -> None:
        self.peak_bytes = 0
        self.at_mark_bytes = 0
        self._prof = None

    def __enter__(self) -> "AllocatorPeak":
        from torch.profiler import ProfilerActivity, profile

        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._prof.__enter__()
        return self

    @staticmethod
    def mark() -> None:
        torch.empty(_MARKER_BYTES, dtype=torch.uint8)  # a recognisable allocation in the event stream

    def __exit__(self, *exc) -> None:
        from torch._C._profiler import _EventType

        self._prof.__exit__(*exc)
        if exc[0] is not None:
            return
        stack = list(self._prof.profiler.kineto_results.experimental_event_tree())
        events = []
        while stack:
            event = stack.pop()
            stack.extend(event.children)
            if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
                events.append((event.start_time_ns, event.extra_fields.ptr, event.extra_fields.alloc_size))
        events.sort(key=lambda e: e[0])
        # The allocator's own running total is not reset between profiling sessions, so replay the events.
        live, sizes, marked = 0, {}, False
        for _, ptr, size in events:
            if size > 0:
                sizes[ptr] = size
                live += size
            elif ptr in sizes:
                live -= sizes.pop(ptr)
            if abs(size) == _MARKER_BYTES and size < 0 and not marked:
                marked = True
                self.at_mark_bytes = self.peak_bytes = live
            elif marked:
                self.peak_bytes = max(self.peak_bytes, live)
        if not marked:
            raise RuntimeError("AllocatorPeak.mark() was not called inside the profiled region")


def _persistent_storages(model: nn.Module) -> set:
    """Storages of parameters, buffers, quantization state and the RoPE cache: not activations."""
    tensors = list(model.parameters()) + list(model.buffers()) + list(model._rope_cache or ())
    for module in model.modules():
        weight = getattr(module, "weight", None)
        for name in ("CB", "SCB"):
            if isinstance(getattr(weight, name, None), torch.Tensor):
                tensors.append(getattr(weight, name))
        state = getattr(weight, "quant_state", None)
        while state is not None:
            tensors += [t for t in (state.absmax, state.code, getattr(state, "offset", None)) if torch.is_tensor(t)]
            state = getattr(state, "state2", None)
    return {t.untyped_storage().data_ptr() for t in tensors}


def _graph_nodes(root):
    seen, stack = set(), [root]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        yield node
        stack.extend(fn for fn, _ in node.next_functions)


def measure_saved_activations(model: nn.Module, batch: torch.Tensor) -> Dict[str, Any]:
    """Bytes autograd saves in one forward + loss, by section, each storage counted once.

    The test oracle of :func:`saved_activations`: a ``saved_tensors_hooks`` pack hook sees every tensor an op
    saves; blocks, ``ln_f``/``lm_head`` and the loss are told apart by forward pre-hooks.
    """
    from lit_adapter.training import loss_fn

    section = ["embedding"]
    sizes: Dict[int, Tuple[str, int]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        sizes.setdefault(storage.data_ptr(), (section[0], storage.nbytes()))
        return t

    def enter(name: str):
        def hook(module, args):
            section[0] = name
        return hook

    # Custom autograd functions may keep tensors as attributes of their context (bitsandbytes' ``ctx.A``), out of
    # the hooks' sight: remember in which section every module input was seen, and collect those from the graph.
    inputs: Dict[int, str] = {}

    def remember(module, args):
        for a in args:
            if isinstance(a, torch.Tensor):
                inputs[a.untyped_storage().data_ptr()] = section[0]  # the latest use: addresses are reused

    handles = [block.register_forward_pre_hook(enter(f"layer{i}")) for i, block in enumerate(model.transformer.h)]
    handles.append(model.transformer.ln_f.register_forward_pre_hook(enter("head")))
    handles += [m.register_forward_pre_hook(remember) for m in model.modules()]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits = model(batch)
            section[0] = "loss"
            loss = loss_fn(logits, batch)[0]
    finally:
        for handle in handles:
            handle.remove()
    for node in _graph_nodes(loss.grad_fn):
        for value in list(getattr(node, "__dict__", {}).values()):
            for t in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() in inputs:
                    ptr = t.untyped_storage().data_ptr()
                    sizes.setdefault(ptr, (inputs[ptr], t.untyped_storage().nbytes()))
    persistent = _persistent_storages(model)
    out = {"layers": [0] * len(model.transformer.h), "embedding": 0, "head": 0, "loss": 0}
    for ptr, (name, nbytes) in sizes.items():
        if ptr in persistent:
            continue
        if name.startswith("layer"):
            out["layers"][int(name[5:])] += nbytes
        else:
            out[name] += nbytes
    return out


@dataclass
class Cell:
    """One measurement: a method on a model, a batch shape, precision, quantization and memory savers."""

    method: str = "adapter_v2"
    pattern: str = "dense"
    attention_overrides: Dict[str, Any] = field(default_factory=dict)
    """Settings of the sparse pattern (window, group_size, ...); see ``AttentionConfig``."""
    quantize: Optional[str] = None
    precision: str = "32-true"
    seq_len: int = 256
    micro_batch_size: int = 1
    activation_checkpointing: bool = False
    optimizer: str = "adamw"
    model_name: Optional[str] = "stories15M"
    config_overrides: Dict[str, Any] = field(default_factory=dict)
    steps: int = 2
    """Optimizer steps under memory measurement (the first creates the optimizer state)."""
    timed_steps: int = 1
    """Further steps, timed without the profiler."""
    device: str = "cpu"
    threads: Optional[int] = None
    sdpa: str = "flash"
    loss: str = "cross_entropy"
    seed: int = 0
    memory_limit_gb: Optional[float] = None
    """CPU, in a child process only: cap the address space at its size after imports plus this, to make OOM real."""

    def config(self) -> Config:
        from dataclasses import replace

        config = Config.from_name(self.model_name) if self.model_name else Config(**self.config_overrides)
        if self.model_name and self.config_overrides:
            config = replace(config, **self.config_overrides)
        # random weights: any context length is allowed, the RoPE cache just has to cover it
        return replace(config, block_size=max(config.block_size, self.seq_len))

    def spec(self):
        from lit_adapter.attention import AttentionConfig
        from lit_adapter.methods import MethodSpec

        attention = AttentionConfig(pattern=self.pattern, **self.attention_overrides).resolve(self.seq_len)
        return MethodSpec(self.method, attention=attention, quantize=self.quantize)

    def label(self) -> str:
        return self.spec().describe()


def build_random_model(cell: Cell, device: torch.device) -> nn.Module:
    """The model ``methods.prepare_model`` would build for ``cell``, with random weights instead of a checkpoint."""
    from lit_adapter.methods import build_model, mark_trainable
    from lit_adapter.quantize import quantize_linears

    config, spec = cell.config(), cell.spec()
    spec.validate(config)
    dtype = precision_dtype(cell.precision)
    with torch.device("meta"):
        model = build_model(spec, config)
    model = model.to_empty(device=device)
    if config.tie_embeddings:  # to_empty gives every module its own storage
        head = model.lm_head
        while not isinstance(head, nn.Linear):
            head = head.linear
        head.weight = model.transformer.wte.weight
    model.init_weights()  # the adapters' init_weights also restore their own initialisation
    for module in model.modules():
        if hasattr(module, "reset_lora_parameters"):
            module.reset_lora_parameters()
    model = model.to(dtype=dtype)
    mark_trainable(model, spec)
    quantize_linears(model, spec.quantize, device=device, compute_dtype=dtype)
    mark_trainable(model, spec)
    return model


def measure_step(cell: Cell) -> Dict[str, Any]:
    """Runs ``cell.steps`` + ``cell.timed_steps`` optimizer steps of the engine's loop on random weights.

    Returns peak memory (CUDA allocator peak; on CPU the allocator peak over the training steps and the process's
    peak resident size, raw and net of the baseline after imports), step times and tokens/s.
    """
    from lit_adapter.training import forward_loss

    if cell.threads:
        torch.set_num_threads(cell.threads)
    device = torch.device(cell.device)
    rss_baseline = peak_rss_bytes()
    torch.manual_seed(cell.seed)
    use_profiler = device.type == "cpu"
    tracker = AllocatorPeak() if use_profiler else None
    if cell.loss not in LOSSES:
        raise UserError(f"unknown loss {cell.loss!r}; choose one of {', '.join(LOSSES)}")
    step_times: List[float] = []

    def step(model, optimizer, trainable, batch):
        nonlocal loss
        t0 = time.perf_counter()
        # exactly the engine's micro-step with accum = 1: only the loss outlives forward_loss
        loss = forward_loss(model, batch, batch, cell.loss)[0]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    loss = None
    if tracker is not None:
        tracker.__enter__()
    if cell.memory_limit_gb is not None:  # after the profiler's own imports, which need address space too
        limit = _address_space_bytes() + int(cell.memory_limit_gb * GB)
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    try:
        model = build_random_model(cell, device)
        model.gradient_checkpointing = cell.activation_checkpointing
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = make_optimizer(trainable, cell.optimizer)
        config = cell.config()
        generator = torch.Generator().manual_seed(cell.seed)
        batch = torch.randint(0, config.vocab_size, (cell.micro_batch_size, cell.seq_len), generator=generator)
        batch = batch.to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
        if tracker is not None:
            tracker.mark()
        with _sdpa_backend(cell.sdpa):
            for _ in range(cell.steps):
                step_times.append(step(model, optimizer, trainable, batch))
    finally:
        if tracker is not None:
            tracker.__exit__(*sys.exc_info())
    with _sdpa_backend(cell.sdpa):
        for _ in range(cell.timed_steps):
            step_times.append(step(model, optimizer, trainable, batch))
    timed = step_times[cell.steps:] or step_times[1:] or step_times
    step_time = statistics.median(timed)
    result = {
        "status": "ok",
        "step_time_s": step_time,
        "tokens_per_s": cell.micro_batch_size * cell.seq_len / step_time,
        "loss": loss.item(),
        "trainable_params": sum(p.numel() for p in trainable),
        "rss_baseline_bytes": rss_baseline,
        "rss_peak_bytes": peak_rss_bytes(),
        "threads": torch.get_num_threads(),
    }
    result["rss_net_bytes"] = result["rss_peak_bytes"] - rss_baseline
    if device.type == "cuda":
        result["peak_bytes"] = torch.cuda.max_memory_allocated(device)
        result["peak_kind"] = "cuda_max_memory_allocated"
    else:
        result["peak_bytes"] = tracker.peak_bytes
        result["peak_kind"] = "cpu_allocator_peak"
    return result


def _sdpa_backend(sdpa: str):
    """``flash``: PyTorch's own choice (the fused kernels where they apply); ``math``: force the math path."""
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH) if sdpa == "math" else contextlib.nullcontext()


def make_optimizer(trainable: List[nn.Parameter], name: str) -> torch.optim.Optimizer:
    """The engine's optimizer with the default TrainArgs settings."""
    from lit_adapter.training import TrainArgs, build_optimizer

    if name not in OPTIMIZERS:
        raise UserError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    return build_optimizer(trainable, TrainArgs(optimizer=name))


def measure_in_subprocess(cell: Cell, timeout_s: float = 600.0) -> Dict[str, Any]:
    """:func:`measure_step` in a fresh Python process, so that running out of memory is a result, not a crash.

    ``status`` is ``ok``, ``oom`` (MemoryError or CUDA out of memory inside the child), ``killed (signal 9)``
    (typically the kernel's OOM killer), ``timeout`` or ``error: ...``.
    """
    env = dict(os.environ)
    env.setdefault("PYTHONWARNINGS", "ignore")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "lit_adapter.memory", json.dumps(asdict(cell))],
            capture_output=True, text=True, timeout=timeout_s, env=env,
        )
    except subprocess.TimeoutExpired:
        return {"status": "timeout"}
    if proc.returncode < 0:
        return {"status": f"killed (signal {-proc.returncode})"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"status": f"error: exit {proc.returncode}: {tail[:300]}"}


def measure_framework_overhead() -> int:
    """Resident bytes of a fresh Python process after importing torch and lit_adapter (CPU overhead)."""
    code = ("import torch, lit_adapter.methods, lit_adapter.training, resource;"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def _address_space_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def _is_oom(err: BaseException) -> bool:
    # CPU allocation failures surface as RuntimeError ("DefaultCPUAllocator: can't allocate memory")
    return isinstance(err, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(err, RuntimeError) and looks_like_out_of_memory(str(err))
    )


def _child_main(argv: List[str]) -> None:
    cell = Cell(**json.loads(argv[0]))
    try:
        result = measure_step(cell)
    except UserError as err:
        result = {"status": f"error: {err}"}
    except Exception as err:  # noqa: BLE001 - an OOM is a result; anything else is reported with its message
        if not _is_oom(err):
            raise
        result = {"status": "oom", "error": (str(err).splitlines() or [type(err).__name__])[0][:300]}
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    _child_main(sys.argv[1:])
