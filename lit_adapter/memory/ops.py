"""The memory estimator's vocabulary: what one operation of the model keeps for backward, and when.

Which op saves which tensor depends on what requires a gradient, so the estimate is a walk over the model's ops
(:mod:`lit_adapter.memory.saved`) that writes every tensor autograd keeps into a :class:`Saved` ledger. This
module holds the ops the base model is made of (RMSNorm, a plain or bitsandbytes-quantized linear, SDPA on the
fused or the math path, the sparse patterns' tiled kernel, the SwiGLU MLP, dropout) and nothing of any
fine-tuning method: a method's module states its own terms (:class:`lit_adapter.memory.terms.MemoryTerms`) by
calling these functions, so it can import them without an import cycle. ``tests/test_memory.py`` checks every
set against autograd's saved tensors, byte for byte.

A ledger entry is named after the tensor it stands for: two ops that save the same tensor (q_proj's and
k_proj's input, say) write the same name, and the tensor is counted once, as autograd keeps it once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Union

import torch

from lit_adapter.errors import UserError

GB = 1e9
PRECISIONS = ("32-true", "bf16-true", "16-true")
_DTYPE_OF_PRECISION = {"32-true": torch.float32, "bf16-true": torch.bfloat16, "16-true": torch.float16}
QUERIES = "q_rope"
"""The ledger name of the attention's queries after RoPE (B, nh, T, hs): every attention over them shares them."""


def precision_dtype(precision: Union[str, torch.dtype]) -> torch.dtype:
    if isinstance(precision, torch.dtype):
        return precision
    if precision not in _DTYPE_OF_PRECISION:
        raise UserError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return _DTYPE_OF_PRECISION[precision]


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass
class Dims:
    """The sizes every op's bytes are computed from."""

    B: int
    T: int
    """Rows per sequence: the real tokens, plus any rows a method puts in front of them inside the blocks."""
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

    @property
    def N(self) -> int:
        return self.B * self.T

    @property
    def kv(self) -> int:
        return self.ng * self.hs


class Saved:
    """Bytes of the tensors autograd keeps, by name: a tensor that several ops save is kept once."""

    def __init__(self) -> None:
        self.tensors: Dict[str, int] = {}

    def add(self, name: str, nbytes: int) -> None:
        self.tensors[name] = nbytes

    @property
    def total(self) -> int:
        return sum(self.tensors.values())


def rmsnorm(saved: Saved, name: str, x: str, x_rg: bool, weight_trains: bool, dims: Dims) -> bool:
    """``RMSNorm`` on the (N, C) tensor ``x``; returns whether its output requires a gradient."""
    # x.float() (a copy unless float32), x.pow(2) and x * rsqrt(...) keep the float32 input and the (N, 1) rsqrt;
    # weight * x.to(dtype) keeps the normalized input only for the weight's gradient.
    if x_rg:
        saved.add(f"{x}.f32" if dims.d != 4 else x, dims.N * dims.C * 4)
        saved.add(f"{name}.rsqrt", dims.N * 4)
    if weight_trains:
        saved.add(f"{name}.normed", dims.N * dims.C * dims.d)
    return x_rg or weight_trains


@dataclass(frozen=True)
class LinearSite:
    """One linear layer where the walk calls it: what a method's ``linear`` hook is told."""

    name: str
    """Its path inside the block (``attn.q_proj``, ``mlp.down_proj``), or ``lm_head``; ledger names start with it."""
    x: str
    """The ledger name of its input."""
    x_rg: bool
    """Whether its input requires a gradient."""
    fan_in: int
    fan_out: int
    layer: Optional[int]
    """The block's index; None for the head."""
    quantize: Optional[str] = None
    """The bitsandbytes mode the frozen layer runs in (``bnb.int8``, ``bnb.nf4``, ...), None for a plain one."""

    @property
    def attr(self) -> str:
        """The layer's attribute name (``q_proj``, ``lm_head``): what a method's target lists name."""
        return self.name.rpartition(".")[2]

    def input_bytes(self, dims: Dims) -> int:
        return dims.N * self.fan_in * dims.d

    def output_bytes(self, dims: Dims) -> int:
        return dims.N * self.fan_out * dims.d


def base_linear(saved: Saved, site: LinearSite, dims: Dims, weight_trains: bool) -> bool:
    """The base layer ``x @ W.T``, plain or quantized; returns whether its output requires a gradient."""
    if weight_trains:  # the weight's gradient needs the input
        saved.add(site.x, site.input_bytes(dims))
    if site.quantize == "bnb.int8" and site.x_rg:
        # bitsandbytes' int8 matmul keeps its input on the autograd context (ctx.A / ctx.tensors) even though the
        # frozen weight needs no gradient; its 4-bit matmul keeps only the weight
        saved.add(site.x, site.input_bytes(dims))
    return site.x_rg or weight_trains


def dropout(saved: Saved, name: str, x_rg: bool, numel: int, dims: Dims) -> None:
    """``nn.Dropout`` with p > 0 on ``numel`` elements: CPU computes input * (bernoulli mask / (1 - p)) and keeps
    the float mask, CUDA's fused kernel keeps a bool one; either only when the input requires a gradient."""
    if x_rg:
        saved.add(f"{name}.dropout_mask", numel * (dims.d if dims.device_type == "cpu" else 1))


def sdpa(saved: Saved, tag: str, q: Tuple[str, int], k: Tuple[str, int], v: Tuple[str, int], S: int, dims: Dims,
         backend: str, q_rg: bool = True, k_rg: bool = True) -> None:
    """What ``F.scaled_dot_product_attention`` keeps for queries (B, nh, T, hs) over S keys; ``q``, ``k``, ``v``
    are (ledger name, bytes), ``tag`` starts the names of what it allocates itself.

    The fused kernels keep q, k, v, their output and the (B, nh, T) log-sum-exp: O(T) memory. The math path keeps
    float32 copies of the scaled q (for k's gradient) and k (for q's), v in float32 and the (B, nh, T, S) float32
    probabilities (as measured on CPU, where it also upcasts half precision): O(T * S). Given grouped k and v
    (``enable_gqa``) the math path repeats them per query head itself, so its copies are nh heads wide.
    """
    B, nh, T, hs = dims.B, dims.nh, dims.T, dims.hs
    if backend == "flash":
        for name, nbytes in (q, k, v):
            saved.add(name, nbytes)
        saved.add(f"{tag}.out", B * nh * T * hs * dims.d)
        saved.add(f"{tag}.lse", B * nh * T * 4)
        return
    if q_rg:
        saved.add(f"{tag}.k_scaled", B * nh * S * hs * 4)
    if k_rg:
        saved.add(f"{tag}.q_scaled", B * nh * T * hs * 4)
    if q_rg or k_rg:  # v as given if it is already float32 and per query head; else its float32 / repeated copy
        as_given = dims.d == 4 and S == T and v[1] == B * nh * S * hs * 4
        saved.add(*(v if as_given else (f"{tag}.v_f32", B * nh * S * hs * 4)))
    saved.add(f"{tag}.probs", B * nh * T * S * 4)


def query(dims: Dims) -> Tuple[str, int]:
    """The attention's queries after RoPE, as :func:`sdpa` takes them."""
    return QUERIES, dims.N * dims.nh * dims.hs * dims.d


def tiled_attention(saved: Saved, dims: Dims, k: Tuple[str, int], v: Tuple[str, int]) -> str:
    """``attention.SparseAttention``'s tiled kernel (local and shifted patterns, whatever the window or group size:
    tiles and groups are slices and views of k, v): what dense flash SDPA keeps, nothing more.

    Its autograd function saves the q, k, v it was given (RoPE's outputs, or under GQA the copies repeated per query head), its
    output, allocated in (B, T, nh, hs) order like the fused kernels' so that ``o_proj``'s input is a view of it, and
    the float32 (B, nh, T) log-sum-exp; the backward rebuilds the tiles, masks and gathered keys. Returns the name
    of the tensor ``o_proj`` receives.
    """
    sdpa(saved, "attn", query(dims), k, v, dims.T, dims, "flash")
    return "attn.out"


def attention_over_extra_keys(saved: Saved, dims: Dims, extra: int, backend: str, q_rg: bool) -> None:
    """SDPA over ``extra`` trained keys and values concatenated in front of the real ones: grouped
    (B, ng, extra + T, hs) under a (T, extra + T) boolean mask; the keys require a gradient in every layer."""
    S = extra + dims.T
    kv_bytes = dims.B * dims.ng * S * dims.hs * dims.d
    sdpa(saved, "attn", query(dims), ("attn.k_cat", kv_bytes), ("attn.v_cat", kv_bytes), S, dims, backend, q_rg, True)
    if backend == "flash":  # the fused kernels keep the mask converted to an additive one
        saved.add("attn.mask", dims.T * S * dims.d)


def swiglu(saved: Saved, g_rg: bool, u_rg: bool, dims: Dims) -> bool:
    """``silu(gate) * up`` of ``LLaMAMLP``; returns whether the product (down_proj's input) requires a gradient."""
    N, I, d = dims.N, dims.I, dims.d
    if g_rg:  # silu keeps its input, and silu(gate) * up keeps up for the gradient of silu(gate)
        saved.add("mlp.gate", N * I * d)
        saved.add("mlp.up", N * I * d)
    if u_rg:  # ... and silu(gate) for the gradient of up
        saved.add("mlp.silu", N * I * d)
    return g_rg or u_rg


def loss_saved(dims: Dims) -> int:
    """``losses.loss_fn``: the float32 log-probabilities, the int64 targets and their bool mask. The labels are
    shifted, so every position is a row of the loss (the last one is ignored)."""
    return dims.N * dims.V * 4 + dims.N * 9
