"""A sequence-classification head on the one LLaMA, as HF ``LlamaForSequenceClassification`` has it (an encoder's,
RoBERTa's dense + tanh + out_proj on the first row, is :class:`~lit_adapter.model.encoder.EncoderClassificationHead`).

The head is one bias-free linear map ``score`` (n_embd -> number of labels) applied to the final normalized hidden
state of each sequence's *last non-padding token*: with causal attention that is the only position that has seen the
whole input. "Last non-padding" is HF's rule (``GenericForSequenceClassification``): the rightmost position whose
token is not ``pad_id``, so left and right padding both work and a pad-id token inside the text does not cut it.
The tensor is named ``score.weight`` as in HF, so a converted HF classifier's head loads as it is.

A head composes with every method of the registry (:class:`HeadSpec` rides on :class:`~lit_adapter.tuners.registry.MethodSpec`):
its tensor is added (initialised N(0, 0.02) as HF's ``_init_weights`` does, never loaded from a base checkpoint),
always trains, stays unquantized on a quantized base (QLoRA + head) and is saved beside the method's own tensors in
``final/`` and ``best/``. The language-model head ``lm_head`` stays in the model, unused by the classifier.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Tuple

import torch
import torch.nn as nn

from lit_adapter.errors import UserError
from lit_adapter.model.encoder import EncoderClassificationHead

HEAD_NAME = "score"
"""The head's attribute on the model and the first component of its tensor's name (``score.weight``)."""
INIT_STD = 0.02
"""HF's ``initializer_range`` default: the head's initial weights are N(0, INIT_STD)."""


@dataclass
class HeadSpec:
    """The classification head of a run: its labels (in output order) and the padding id it pools around."""

    labels: Tuple[str, ...] = ()
    """The label names; output ``i`` of the head is ``labels[i]``."""
    pad_id: Optional[int] = None
    """The token id the batches are padded with; the head reads the rightmost position holding another token."""

    def __post_init__(self) -> None:
        self.labels = tuple(str(label) for label in self.labels)
        if len(self.labels) < 2:
            raise UserError(f"a classification head needs at least two labels, got {list(self.labels)}")
        if len(set(self.labels)) != len(self.labels):
            raise UserError(f"the head's labels repeat: {list(self.labels)}")
        if self.pad_id is None:
            raise UserError("a classification head needs the pad token: the tokenizer defines none (LLaMA's and "
                            "llama2.c's do not), so pass --head.pad_id (e.g. 0, <unk>, which never ends a text)")
        if isinstance(self.pad_id, bool) or not isinstance(self.pad_id, int) or self.pad_id < 0:
            raise UserError(f"head pad_id must be a token id >= 0, got {self.pad_id!r}")

    @property
    def num_labels(self) -> int:
        return len(self.labels)


class ScoreHead(nn.Linear):
    """``nn.Linear(n_embd, num_labels, bias=False)`` with HF's initialisation as its ``reset_parameters``."""

    def __init__(self, n_embd: int, num_labels: int) -> None:
        super().__init__(n_embd, num_labels, bias=False)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # nn.Linear's initialiser, also called by methods._materialize_new_parameters once the weight leaves meta
        nn.init.normal_(self.weight, mean=0.0, std=INIT_STD)

    def pool(self, model: nn.Module, input_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
        """``(B, n_embd)``: each row's final hidden state at its last non-padding token."""
        hidden = model(input_ids, return_hidden=True)  # (B, T, n_embd)
        last = last_token_index(input_ids, pad_id)  # (B,)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def attach_head(model: nn.Module, spec: HeadSpec) -> None:
    """Adds ``model.score`` (on the current default device, meta while the model is built): the decoders' linear
    on the last token, or an encoder's RoBERTa head on the first row (:mod:`lit_adapter.model.encoder`)."""
    if hasattr(model, HEAD_NAME):
        raise RuntimeError("the model already has a classification head")
    config = model.config
    if config.causal:
        head = ScoreHead(config.n_embd, spec.num_labels)
    else:
        if spec.pad_id != config.pad_token_id:  # the model masks its padding by its own id
            raise UserError(f"head pad_id {spec.pad_id} is not the encoder's padding token {config.pad_token_id}; "
                            f"leave --head.pad_id unset or pass {config.pad_token_id}")
        dropout = config.hidden_dropout if config.classifier_dropout is None else config.classifier_dropout
        head = EncoderClassificationHead(config.n_embd, spec.num_labels, dropout)
    setattr(model, HEAD_NAME, head)


def is_head_tensor(name: str, param: Any = None) -> bool:
    """Whether the parameter or state-dict entry ``name`` is the head's (``score.weight``, any wrapper prefix)."""
    return HEAD_NAME in name.split(".")


def last_token_index(input_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """``(B,)`` index of the rightmost token that is not ``pad_id`` in each row of ``input_ids`` ``(B, T)``.

    HF's rule; an all-padding row gives 0 (``argmax`` of zeros), as in HF.
    """
    non_pad = (input_ids != pad_id).to(torch.int64)  # (B, T)
    positions = torch.arange(input_ids.shape[-1], device=input_ids.device)  # (T,)
    return (positions * non_pad).argmax(-1)  # (B,)


def classification_logits(model: nn.Module, input_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """``(B, num_labels)`` logits of the head on the last non-padding token of each row of ``input_ids``.

    ``model`` is the (Fabric-wrapped or plain) GPT carrying ``score``; the forward stops before ``lm_head``, so no
    ``(B, T, vocab)`` tensor is made.
    """
    head = getattr(_unwrapped(model), HEAD_NAME)
    pooled = head.pool(model, input_ids, pad_id)  # (B, n_embd): the last token's, or an encoder's first row
    return head(pooled.to(head.weight.dtype))  # (B, num_labels)


def _unwrapped(model: nn.Module) -> nn.Module:
    # Fabric's wrapper forwards calls but not attribute access to submodules added after wrapping
    return getattr(model, "module", model)
