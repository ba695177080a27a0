"""What prompt tuning, P-tuning and prefix tuning share: virtual tokens before the first real token.

The three methods (Lester et al. 2021, https://arxiv.org/abs/2104.08691; Liu et al. 2021,
https://arxiv.org/abs/2103.10385; Li & Liang 2021, https://arxiv.org/abs/2101.00190) train only P virtual tokens
in front of every sequence and leave the model frozen. They enter through the model's hook slot for this,
``GPT.virtual_tokens`` (:mod:`lit_adapter.model.gpt`), so the real tokens sit at positions ``P, P + 1, ...`` and the
model drops the virtual rows from its output: logits, the loss and the training loop see only the real tokens.

* Prompt tuning and P-tuning put P input embeddings in front of the sequence (P-tuning computes them with a small
  encoder). They run through every layer like tokens at positions ``0..P-1`` (RoPE included), as HF PEFT does by
  concatenating them to ``inputs_embeds``.
* Prefix tuning adds no rows: every layer's attention sees P learned keys and values (no RoPE), as HF PEFT does by
  passing them as ``past_key_values``.

Their attention goes through every layer's attention hook slot (``attn.adapter``): prefix tuning's
:class:`~lit_adapter.tuners.prefix_tuning.PrefixAttention` and, for the other two, :class:`VirtualRowsAttention`.
Dense attention over ``[virtual; real]`` is plain causal attention. With a sparse pattern
(:mod:`lit_adapter.model.attention`) every real token still sees every virtual token in the same softmax: the pattern
applies among the real tokens (counted from the first real one) and the virtual keys are passed to the kernel as
its ``prefix``, merged exactly; the virtual rows of prompt and P-tuning attend causally among themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn

import lit_adapter.model.gpt as base
from lit_adapter.model.config import Config
from lit_adapter.errors import UserError
from lit_adapter.memory.terms import MemoryTerms
from lit_adapter.tuners.base import Method, TunerLayer

VIRTUAL_NAMES = ("virtual_tokens",)
"""Every tensor of the three methods lives under ``GPT.virtual_tokens``."""


def check_num_virtual_tokens(method: str, n: Any) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UserError(f"{method} num_virtual_tokens must be an integer >= 1, got {n!r}")


def check_hidden_size(method: str, n: Any) -> None:
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise UserError(f"{method} encoder_hidden_size must be a positive integer or None, got {n!r}")


class VirtualTokens(TunerLayer):
    """Base of the ``GPT.virtual_tokens`` modules: ``num_virtual_tokens`` positions before the first real token.

    It has no base layer (:class:`~lit_adapter.tuners.base.TunerLayer`) and cannot pass through: virtual tokens
    shift the real ones (``VirtualTokenMethod.can_switch_off``). Subclasses give the rows that enter in front of the
    sequence (:meth:`embeddings`, ``(P, n_embd)``) or, for prefix tuning, override :meth:`forward` to add none.
    """

    def __init__(self, num_virtual_tokens: int) -> None:
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens

    @staticmethod
    def entering(input_pos: Optional[torch.Tensor]) -> bool:
        """Whether the virtual tokens enter with this input: in training, and with a decoding session's first chunk."""
        return input_pos is None or bool(input_pos[0] == 0)

    def embeddings(self) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, input_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The real tokens' embeddings (B, T, C), with the virtual rows in front (B, P + T, C) when they enter."""
        if not self.entering(input_pos):
            return x  # decoding: the virtual tokens are in the KV cache already
        prompt = self.embeddings().to(x.dtype)  # (P, C)
        return torch.cat([prompt.unsqueeze(0).expand(x.shape[0], -1, -1), x], dim=1)


def attend_with_prefix(
    attn: base.CausalSelfAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    input_pos: Optional[torch.Tensor], prefix: Tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """Causal attention of ``q`` (B, nh, T, hs) over grouped ``k``, ``v`` (B, ng, S, hs), plus keys and values
    ``prefix`` (B, ng, P, hs) that every query sees, in one softmax. ``input_pos`` as in the base hook, counted over ``k``."""
    if attn.attention_kernel is not None:
        return attn.attention_kernel(q, k, v, input_pos, prefix=prefix)
    pk, pv = prefix
    content = attn.content_mask(q, k.shape[-2], input_pos)  # (T, S) causal, or an encoder's (B, 1, 1, S)
    mask = torch.cat([content.new_ones(*content.shape[:-1], pk.shape[-2]), content], dim=-1)  # (..., P + S)
    return base.attend(q, torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2), attn_mask=mask)


class VirtualRowsAttention(nn.Module):
    """The attention hook of prompt tuning and P-tuning, whose first P rows (and KV-cache slots) are the virtual
    tokens; it has no tensors.

    Dense attention is the base's plain causal attention. A sparse pattern applies among the real tokens, and
    every real token also sees all virtual ones; the virtual rows attend causally among themselves.
    """

    def __init__(self, num_virtual_tokens: int) -> None:
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens

    def forward(
        self, attn: base.CausalSelfAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        input_pos: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        kernel = attn.attention_kernel
        if kernel is None:
            return attn.scaled_dot_product_attention(q, k, v, input_pos)
        P = self.num_virtual_tokens
        if input_pos is None:  # rows 0..P-1 are the virtual tokens
            virtual = base.attend(q[:, :, :P], k[:, :, :P], v[:, :, :P], is_causal=True)
            real = kernel(q[:, :, P:], k[:, :, P:], v[:, :, P:], prefix=(k[:, :, :P], v[:, :, :P]))
            return torch.cat([virtual, real], dim=2)  # (B, nh, P + T, hs)
        # decoding: a virtual query (position < P) sees no real token (the pattern's causal part) and the virtual
        # ones up to itself; a real query sees every virtual token and the pattern's keys among the real ones
        content = kernel.dense_mask(q.shape[1], q.shape[2], k.shape[2] - P, q_positions=input_pos - P)
        virtual = torch.arange(P, device=q.device) <= input_pos[:, None]  # (T, P)
        mask = torch.cat([virtual.expand(content.shape[0], -1, -1), content], dim=-1)  # (nh or 1, T, S)
        return base.attend(q, k, v, attn_mask=mask.unsqueeze(0))

    def extra_repr(self) -> str:
        return f"num_virtual_tokens={self.num_virtual_tokens}"


def add_virtual_tokens(model: base.GPT, virtual_tokens: VirtualTokens, attention: Callable[[], nn.Module]) -> None:
    """Sets ``virtual_tokens`` into ``model``'s slot for them and ``attention()`` into every layer's attention hook
    slot, in place."""
    if model.virtual_tokens is not None or any(block.attn.adapter is not None for block in model.transformer.h):
        raise RuntimeError("the model's virtual-token or attention hook is already taken by a PEFT method")
    model.virtual_tokens = virtual_tokens
    for block in model.transformer.h:
        block.attn.adapter = attention()


@dataclass(frozen=True)
class VirtualTokenMemoryTerms(MemoryTerms):
    """Prompt and P-tuning: every block runs on ``rows + T`` rows, all requiring a gradient from the first block on;
    ln_f, the head and the loss see the ``T`` real rows. An encoder's few (P, hidden) activations (P-tuning, prefix
    tuning's MLP) are not counted: under a megabyte for 7B."""

    rows: int = 0

    def extra_rows(self) -> int:
        return self.rows


class VirtualTokenMethod(Method):
    # the virtual positions shift every real token's position: passing them through in place is not the base model
    can_switch_off = False
    """What the three methods declare alike: the trained tensors, the checks and the memory terms."""

    trained_names = VIRTUAL_NAMES
    added_names = VIRTUAL_NAMES

    def validate(self, settings: Any, config: Config) -> None:
        if settings.num_virtual_tokens >= config.block_size:
            raise UserError(f"{self.name} num_virtual_tokens={settings.num_virtual_tokens} leaves no room for real "
                            f"tokens in the model's block_size={config.block_size}")

    def reserved_positions(self, settings: Any) -> int:
        return settings.num_virtual_tokens

    def memory_terms(self, settings: Any) -> MemoryTerms:
        return VirtualTokenMemoryTerms(rows=settings.num_virtual_tokens)


def folded(values: torch.Tensor) -> Dict[str, torch.Tensor]:
    """``final/``'s tensors when a reparameterisation is folded away: its output as ``virtual_tokens.embedding``."""
    return {"virtual_tokens.embedding": values.detach().cpu().contiguous()}
