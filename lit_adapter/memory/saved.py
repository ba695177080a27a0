"""What autograd keeps for the backward of one training step, block by block, mirroring the model's code.

Which op saves which tensor depends on what requires a gradient, so each method saves a different set. This walk
follows the base model (``model.Block``, ``CausalSelfAttention``, ``LLaMAMLP``, ``ln_f`` and the head) through the
ops of :mod:`lit_adapter.memory.ops`, and asks the method's :class:`~lit_adapter.memory.terms.MemoryTerms` at
every site where a method can change what is kept: each linear layer, the attention (trained keys in front of the
real ones, an output added to it), each sublayer's output, and the rows the blocks run on. It names no method.
``tests/test_memory.py`` and each method's tests check the sets against autograd's saved tensors.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Dict, Optional, Tuple, Union

import torch

from lit_adapter.model.config import Config
from lit_adapter.errors import UserError
from lit_adapter.memory.ops import (
    GB,
    PRECISIONS,
    Dims,
    LinearSite,
    Saved,
    attention_over_extra_keys,
    element_size,
    loss_saved,
    precision_dtype,
    query,
    rmsnorm,
    sdpa,
    swiglu,
    tiled_attention,
)
from lit_adapter.memory.terms import AttentionSite, MemoryTerms

__all__ = ["ESTIMATED_PATTERNS", "GB", "OPTIMIZERS", "PRECISIONS", "SDPA_BACKENDS", "block_dims", "block_saved",
           "head_saved", "head_saved_chunked", "head_weight_trains", "make_dims", "precision_dtype",
           "saved_activations"]

OPTIMIZERS = ("adamw", "adamw8bit")
SDPA_BACKENDS = ("flash", "math")
ESTIMATED_PATTERNS = ("dense", "local", "shifted")  # the attention patterns whose saved tensors are modelled


def make_dims(config: Config, B: int, T: int, dtype: torch.dtype, device_type: str,
              quantize: Optional[str] = None) -> Dims:
    return Dims(B=B, T=T, C=config.n_embd, I=config.intermediate_size, V=config.vocab_size, nh=config.n_head,
                ng=config.n_query_groups, hs=config.head_size, d=element_size(dtype), device_type=device_type,
                quantize=quantize, tied=config.tie_embeddings)


def head_weight_trains(dims: Dims, terms: MemoryTerms) -> bool:
    """The head's weight needs a gradient: every base weight trains, or a trained embedding the head is tied to."""
    return terms.base_linears or (terms.embedding and dims.tied)


def block_dims(dims: Dims, terms: MemoryTerms) -> Dims:
    """The blocks' dimensions: rows a method puts in front of the real tokens lengthen every block's sequence."""
    return replace(dims, T=dims.T + terms.extra_rows())


def _attention(s: Saved, terms: MemoryTerms, layer: int, q_rg: bool, k_rg: bool, v_rg: bool, attention,
               backend: str, dims: Dims) -> Tuple[str, bool]:
    """The block's attention from q, k, v (after RoPE) to ``o_proj``'s input: its ledger name and whether it
    requires a gradient."""
    N, d = dims.N, dims.d
    # RoPE's products with the (constant) cos/sin tables keep nothing; q and k become new tensors.
    # Dense SDPA (enable_gqa) and the sparse patterns' tiled kernel (per query member, tiled_attention.members)
    # both read grouped k and v: neither keeps a copy repeated for every query head.
    kv_bytes = N * dims.kv * d
    k, v = ("k_rope", kv_bytes), ("v_out", kv_bytes)
    base_rg = q_rg or k_rg or v_rg
    extra = terms.extra_keys()
    # The fused kernels return (B, T, nh, hs) memory, so transpose + reshape is a view of their output.
    y = "attn.out" if backend == "flash" else "attn.y"
    if attention.pattern != "dense" and (extra or terms.extra_rows()):
        raise UserError(f"the memory estimator models trained rows or keys in front of the real tokens with dense "
                        f"attention only, not {attention.pattern!r}")
    if extra:
        attention_over_extra_keys(s, dims, extra, backend, q_rg)
    elif attention.pattern == "dense":
        if base_rg:
            sdpa(s, "attn", query(dims), k, v, dims.T, dims, backend, q_rg, k_rg)
    elif attention.pattern in ("local", "shifted"):
        y = tiled_attention(s, dims, k, v) if base_rg else "attn.y"
    else:
        raise UserError(f"the memory estimator models {', '.join(ESTIMATED_PATTERNS)} attention, "
                        f"not {attention.pattern!r}")
    y_rg = base_rg or extra > 0  # trained keys reach every layer's attention output
    if terms.attention_output(s, AttentionSite(layer, q_rg, backend), dims):
        return "attn.y", True  # y + what the method adds is a new tensor
    return y, y_rg


def block_saved(dims: Dims, terms: MemoryTerms, layer: int, x_rg: bool, attention,
                backend: str) -> Tuple[Saved, bool]:
    """What one ``Block`` keeps for backward, and whether its output requires a gradient."""
    C, I = dims.C, dims.I
    q = dims.quantize

    def linear(name: str, x: str, rg: bool, fan_in: int, fan_out: int) -> bool:
        return terms.linear(s, LinearSite(name, x, rg, fan_in, fan_out, layer, q), dims)

    s = Saved()
    h1 = rmsnorm(s, "norm_1", "x", x_rg, terms.norms, dims)
    q_rg = linear("attn.q_proj", "h1", h1, C, C)
    k_rg = linear("attn.k_proj", "h1", h1, C, dims.kv)
    v_rg = linear("attn.v_proj", "h1", h1, C, dims.kv)
    y, y_rg = _attention(s, terms, layer, q_rg, k_rg, v_rg, attention, backend, dims)
    o_rg = linear("attn.o_proj", y, y_rg, C, C)
    o_rg = terms.sublayer_output(s, "attn", "attn.o_proj.out", layer, dims) or o_rg
    x2_rg = x_rg or o_rg
    h2 = rmsnorm(s, "norm_2", "x2", x2_rg, terms.norms, dims)
    g_rg = linear("mlp.gate_proj", "h2", h2, C, I)
    u_rg = linear("mlp.up_proj", "h2", h2, C, I)
    m_rg = swiglu(s, g_rg, u_rg, dims)
    out_rg = linear("mlp.down_proj", "mlp.prod", m_rg, I, C)
    out_rg = terms.sublayer_output(s, "mlp", "mlp.down_proj.out", layer, dims) or out_rg
    return s, terms.sublayer_output(s, "block", "block.out", layer, dims) or x2_rg or out_rg


def _extra_rows_input(s: Saved, dims: Dims, terms: MemoryTerms, x_rg: bool) -> None:
    """ln_f's float32 input is a view of the last block's (B, extra + T, C) output, whose whole storage it keeps."""
    if terms.extra_rows() and x_rg and dims.d == 4:
        s.add("x", block_dims(dims, terms).N * dims.C * 4)


def head_saved(dims: Dims, terms: MemoryTerms, x_rg: bool) -> Tuple[Saved, bool]:
    """What ``ln_f`` and the head keep, and whether the logits require a gradient."""
    s = Saved()
    h = rmsnorm(s, "ln_f", "x", x_rg, terms.norms, dims)
    _extra_rows_input(s, dims, terms, x_rg)
    # the head stays unquantized (quantize.quantize_linears skips it)
    out_rg = terms.linear(s, LinearSite("lm_head", "hf", h, dims.C, dims.V, None), dims)
    tied_trains = head_weight_trains(dims, terms)
    if tied_trains:  # a tied head of a trained embedding: its weight's gradient needs the input
        s.add("hf", dims.N * dims.C * dims.d)
    return s, out_rg or tied_trains


def head_saved_chunked(dims: Dims, terms: MemoryTerms, x_rg: bool) -> Saved:
    """What ``ln_f`` and the head keep under the head-chunked loss: ln_f's set and its output (the chunks' input)."""
    s = Saved()
    h = rmsnorm(s, "ln_f", "x", x_rg, terms.norms, dims)
    _extra_rows_input(s, dims, terms, x_rg)
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
    dims = make_dims(config, micro_batch_size, seq_len, precision_dtype(dtype), device_type, spec.quantize)
    terms = spec.definition.memory_terms(spec.settings)
    x_rg = terms.embedding or terms.extra_rows() > 0
    layers = []
    embedding = dims.N * 8 if terms.embedding else 0  # the embedding's backward keeps the token ids
    for i in range(config.n_layer):
        s, x_rg = block_saved(block_dims(dims, terms), terms, i, x_rg, spec.attention, sdpa)
        layers.append(s.total)
    head, _ = head_saved(dims, terms, x_rg)
    return {"layers": layers, "embedding": embedding, "head": head.total, "loss": loss_saved(dims)}
