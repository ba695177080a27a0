"""Prompt tuning: Lester, Al-Rfou & Constant 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning",
https://arxiv.org/abs/2104.08691.

``num_virtual_tokens`` learned input embeddings (a "soft prompt", ``(P, n_embd)``) are prepended to every
sequence; the model stays frozen and only the soft prompt trains. The virtual tokens run through the model like
tokens at positions ``0..P-1`` and the real tokens follow at ``P, P + 1, ...``
(:mod:`lit_adapter.tuners.virtual_tokens`), as in HF PEFT's ``PromptTuningConfig``, which the tests match number
for number.

Initialisation follows PEFT's ``prompt_tuning_init``: ``random`` draws the prompt from N(0, 1) (an
``nn.Embedding``'s default, PEFT's ``RANDOM``), ``text`` copies the token embeddings of ``init_text``, its tokens
repeated or cut to ``num_virtual_tokens`` (PEFT's ``TEXT``; the text's own tokens, without BOS). There is no
identity at initialisation: like the reference, the prompted model differs from the base from the first step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import List, Literal, Optional

import torch
import torch.nn as nn

from lit_adapter.errors import UserError
from lit_adapter.model.gpt import GPT
from lit_adapter.tuners.virtual_tokens import (
    VirtualRowsAttention,
    VirtualTokenMethod,
    VirtualTokens,
    add_virtual_tokens,
    check_num_virtual_tokens,
)


@dataclass
class PromptTuningConfig:
    num_virtual_tokens: int = 20
    """Length of the soft prompt: learned embeddings in front of every sequence."""
    init: Literal["random", "text"] = "random"
    """How the prompt starts: random (N(0, 1), as PEFT's RANDOM) or text (the token embeddings of init_text)."""
    init_text: Optional[str] = None
    """With init=text: the text whose tokens' embeddings start the prompt, repeated or cut to num_virtual_tokens."""

    def __post_init__(self) -> None:
        check_num_virtual_tokens("prompt_tuning", self.num_virtual_tokens)
        if self.init not in ("random", "text"):
            raise UserError(f"prompt_tuning init must be random or text, got {self.init!r}")
        if self.init == "text" and not self.init_text:
            raise UserError("prompt_tuning init=text needs --prompt_tuning.init_text")


def repeat_to_length(token_ids: List[int], length: int) -> List[int]:
    """PEFT's TEXT rule: cut the text's tokens to ``length``, or repeat them until they fill it."""
    if not token_ids:
        raise UserError("prompt_tuning init_text encodes to no tokens")
    return (token_ids * math.ceil(length / len(token_ids)))[:length]


class PromptEmbedding(VirtualTokens):
    """The soft prompt ``embedding`` (P, n_embd)."""

    def __init__(self, num_virtual_tokens: int, n_embd: int) -> None:
        super().__init__(num_virtual_tokens)
        self.embedding = nn.Parameter(torch.empty(num_virtual_tokens, n_embd))
        self.reset_peft_parameters()

    def embeddings(self) -> torch.Tensor:
        return self.embedding

    @torch.no_grad()
    def reset_peft_parameters(self) -> None:
        nn.init.normal_(self.embedding)

    @torch.no_grad()
    def init_from_tokens(self, wte: torch.Tensor, token_ids: List[int]) -> None:
        """Copies the rows ``token_ids`` of the token embedding ``wte`` (vocab, n_embd), repeated or cut to P."""
        ids = torch.tensor(repeat_to_length(token_ids, self.num_virtual_tokens), device=wte.device)
        self.embedding.copy_(wte.index_select(0, ids).to(self.embedding.dtype))


class PromptTuning(VirtualTokenMethod):
    name = "prompt_tuning"
    summary = ("Fine-tune a frozen LLaMA with prompt tuning (Lester et al. 2021): a soft prompt of "
               "prompt_tuning.num_virtual_tokens learned embeddings in front of every sequence. Only the prompt "
               "trains.")
    settings_cls = PromptTuningConfig
    settings_group = "prompt_tuning"
    train_defaults = {"learning_rate": 3e-2}

    def attach(self, model: GPT, settings: PromptTuningConfig) -> None:
        P = settings.num_virtual_tokens
        add_virtual_tokens(model, PromptEmbedding(P, model.config.n_embd), partial(VirtualRowsAttention, P))

    def initialize_from_base(self, model: GPT, settings: PromptTuningConfig, checkpoint_dir: Path) -> None:
        if settings.init != "text":
            return
        from lit_adapter.data.tokenizer import Tokenizer

        token_ids = Tokenizer.from_checkpoint_dir(checkpoint_dir).encode(settings.init_text, bos=False).tolist()
        model.virtual_tokens.init_from_tokens(model.transformer.wte.weight, token_ids)


METHOD = PromptTuning()
