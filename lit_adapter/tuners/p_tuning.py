"""P-tuning: Liu, Zheng, Du, Ding, Qian, Yang & Tang 2021, "GPT Understands, Too",
https://arxiv.org/abs/2103.10385.

Like prompt tuning (:mod:`lit_adapter.tuners.prompt_tuning`), ``num_virtual_tokens`` continuous embeddings are
prepended to every sequence of a frozen model, but they are the output of a small trained *prompt encoder* over
learned inputs, which the paper found to train more stably than free embeddings. The encoder follows HF PEFT's
``PromptEncoderConfig`` (its ``PromptEncoder``), which the tests match number for number:

* ``mlp``: ``Linear(C, H) -> ReLU -> Linear(H, H) -> ReLU -> Linear(H, C)`` on the (P, C) inputs;
* ``lstm`` (the paper's): a bidirectional ``encoder_num_layers``-layer LSTM of hidden size H (dropout
  ``encoder_dropout`` between its layers), then ``Linear(2H, 2H) -> ReLU -> Linear(2H, C)``;

with ``C = n_embd`` and ``H = encoder_hidden_size`` (default ``C``), everything at PyTorch's default initialisation
(inputs N(0, 1)). No identity at initialisation, as in the reference.

The encoder only helps training: ``final/`` stores its output, the (P, C) virtual-token embeddings, with
``encoder: none`` in ``adapter_config.json``, so inference runs no encoder and loads kilobytes. The resumable
training checkpoint keeps the inputs and the whole encoder.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Dict, Literal, Optional, Tuple

import torch
import torch.nn as nn

from lit_adapter.errors import UserError
from lit_adapter.model.gpt import GPT
from lit_adapter.tuners.virtual_tokens import (
    VirtualRowsAttention,
    VirtualTokenMethod,
    VirtualTokens,
    add_virtual_tokens,
    check_hidden_size,
    check_num_virtual_tokens,
    folded,
)

ENCODERS = ("mlp", "lstm", "none")


@dataclass
class PTuningConfig:
    num_virtual_tokens: int = 20
    """Number of virtual tokens the prompt encoder produces in front of every sequence."""
    encoder: Literal["mlp", "lstm", "none"] = "mlp"
    """Prompt encoder: mlp (PEFT's default), lstm (the paper's bidirectional LSTM + MLP), or none (fixed
    embeddings: what final/ stores once the encoder is folded away; training them is prompt tuning)."""
    encoder_hidden_size: Optional[int] = None
    """Hidden size H of the encoder; None means the model's n_embd (PEFT's default)."""
    encoder_num_layers: int = 2
    """lstm: number of stacked LSTM layers (the MLP always has three linears, as in PEFT)."""
    encoder_dropout: float = 0.0
    """lstm: dropout between the LSTM layers (training only)."""

    def __post_init__(self) -> None:
        check_num_virtual_tokens("p_tuning", self.num_virtual_tokens)
        if self.encoder not in ENCODERS:
            raise UserError(f"p_tuning encoder must be one of {', '.join(ENCODERS)}, got {self.encoder!r}")
        check_hidden_size("p_tuning", self.encoder_hidden_size)
        if isinstance(self.encoder_num_layers, bool) or not isinstance(self.encoder_num_layers, int) \
                or self.encoder_num_layers < 1:
            raise UserError(f"p_tuning encoder_num_layers must be an integer >= 1, got {self.encoder_num_layers!r}")
        if not 0 <= self.encoder_dropout < 1:
            raise UserError(f"p_tuning encoder_dropout must be in [0, 1), got {self.encoder_dropout!r}")
        if self.encoder_dropout > 0 and (self.encoder != "lstm" or self.encoder_num_layers == 1):
            raise UserError("p_tuning encoder_dropout applies between LSTM layers: it needs encoder=lstm and "
                            "encoder_num_layers >= 2")


class PromptEncoder(VirtualTokens):
    """Learned inputs ``embedding`` (P, C) through the encoder of ``settings`` to the (P, C) virtual tokens."""

    def __init__(self, settings: PTuningConfig, n_embd: int) -> None:
        super().__init__(settings.num_virtual_tokens)
        C, H = n_embd, settings.encoder_hidden_size or n_embd
        self.embedding = nn.Parameter(torch.empty(settings.num_virtual_tokens, C))
        self.lstm_head: Optional[nn.LSTM] = None
        self.mlp_head: Optional[nn.Sequential] = None
        if settings.encoder == "lstm":
            self.lstm_head = nn.LSTM(C, H, num_layers=settings.encoder_num_layers, dropout=settings.encoder_dropout,
                                     bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * H, 2 * H), nn.ReLU(), nn.Linear(2 * H, C))
        elif settings.encoder == "mlp":
            self.mlp_head = nn.Sequential(nn.Linear(C, H), nn.ReLU(), nn.Linear(H, H), nn.ReLU(), nn.Linear(H, C))
        self.reset_peft_parameters()

    def embeddings(self) -> torch.Tensor:
        x = self.embedding.unsqueeze(0)  # (1, P, C): one sequence, shared by the batch
        if self.lstm_head is not None:
            x = self.lstm_head(x)[0]  # (1, P, 2H)
        if self.mlp_head is not None:
            x = self.mlp_head(x)  # (1, P, C)
        return x[0]

    @torch.no_grad()
    def reset_peft_parameters(self) -> None:
        nn.init.normal_(self.embedding)  # an nn.Embedding's default, as PEFT's
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()  # PyTorch's defaults for the linears and the LSTM, as in PEFT


class PTuning(VirtualTokenMethod):
    name = "p_tuning"
    summary = ("Fine-tune a frozen LLaMA with P-tuning (Liu et al. 2021): p_tuning.num_virtual_tokens virtual "
               "tokens in front of every sequence, computed by a trained prompt encoder (MLP or LSTM) that final/ "
               "folds into fixed embeddings. Only the encoder and its inputs train.")
    settings_cls = PTuningConfig
    settings_group = "p_tuning"
    train_defaults = {"learning_rate": 1e-3}

    def attach(self, model: GPT, settings: PTuningConfig) -> None:
        attention = partial(VirtualRowsAttention, settings.num_virtual_tokens)
        add_virtual_tokens(model, PromptEncoder(settings, model.config.n_embd), attention)

    def final_tensors(self, model: GPT, settings: PTuningConfig) -> Tuple[Dict[str, torch.Tensor], Any]:
        if settings.encoder == "none":
            return super().final_tensors(model, settings)
        with torch.no_grad():
            was_training = model.virtual_tokens.training
            model.virtual_tokens.eval()  # no LSTM dropout in the folded embeddings
            values = model.virtual_tokens.embeddings()  # (P, C)
            model.virtual_tokens.train(was_training)
        return folded(values), replace(settings, encoder="none", encoder_hidden_size=None, encoder_dropout=0.0)


METHOD = PTuning()
