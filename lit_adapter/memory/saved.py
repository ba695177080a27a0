"""What autograd keeps for the backward of one training step, op by op, mirroring the model's code.

Which op saves which tensor depends on what requires a gradient, so each method saves a different set (the
method declares what trains as a :class:`~lit_adapter.tuners.base.TrainedParts`): LLaMA-Adapter saves nothing
below its first adapted layer, Adapter v2 saves the output of every wrapped linear for its scale's gradient,
LoRA's CPU dropout saves a float mask, RMSNorm keeps a float32 copy of its input, SDPA keeps q, k, v, its output
and the log-sum-exp (O(T) with the fused kernels, an O(T^2) probability matrix on the math path), and the sparse
patterns' tiled kernel keeps the fused kernels' set. ``tests/test_memory.py`` checks every set against autograd's
saved tensors. Prompt and P-tuning run every block on ``P + T`` rows that all require a gradient; prefix tuning's
attention keeps its concatenated ``P + T`` keys and values and the mask, and requires a gradient in every layer
(both checked in ``tests/test_prompt_tuning.py`` and its siblings; virtual tokens with a sparse pattern, where the
tiled kernel also keeps the prefix's keys and values, are not modelled).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Dict, Optional, Tuple, Union

import torch

from lit_adapter.config import Config
from lit_adapter.errors import UserError
from lit_adapter.tuners.base import TrainedParts, bottleneck_width

GB = 1e9
PRECISIONS = ("32-true", "bf16-true", "16-true")
OPTIMIZERS = ("adamw", "adamw8bit")
SDPA_BACKENDS = ("flash", "math")
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
    tied: bool = False  # the head's weight is the embedding's

    def head_weight_trains(self, t: TrainedParts) -> bool:
        """The head's weight needs a gradient: full fine-tuning, or a trained embedding that the head is tied to."""
        return t.base_linears or (t.embedding and self.tied)

    @property
    def N(self) -> int:
        return self.B * self.T

    @property
    def kv(self) -> int:
        return self.ng * self.hs


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


def _linear(saved: _Saved, name: str, x: str, x_rg: bool, fan_in: int, fan_out: int, dims: _Dims, t: TrainedParts,
            quantized: bool = True) -> bool:
    """A linear layer as the method wraps it; returns whether its output requires a gradient."""
    N, d = dims.N, dims.d
    if name.rpartition(".")[2] in t.ia3_inputs:  # linear(x * l): l's gradient needs x; the layer gets x * l
        saved.add(x, N * fan_in * d)
        x, x_rg = f"{name}.ia3_scaled", True
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
    ia3_out = name.rpartition(".")[2] in t.ia3_outputs
    if ia3_out:  # linear(x) * l: l's gradient needs linear(x)
        saved.add(f"{name}.out", N * fan_out * d)
    bias = name.rpartition(".")[2] in t.bias_linears  # linear(x) + b keeps nothing, but its output needs a gradient
    return x_rg or t.base_linears or lora or t.v2_linears or ia3_out or bias


def _bottleneck(saved: _Saved, name: str, x: str, layer: int, dims: _Dims, t: TrainedParts) -> bool:
    """A bottleneck adapter ``x + scaling * up(act(down(x)))`` at site ``name`` (Houlsby, Pfeiffer), if there is one.

    Its weights' gradients need ``x`` and ``act(down(x))``; relu and tanh compute theirs from that output, the other
    activations keep their input too. Returns whether it is there (its output then requires a gradient).
    """
    if name.partition(".")[0] not in t.bottleneck_sites or layer in t.bottleneck_leave_out:
        return False
    N, d = dims.N, dims.d
    r = bottleneck_width(dims.C, t.bottleneck_reduction_factor, t.bottleneck_size)
    saved.add(x, N * dims.C * d)
    saved.add(f"{name}.act", N * r * d)
    if t.bottleneck_activation not in ("relu", "tanh"):
        saved.add(f"{name}.down", N * r * d)
    if t.bottleneck_dropout > 0:  # as LoRA's: a float mask on CPU, a bool one from CUDA's fused kernel
        saved.add(f"{name}.dropout_mask", N * dims.C * (d if dims.device_type == "cpu" else 1))
    return True


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


def _tiled_attention(saved: _Saved, dims: _Dims, k_name: str, v_name: str, kv_bytes: int) -> str:
    """``attention.SparseAttention``'s tiled kernel (every pattern): what dense flash SDPA keeps, nothing more.

    Its autograd function saves the q, k, v it was given (RoPE's outputs, or the expanded k and v under GQA), its
    output, allocated in (B, T, nh, hs) order like the fused kernels' so that ``o_proj``'s input is a view of it, and
    the float32 (B, nh, T) log-sum-exp; the backward rebuilds the tiles, masks and gathered keys. Returns the name
    of the tensor ``o_proj`` receives.
    """
    q = ("q_rope", dims.N * dims.nh * dims.hs * dims.d)
    _sdpa_saved(saved, "attn", q, (k_name, kv_bytes), (v_name, kv_bytes), dims.T, dims, "flash")
    return "attn.out"


def _local_attention(saved: _Saved, window: int, dims: _Dims, k_name: str, v_name: str, kv_bytes: int) -> str:
    """``attention.LocalAttention``: the tiled kernel's set, whatever the window (its tiles are slices of k, v)."""
    return _tiled_attention(saved, dims, k_name, v_name, kv_bytes)


def _shifted_attention(saved: _Saved, group: int, dims: _Dims, k_name: str, v_name: str, kv_bytes: int) -> str:
    """``attention.ShiftedSparseAttention``: the tiled kernel's set, whatever the group size (groups are views)."""
    return _tiled_attention(saved, dims, k_name, v_name, kv_bytes)


def _prefix_attention(saved: _Saved, prefix_length: int, dims: _Dims, sdpa: str, q_rg: bool) -> None:
    """Prefix tuning's SDPA: over the concatenated (B, nh, P + T, hs) prefix and real keys/values under a (T, P + T)
    boolean mask; the keys require a gradient in every layer (the prefix's)."""
    S = prefix_length + dims.T
    kv_bytes = dims.B * dims.nh * S * dims.hs * dims.d
    q = ("q_rope", dims.N * dims.C * dims.d)
    _sdpa_saved(saved, "attn", q, ("attn.k_prefixed", kv_bytes), ("attn.v_prefixed", kv_bytes), S, dims, sdpa,
                q_rg, True)
    if sdpa == "flash":  # the fused kernels keep the mask converted to an additive one
        saved.add("attn.mask", dims.T * S * dims.d)


def _block_saved(dims: _Dims, t: TrainedParts, layer: int, x_rg: bool, attention, sdpa: str) -> Tuple[_Saved, bool]:
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
    if attention.pattern != "dense" and (t.virtual_tokens or t.prefix_length):
        raise UserError(f"the memory estimator models virtual tokens with dense attention only, not "
                        f"{attention.pattern!r}")
    if t.prefix_length:
        _prefix_attention(s, t.prefix_length, dims, sdpa, q_rg)
    elif attention.pattern == "dense":
        if base_rg:
            q = ("q_rope", N * C * d)
            _sdpa_saved(s, "attn", q, (k_name, kv_bytes), (v_name, kv_bytes), dims.T, dims, sdpa, q_rg, k_rg)
    elif attention.pattern == "local":
        y = _local_attention(s, attention.window, dims, k_name, v_name, kv_bytes) if base_rg else "attn.y"
    elif attention.pattern == "shifted":
        group = attention.resolve(dims.T).group_size
        y = _shifted_attention(s, group, dims, k_name, v_name, kv_bytes) if base_rg else "attn.y"
    else:
        raise UserError(f"the memory estimator models {', '.join(ESTIMATED_PATTERNS)} attention, "
                        f"not {attention.pattern!r}")
    y_rg = base_rg or t.prefix_length > 0  # the trained prefix reaches every layer's attention output
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
    o_rg = _bottleneck(s, "attn.bottleneck", "attn.o_proj.out", layer, dims, t) or o_rg
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
    out_rg = _bottleneck(s, "mlp.bottleneck", "mlp.down_proj.out", layer, dims, t) or out_rg
    return s, _bottleneck(s, "block.bottleneck", "block.out", layer, dims, t) or x2_rg or out_rg


def block_dims(dims: _Dims, t: TrainedParts) -> _Dims:
    """The blocks' dimensions: prompt and P-tuning's virtual rows lengthen every block's sequence."""
    return replace(dims, T=dims.T + t.virtual_tokens)


def _virtual_rows_input(s: _Saved, dims: _Dims, t: TrainedParts, x_rg: bool) -> None:
    """ln_f's float32 input is a view of the last block's (B, P + T, C) output, whose whole storage it keeps."""
    if t.virtual_tokens and x_rg and dims.d == 4:
        s.add("x", block_dims(dims, t).N * dims.C * 4)


def _head_saved(dims: _Dims, t: TrainedParts, x_rg: bool) -> Tuple[_Saved, bool]:
    s = _Saved()
    h = _rmsnorm(s, "ln_f", "x", x_rg, t.norms, dims)
    _virtual_rows_input(s, dims, t, x_rg)
    out_rg = _linear(s, "lm_head", "hf", h, dims.C, dims.V, dims, t, quantized=False)  # the head stays unquantized
    if dims.head_weight_trains(t):  # a tied head of a trained embedding: its weight's gradient needs the input
        s.add("hf", dims.N * dims.C * dims.d)
    return s, out_rg or dims.head_weight_trains(t)


def _head_saved_chunked(dims: _Dims, t: TrainedParts, x_rg: bool) -> _Saved:
    """What ``ln_f`` and the head keep under the head-chunked loss: ln_f's set and its output (the chunks' input)."""
    s = _Saved()
    h = _rmsnorm(s, "ln_f", "x", x_rg, t.norms, dims)
    _virtual_rows_input(s, dims, t, x_rg)
    if h:
        s.add("hidden", dims.N * dims.C * dims.d)
    return s


def saved_activations(
    config: Config, spec, micro_batch_size: int, seq_len: int, dtype: Union[str, torch.dtype] = torch.float32,
    device_type: str = "cpu", sdpa: str = "flash",
) -> Dict[str, Any]:
    """Bytes autograd keeps for backward without checkpointing: per block, for ``ln_f`` + ``lm_head`` and the loss.

    The loss part is the float32 log-probabilities, the int64 targets and their bool mask (``losses.loss_fn``).
    """
    dims = _dims(config, micro_batch_size, seq_len, precision_dtype(dtype), device_type, spec.quantize)
    t = spec.definition.memory_terms(spec.settings)
    x_rg = t.embedding or t.virtual_tokens > 0
    layers = []
    embedding = dims.N * 8 if t.embedding else 0  # the embedding's backward keeps the token ids
    for i in range(config.n_layer):
        s, x_rg = _block_saved(block_dims(dims, t), t, i, x_rg, spec.attention, sdpa)
        layers.append(s.total)
    head, _ = _head_saved(dims, t, x_rg)
    rows = dims.N  # the labels are shifted, so every position is a row of the loss (the last one is ignored)
    return {"layers": layers, "embedding": embedding, "head": head.total, "loss": rows * dims.V * 4 + rows * 9}


def _dims(config: Config, B: int, T: int, dtype: torch.dtype, device_type: str,
          quantize: Optional[str] = None) -> _Dims:
    return _Dims(B=B, T=T, C=config.n_embd, I=config.intermediate_size, V=config.vocab_size, nh=config.n_head,
                 ng=config.n_query_groups, hs=config.head_size, d=_element_size(dtype), device_type=device_type,
                 quantize=quantize, tied=config.tie_embeddings)
