"""OLoRA: Orthonormal Low-Rank Adaptation (Büyükakyüz 2024, https://arxiv.org/abs/2406.01775).

Like PiSSA (``tuners/pissa.py``), OLoRA starts ``A`` and ``B`` from the adapted weight instead of from zero and
noise, but from its QR decomposition, cheaper than an SVD: with ``W = Q R`` (Householder QR, ``Q`` (out, k)
orthonormal, ``R`` (k, in)) and ``s = alpha / r``::

    B = Q[:, :r]       orthonormal columns: the update starts well conditioned, which the paper credits for faster
    A = R[:r]          convergence
    W_res = W - s B A  the frozen base

This is PEFT's ``init_lora_weights="olora"`` (``LoraLayer.olora_init``), which the tests compare with; note that
PEFT does not divide ``A``, ``B`` by the scale, so ``W_res + s B A = W`` holds for the residual it keeps. Only
``A`` and ``B`` train. ``final/`` keeps ``A`` and ``B`` and the residual is recomputed from the base checkpoint on
loading, exactly as for PiSSA (the residual is ``W`` minus ``s`` times its projection onto the span of its first r
columns, which does not depend on QR's sign convention); see ``tuners/pissa.py`` for why, for the PEFT export's
refusal and for quantized bases (the residual of the full-precision weight is quantized; PEFT factors the
dequantized weight of an already quantized layer, which adds a second quantization error).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch

from lit_adapter.tuners.lora import LoRAConfig
from lit_adapter.tuners.pissa import ResidualLoRA, ResidualLoRALinear


@dataclass
class OLoRAConfig(LoRAConfig):
    """OLoRA's settings: LoRA's; A and B start at the QR factors of each adapted weight (B = Q[:, :r], A = R[:r]),
    and the base becomes the residual W - (alpha / r) B A."""


class OLoRALinear(ResidualLoRALinear):
    """A residual LoRA layer whose initial ``A``, ``B`` are the first r rows of ``R`` and columns of ``Q``."""

    def factors(self, weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        Q, R = torch.linalg.qr(weight)
        return R[: self.r].contiguous(), Q[:, : self.r].contiguous()


class OLoRA(ResidualLoRA):
    name = "olora"
    summary = ("Fine-tune a frozen LLaMA with OLoRA (Büyükakyüz 2024): LoRA whose B and A start at the first r "
               "columns of Q and rows of R of each adapted weight's QR decomposition, the base becoming the residual "
               "W - s B A.")
    settings_cls = OLoRAConfig
    settings_group = "olora"
    layer_cls = OLoRALinear


METHOD = OLoRA()
