"""Autoregressive decoding with the KV cache: one prompt (:func:`generate_tokens`, :func:`generate`) or a batch of
left-padded prompts, each row stopping on its own (:func:`generate_batch`), optionally with a compiled decode step.
Sampling knobs (temperature, top-k, top-p, repetition penalty) are :mod:`lit_adapter.generation.sampling`'s; the command
lines (streaming, stop strings, batched prompt files) are :mod:`lit_adapter.cli.generate`'s."""

from __future__ import annotations

from typing import Callable, Iterator, List, Optional, Sequence

import torch

from lit_adapter.errors import UserError
from lit_adapter.model.gpt import GPT
from lit_adapter.generation.sampling import check_sampling, sample


def supports_padded_batches(model: GPT) -> bool:
    """Left-padded batches need the dense attention's key-padding mask; sparse kernels and prompt methods build
    their own masks, so their prompts are decoded one by one (same tokens, less parallelism)."""
    return model.num_virtual_tokens == 0 and all(block.attn.attention_kernel is None for block in model.transformer.h)


def decode_steps(
    model: GPT,
    prompts: Sequence[torch.Tensor],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    repetition_penalty: float = 1.0,
    pad_id: int = 0,
    finished: Optional[torch.Tensor] = None,
    compile: bool = False,
) -> Iterator[torch.Tensor]:
    """Yields the next token of every row, ``(B,)``, for 1-D ``prompts`` decoded together with the KV cache.

    The prompts are left-padded to one length; padded key slots are masked out (``KVCache.key_valid``), and since
    RoPE attention depends only on relative positions, every row computes what it would alone. ``finished`` (a
    ``(B,)`` bool tensor the caller updates) ends the decoding once every row is done. At most the model's window
    is filled (``max_new_tokens`` is cut there; :func:`room_for` says by how much).
    """
    check_sampling(temperature, top_k, top_p, repetition_penalty)
    if not prompts or any(p.ndim != 1 or p.numel() == 0 for p in prompts):
        raise UserError("every prompt must encode to at least one token")
    if max_new_tokens < 0:
        raise UserError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    B, L = len(prompts), max(p.numel() for p in prompts)
    if B > 1 and any(p.numel() != L for p in prompts) and not supports_padded_batches(model):
        raise UserError("prompts of different lengths can only be batched with dense attention and no prompt method")
    device = prompts[0].device
    max_new_tokens = min(max_new_tokens, room_for(model, L))
    if max_new_tokens == 0:
        return
    idx = torch.full((B, L), pad_id, dtype=torch.long, device=device)
    valid = torch.zeros(B, L + max_new_tokens, dtype=torch.bool, device=device)
    for row, p in enumerate(prompts):
        idx[row, L - p.numel():] = p
        valid[row, L - p.numel():] = True
    model.set_kv_cache(batch_size=B, max_seq_length=L + max_new_tokens, device=device)
    P = model.num_virtual_tokens
    if not bool(valid.all()):
        key_valid = torch.cat([valid.new_ones(B, P), valid], dim=1)  # (B, S): the virtual slots come first
        for block in model.transformer.h:
            block.attn.kv_cache.key_valid = key_valid
    step_model = torch.compile(model, dynamic=False) if compile else model
    seen = [p.clone() for p in prompts]  # what the repetition penalty applies to, per row
    try:
        input_pos = torch.arange(L, device=device)
        logits = model(idx, input_pos=input_pos)[:, -1]  # (B, V)
        for step in range(max_new_tokens):
            history = None
            if repetition_penalty != 1.0:  # rows padded with their own first id: a repeat changes nothing
                longest = max(h.numel() for h in seen)
                history = torch.stack([torch.cat([h, h[:1].expand(longest - h.numel())]) for h in seen])  # (B, n)
            token = sample(logits, temperature, top_k, top_p, repetition_penalty, history)  # (B,)
            yield token
            if step + 1 == max_new_tokens or (finished is not None and bool(finished.all())):
                return
            seen = [torch.cat([h, t.view(1)]) for h, t in zip(seen, token)]
            input_pos = input_pos[-1:] + 1
            logits = step_model(token.view(B, 1), input_pos=input_pos)[:, -1]
    finally:
        model.clear_kv_cache()


def real_window(model) -> int:
    """The real tokens' context: ``block_size`` less the positions a prompt method's virtual tokens take."""
    return model.config.block_size - getattr(model, "num_virtual_tokens", 0)


def room_for(model: GPT, prompt_length: int) -> int:
    """How many tokens fit after a prompt of ``prompt_length`` in the model's window (virtual tokens take theirs)."""
    window = real_window(model)
    if prompt_length > window:
        raise UserError(f"the prompt has {prompt_length} tokens; the model's context is {window}")
    return window - prompt_length


@torch.inference_mode()
def generate_tokens(
    model: GPT,
    prompt: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    eos_id: Optional[int] = None,
    *,
    top_p: Optional[float] = None,
    repetition_penalty: float = 1.0,
    compile: bool = False,
) -> Iterator[torch.Tensor]:
    """Yields the new token ids one at a time (a 0-d tensor each) for a 1-D ``prompt``; stops after ``eos_id``."""
    if prompt.ndim != 1 or prompt.numel() == 0:
        raise UserError("the prompt must encode to at least one token")
    for token in decode_steps(model, [prompt], max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                              compile=compile):
        yield token[0]
        if eos_id is not None and token.item() == eos_id:
            return


@torch.inference_mode()
def generate_batch(
    model: GPT,
    prompts: Sequence[torch.Tensor],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    eos_id: Optional[int] = None,
    *,
    top_p: Optional[float] = None,
    repetition_penalty: float = 1.0,
    stop: Optional[Callable[[int, List[int]], bool]] = None,
    on_token: Optional[Callable[[int, int], None]] = None,
    compile: bool = False,
) -> List[List[int]]:
    """The new token ids of each prompt, decoded as one batch; each row stops on its own, at ``eos_id`` (included)
    or when ``stop(row, ids)`` says so (e.g. a stop string). ``on_token(row, id)`` sees every token as it comes."""
    prompts = list(prompts)
    if len(prompts) > 1 and any(p.numel() != prompts[0].numel() for p in prompts) and not supports_padded_batches(model):
        # the same tokens, one prompt at a time (see supports_padded_batches)
        return [generate_batch(model, [p], max_new_tokens, temperature, top_k, eos_id, top_p=top_p,
                               repetition_penalty=repetition_penalty,
                               stop=None if stop is None else (lambda _, ids, r=row: stop(r, ids)),
                               on_token=None if on_token is None else (lambda _, t, r=row: on_token(r, t)),
                               compile=compile)[0] for row, p in enumerate(prompts)]
    out: List[List[int]] = [[] for _ in prompts]
    finished = torch.zeros(len(prompts), dtype=torch.bool)
    for tokens in decode_steps(model, prompts, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                               finished=finished, compile=compile):
        for row, token in enumerate(tokens.tolist()):
            if finished[row]:
                continue
            out[row].append(token)
            if on_token is not None:
                on_token(row, token)
            if (eos_id is not None and token == eos_id) or (stop is not None and stop(row, out[row])):
                finished[row] = True
    return out


def generate(
    model: GPT,
    prompt: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    eos_id: Optional[int] = None,
    **sampling,
) -> torch.Tensor:
    """The prompt followed by the generated tokens (1-D); the EOS token, if reached, is included."""
    new = list(generate_tokens(model, prompt, max_new_tokens, temperature, top_k, eos_id, **sampling))
    if not new:
        return prompt
    return torch.cat([prompt, torch.stack(new).to(prompt.dtype)])
