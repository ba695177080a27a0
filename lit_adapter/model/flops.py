"""Model FLOPs of a training step and the matmul rate they are measured against (MFU).

Conventions (docs/throughput.md states them with the numbers):

* **N** counts the *matmul* parameters of the base model: per layer q, k, v, o (k and v with ``n_query_groups``
  heads), the MLP's gate, up and down, plus the output head (its ``padded_vocab_size`` rows, a tied head too). The
  embedding is a lookup, not a matmul, and is not counted. A linear of ``n`` parameters costs ``2 n`` FLOPs per
  token forward, ``2 n`` for the gradient of its input and ``2 n`` for the gradient of its weight.
* **Attention**: ``Q K^T`` and ``A V`` cost ``2 T d`` each per token and layer forward (``d = n_head * head_size``,
  ``T`` the sequence length), **not halved for causality** (PaLM's convention; a causal kernel may skip about half
  of it, which makes MFU by this count an overestimate of what the kernel itself did). Its backward (the gradients
  of ``Q``, ``K``, ``V`` and ``A``) costs twice the forward.
* A **frozen-base** step (adapters, LoRA) costs, per token, ``2 n`` forward for each linear and ``2 n`` for its
  input gradient (no weight gradient): about ``4 N`` plus attention. Layers below the first trained layer
  (``backward_from``; LLaMA-Adapter v1 from its ``start_layer``) run forward only. A **full** fine-tuning step
  costs ``6 N`` plus attention. Not counted: the PEFT methods' own small matmuls (LoRA's rank-8 products, the
  adaption prompt's attention over its 10 positions), norms, RoPE, SwiGLU and the loss (elementwise work), and the
  input gradients that the first trained layer does not need. At stories15M each of these is under 2% of the
  count.
* MFU is model FLOPs per second over a **measured** matmul rate: ``torch.mm`` at the model's own shapes on the same
  machine, in the same process and thread count (:func:`measure_matmul_rate`), not a datasheet peak.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch

from lit_adapter.model.config import Config


def layer_linear_shapes(config: Config) -> List[Tuple[str, int, int]]:
    """``(name, in_features, out_features)`` of one transformer layer's linears."""
    d, hs = config.n_embd, config.head_size
    q_out, kv_out = config.n_head * hs, config.n_query_groups * hs
    inter = config.intermediate_size
    return [("q_proj", d, q_out), ("k_proj", d, kv_out), ("v_proj", d, kv_out), ("o_proj", q_out, d),
            ("gate_proj", d, inter), ("up_proj", d, inter), ("down_proj", inter, d)]


def head_shape(config: Config) -> Tuple[str, int, int]:
    return ("lm_head", config.n_embd, config.padded_vocab_size)


def matmul_params(config: Config) -> int:
    """N: the matmul parameters of all layers plus the head (the embedding lookup excluded)."""
    per_layer = sum(i * o for _, i, o in layer_linear_shapes(config))
    _, i, o = head_shape(config)
    return config.n_layer * per_layer + i * o


def attention_flops_per_token(config: Config, seq_len: int) -> int:
    """Forward FLOPs of ``Q K^T`` and ``A V`` per token and layer: ``2 * 2 * T * d``, not halved for causality."""
    return 4 * seq_len * config.n_head * config.head_size


@dataclass
class StepFlops:
    """Model FLOPs of one optimizer step's forward and backward over ``tokens`` tokens."""

    forward: int
    backward: int
    tokens: int

    @property
    def total(self) -> int:
        return self.forward + self.backward

    @property
    def per_token(self) -> float:
        return self.total / self.tokens


def step_flops(config: Config, seq_len: int, batch_size: int, full: bool = False, backward_from: int = 0
               ) -> StepFlops:
    """FLOPs of a training step on ``batch_size`` sequences of ``seq_len`` tokens (module docstring).

    ``full``: the base weights train (weight gradients too: 6N). ``backward_from``: the first layer the backward
    reaches (layers below it run forward only); the head always backpropagates.
    """
    if not 0 <= backward_from <= config.n_layer:
        raise ValueError(f"backward_from={backward_from} is outside 0..{config.n_layer}")
    per_layer = sum(i * o for _, i, o in layer_linear_shapes(config))
    _, hi, ho = head_shape(config)
    attn = attention_flops_per_token(config, seq_len)
    backward_layers = config.n_layer - backward_from
    grad_factor = 4 if full else 2  # input gradient (+ weight gradient)
    forward = config.n_layer * (2 * per_layer + attn) + 2 * hi * ho
    backward = backward_layers * (grad_factor * per_layer + 2 * attn) + grad_factor * hi * ho
    tokens = seq_len * batch_size
    return StepFlops(forward=forward * tokens, backward=backward * tokens, tokens=tokens)


def first_backward_layer(model: torch.nn.Module) -> int:
    """The lowest block index holding a trainable tensor (``n_layer`` if none does): ``backward_from``."""
    blocks = model.transformer.h
    for idx, block in enumerate(blocks):
        if any(p.requires_grad for p in block.parameters()):
            return idx
    return len(blocks)


@dataclass
class MatmulRate:
    """Measured ``torch.mm`` FLOP/s: per shape, over the model's shapes weighted by their FLOPs, and the best."""

    by_shape: Dict[str, float]
    model_weighted: float
    peak: float


def measure_matmul_rate(config: Config, rows: int, dtype: torch.dtype = torch.float32, device: str = "cpu",
                        min_time_s: float = 0.3, backward_shapes: bool = True) -> MatmulRate:
    """``torch.mm`` FLOP/s at the model's shapes: ``(rows, in) @ (in, out)`` for each distinct linear and the head
    and, with ``backward_shapes``, the input-gradient product ``(rows, out) @ (out, in)``.

    Each shape is timed for at least ``min_time_s`` after one warmup call (in the caller's thread count).
    ``model_weighted`` is the rate of one pass over the shapes with the multiplicity a step has them (FLOPs of all
    over the time of all), ``peak`` the best single shape.
    """
    shapes = {(i, o): 0 for _, i, o in layer_linear_shapes(config)}
    for _, i, o in layer_linear_shapes(config):
        shapes[(i, o)] += config.n_layer
    _, hi, ho = head_shape(config)
    shapes[(hi, ho)] = shapes.get((hi, ho), 0) + 1
    if backward_shapes:
        for (i, o), count in list(shapes.items()):
            shapes[(o, i)] = shapes.get((o, i), 0) + count
    by_shape: Dict[str, float] = {}
    total_flops = total_time = 0.0
    for (i, o), count in shapes.items():
        a = torch.randn(rows, i, dtype=dtype, device=device)
        b = torch.randn(i, o, dtype=dtype, device=device)
        torch.mm(a, b)
        n, t0 = 0, time.perf_counter()
        while True:
            torch.mm(a, b)
            n += 1
            if device == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - t0
            if elapsed >= min_time_s:
                break
        seconds = elapsed / n
        flops = 2 * rows * i * o
        by_shape[f"{rows}x{i}@{i}x{o}"] = flops / seconds
        total_flops += count * flops
        total_time += count * seconds
    return MatmulRate(by_shape=by_shape, model_weighted=total_flops / total_time, peak=max(by_shape.values()))
