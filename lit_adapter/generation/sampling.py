"""Choosing the next token from the logits, with the knobs of HF ``generate`` and the same semantics and order.

:func:`sample` applies, as HF's logits processors do: the repetition penalty (Keskar et al. 2019, CTRL: a seen
token's logit is divided by the penalty if positive, multiplied if negative), then the temperature, top-k, and
top-p (nucleus sampling, Holtzman et al. 2020: the smallest set of tokens whose probability reaches ``top_p``,
at least one). Temperature 0 is greedy decoding (the repetition penalty still applies). ``tests/test_generate.py``
checks each step against hand-computed cases and against HF's processors.
"""

from __future__ import annotations

from typing import Optional

import torch

from lit_adapter.errors import UserError


def check_sampling(temperature: float = 0.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                   repetition_penalty: float = 1.0) -> None:
    if temperature < 0:
        raise UserError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise UserError(f"top_k must be >= 1 (or null), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise UserError(f"top_p must lie in (0, 1] (or null), got {top_p}")
    if not repetition_penalty > 0:
        raise UserError(f"repetition_penalty must be > 0 (1 is none), got {repetition_penalty}")


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """``logits`` (B, V) with the logits of the tokens in ``seen`` (B, n) penalised; ``seen`` may repeat ids."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    picked = logits.gather(-1, seen)  # (B, n)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return logits.scatter(-1, seen, picked)


def top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keeps the most likely tokens until their probability reaches ``top_p`` (the one that crosses it included)."""
    sorted_logits, order = torch.sort(logits, dim=-1)  # ascending, as HF's TopPLogitsWarper
    cumulative = sorted_logits.float().softmax(dim=-1).cumsum(dim=-1)
    drop = cumulative <= 1 - top_p
    drop[..., -1] = False  # the most likely token always stays
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: Optional[int] = None,
           top_p: Optional[float] = None, repetition_penalty: float = 1.0,
           seen: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Next token ids ``(B,)`` from last-position logits ``(B, V)``; ``seen`` (B, n) are the ids the repetition
    penalty applies to (the prompt and what was generated so far)."""
    check_sampling(temperature, top_k, top_p, repetition_penalty)
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, repetition_penalty)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1:
        logits = top_p_filter(logits, top_p)
    probs = torch.softmax(logits.float(), dim=-1)
    return torch.multinomial(probs, num_samples=1).squeeze(-1)
