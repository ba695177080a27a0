"""The encoder family's own parts (RoBERTa, BERT): its embeddings, its padding mask and its classification head.

The encoder is the one model of :mod:`lit_adapter.model.gpt` with ``Config.causal = False`` and post-norm blocks
(``norm_placement="post"``); its blocks, attention and MLP are the decoders', so every method that wraps a linear
or fills a hook slot attaches to it unchanged. What differs lives here, as HF ``RobertaModel`` and
``RobertaForSequenceClassification`` compute it (``tests/test_encoder.py`` checks them logit for logit):

* the input: token + position + token-type embeddings, a LayerNorm (``transformer.ln_emb``) and dropout. With
  ``position_embedding="learned_offset"`` (RoBERTa) a token's position counts the non-padding tokens up to it,
  after ``pad_token_id`` (HF's ``create_position_ids_from_input_ids``): ``pad_id + 1, pad_id + 2, ...``, and a pad
  token sits at ``pad_id``; BERT's ``learned`` positions are ``0, 1, ...``.
* attention is bidirectional over the keys that are not ``pad_token_id`` (a ``(B, S)`` key mask), which
  :class:`~lit_adapter.model.gpt.CausalSelfAttention` applies in place of causality.
* virtual tokens (prompt tuning, P-tuning) enter in front like the words, as PEFT passes them in ``inputs_embeds``:
  they get positions and token type 0 and go through the embedding LayerNorm, as PEFT does on ``RobertaModel``
  (``tests/test_encoder_methods.py``). Prefix tuning's keys shift the real tokens' positions by ``P``, as HF's
  ``past_key_values_length`` did when PEFT ran prefix tuning on RoBERTa under transformers 4 (PEFT 0.21 on
  transformers 5 refuses: "Model does not support past key values").
* the classification head (:class:`EncoderClassificationHead`, RoBERTa's): dense, tanh, then ``out_proj`` on the
  first row of the sequence. With P-tuning or prompt tuning that first row is the first virtual token's, as in
  PEFT's ``PeftModelForSequenceClassification`` (it prepends the prompt and the model's head reads ``x[:, 0]``).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn


FIRST_ROW = "first"
"""``GPT.forward(..., return_hidden=FIRST_ROW)``: the final hidden state of the sequence's first row ``(B, n_embd)``
(virtual tokens included), which an encoder's classification head reads."""
INIT_STD = 0.02
"""HF's ``initializer_range``: the head's new weights are N(0, INIT_STD), its biases 0."""


def encoder_inputs(
    model: nn.Module, idx: torch.Tensor, x: torch.Tensor, P_in: int, token_type_ids: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The first block's input ``(B, P_in + T, C)`` and the key mask ``(B, P_in + T)`` (True: a key to attend to).

    ``x`` holds the token embeddings of ``idx`` ``(B, T)`` with the ``P_in`` virtual rows that entered in front;
    the model's other ``P - P_in`` virtual positions (prefix tuning's keys) come before all of them.
    """
    config = model.config
    B, T = idx.shape
    P_before = model.num_virtual_tokens - P_in
    real = idx != config.pad_token_id  # (B, T)
    mask = torch.cat([real.new_ones(B, P_in), real], dim=1)  # (B, P_in + T): virtual rows are always attended
    if config.position_embedding == "learned_offset":  # RoBERTa: counted over the non-padding tokens
        count = torch.cumsum(mask, dim=1, dtype=torch.long) + P_before  # (B, P_in + T)
        pos = count * mask + config.pad_token_id
    else:  # BERT: absolute
        pos = torch.arange(P_before, P_before + P_in + T, device=idx.device).expand(B, -1)
    # positions stay below position_rows: GPT.forward refused P + T > block_size
    x = x + model.transformer.wpe(pos)
    if config.type_vocab_size:
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(idx)
        types = torch.cat([token_type_ids.new_zeros(B, P_in), token_type_ids], dim=1)
        x = x + model.transformer.wtt(types)
    x = model.transformer.ln_emb(x)
    return nn.functional.dropout(x, config.hidden_dropout, model.training), mask


def key_mask_for_attention(key_mask: torch.Tensor) -> torch.Tensor:
    """``(B, S)`` keys to attend to as SDPA's boolean mask ``(B, 1, 1, S)``: every query sees the same keys."""
    return key_mask[:, None, None, :]


class HFLinear(nn.Linear):
    """``nn.Linear`` whose ``reset_parameters`` is HF's ``_init_weights``: weight N(0, 0.02), bias 0 (the head is
    added to a base checkpoint that may lack it, and is initialised as HF initialises a new classifier)."""

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=INIT_STD)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class EncoderClassificationHead(nn.Module):
    """RoBERTa's ``RobertaClassificationHead``: dropout, ``dense`` (C -> C), tanh, dropout, ``out_proj`` (C -> K),
    on the first row's final hidden state. Converted ``classifier.*`` tensors load as ``score.*``.

    BERT's pooler + classifier is the same computation without the first dropout: equal in evaluation, while
    training a BERT here drops out the first row's state once more than HF does."""

    def __init__(self, n_embd: int, num_labels: int, dropout: float) -> None:
        super().__init__()
        self.dense = HFLinear(n_embd, n_embd)
        self.out_proj = HFLinear(n_embd, num_labels)
        self.dropout = nn.Dropout(dropout)

    @property
    def weight(self) -> torch.Tensor:
        """The dtype and device the pooled state is cast to (as :class:`~lit_adapter.model.heads.ScoreHead`'s)."""
        return self.out_proj.weight

    def pool(self, model: nn.Module, input_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
        """``(B, n_embd)``: the first row's final hidden state (``pad_id`` is the model's own: it masks keys)."""
        return model(input_ids, return_hidden=FIRST_ROW)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.dense(self.dropout(pooled)))
        return self.out_proj(self.dropout(x))  # (B, num_labels)
