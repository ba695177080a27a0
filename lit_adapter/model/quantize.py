"""Quantized frozen bases with bitsandbytes (LLM.int8(), Dettmers et al. 2022; QLoRA's NF4, Dettmers et al. 2023).

The base model's linear layers are replaced, after its weights are loaded, by ``bitsandbytes`` layers holding the
same weights in 8 or 4 bits. Only frozen layers are quantized: PEFT parameters (prompts, gates, LoRA matrices,
v2 biases and scales) stay in full or half precision, and PEFT wrappers keep working because they only call
their inner ``linear``. bitsandbytes >= 0.46 runs these layers on CPU as well as on CUDA; the weights are
quantized when the layer is moved to its device.

Sharded QLoRA (``--fabric.strategy fsdp``, FSDP-QLoRA's route): FSDP2 shards a parameter along its first dimension
and all-gathers a unit's parameters in one buffer of one dtype, so the 4-bit weights are packed in the run's
floating dtype (``quant_storage``: eight NF4 codes per float32 element, four per bfloat16) instead of bytes, a
``(n / 8, 1)`` column FSDP2 cuts into row ranges like any weight. The quantization state (the per-block absmax,
the code book) is not a parameter: it stays whole on every process, kept on the layer as ``quant_state``, from
which bitsandbytes re-attaches it to the gathered weight before each matmul (``fix_4bit_weight_quant_state_from_module``).
"""

from __future__ import annotations

from typing import Callable, Literal, Optional

import torch
import torch.nn as nn

from lit_adapter.errors import UserError
from lit_adapter.tracking.quiet import import_bitsandbytes

QUANTIZE_MODES = ("bnb.int8", "bnb.nf4", "bnb.nf4-dq", "bnb.fp4")
LoadQuantize = Optional[Literal["bnb.int8", "bnb.nf4", "bnb.nf4-dq", "bnb.fp4", "none"]]
"""How generation and evaluation load a base: ``None`` as the fine-tune was trained (its ``adapter_config.json``
records the quantization), ``"none"`` in full precision, or a mode."""


def default_skip(name: str) -> bool:
    # The output head stays in full precision: quantizing it costs the most accuracy for the least memory
    # (and with tied embeddings it shares its weight with the embedding table).
    return name == "lm_head" or name.startswith("lm_head.")


def quantize_linears(
    model: nn.Module,
    mode: Optional[str],
    device: Optional[torch.device] = None,
    compute_dtype: torch.dtype = torch.float32,
    skip: Callable[[str], bool] = default_skip,
    quant_storage: torch.dtype = torch.uint8,
) -> nn.Module:
    """Replaces the ``nn.Linear`` layers of ``model`` (in place) by frozen bitsandbytes counterparts.

    ``mode`` is one of :data:`QUANTIZE_MODES` (``None`` leaves the model as is). Layers whose qualified name
    ``skip`` accepts (by default the output head; ``methods.unquantized`` adds the layers a method trains) are
    left alone. ``quant_storage``: the dtype 4-bit codes are packed in (the same codes, reinterpreted; the run's
    floating dtype under fsdp, see the module docstring).
    """
    if mode is None:
        return model
    if mode not in QUANTIZE_MODES:
        raise UserError(f"unknown --quantize {mode!r}; choose one of {', '.join(QUANTIZE_MODES)}")
    try:
        bnb = import_bitsandbytes()
    except ImportError as err:  # pragma: no cover - bitsandbytes is a dependency
        raise UserError(f"--quantize {mode} needs bitsandbytes: {err}") from None

    if device is None:
        device = next(model.parameters()).device
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is nn.Linear and not skip(name)
    ]
    if any(module.weight.is_meta for _, module in targets):
        raise RuntimeError("load the weights before quantizing: the model is still on the meta device")
    for name, linear in targets:
        weight = linear.weight.data.to("cpu", torch.float32 if device.type == "cpu" else torch.float16)
        with torch.device("meta"):
            if mode == "bnb.int8":
                quantized = bnb.nn.Linear8bitLt(
                    linear.in_features, linear.out_features, bias=linear.bias is not None, has_fp16_weights=False
                )
            else:
                quantized = bnb.nn.Linear4bit(
                    linear.in_features,
                    linear.out_features,
                    bias=linear.bias is not None,
                    compute_dtype=compute_dtype,
                    quant_type="fp4" if mode == "bnb.fp4" else "nf4",
                    compress_statistics=mode == "bnb.nf4-dq",
                    quant_storage=quant_storage,
                )
        if mode == "bnb.int8":
            quantized.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        else:
            quantized.weight = bnb.nn.Params4bit(
                weight, requires_grad=False, quant_type=quantized.weight.quant_type,
                compress_statistics=mode == "bnb.nf4-dq", quant_storage=quant_storage,
            )
        if linear.bias is not None:
            quantized.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
        if mode != "bnb.int8" and device.type == "cpu":
            _check_cpu_4bit_shape(name, linear)
            # In eval mode bitsandbytes repacks 4-bit weights for an AVX512-BF16 kernel: it needs out_features % 32
            # == 0 and in_features % 64 == 0 (it crashes otherwise) and turns the scales into bfloat16, so
            # validation would not see the same weights as training. Keep the one portable kernel throughout.
            quantized.support_avx512bf16_for_cpu = False
        quantized = quantized.to(device)  # quantization happens on this move
        if mode != "bnb.int8":  # where bitsandbytes finds it again once FSDP2 replaced the weight by its gathered copy
            quantized.quant_state = quantized.weight.quant_state
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child_name, quantized)
    return model


def _check_cpu_4bit_shape(name: str, linear: nn.Linear) -> None:
    # bitsandbytes 0.50's CPU 4-bit dequantization reads the blocks in the wrong layout when in_features is a
    # multiple of 16 but not of the 64-element block: outputs would be silently wrong, so refuse.
    if linear.in_features % 16 == 0 and linear.in_features % 64:
        raise UserError(
            f"4-bit quantization of {name} ({linear.in_features} input features) is wrong on CPU in bitsandbytes "
            "(in_features must be a multiple of 64 there); use --quantize bnb.int8 or a GPU"
        )


def dtype_for_quantized_weights(mode: Optional[str]) -> float:
    """Bytes per weight of a quantized base (for the memory estimator); 4-bit adds one fp32 absmax per 64."""
    if mode is None:
        raise ValueError("not quantized")
    if mode == "bnb.int8":
        return 1.0 + 4.0 / 4096  # one fp32 scale per row of ~4096
    if mode == "bnb.nf4-dq":
        return 0.5 + (1.0 + 4.0 / 256) / 64  # 8-bit absmax per block of 64, fp32 second-level per 256 blocks
    return 0.5 + 4.0 / 64


def dequantized_weight(linear: nn.Module) -> torch.Tensor:
    """The floating-point weight (out, in) that ``linear`` computes with: a plain layer's own, a bitsandbytes
    layer's dequantized (NF4/FP4 blocks times their scales; int8 rows times their absmax / 127). Methods whose
    initial values depend on the weights (DoRA's magnitude on a quantized base: QDoRA) read them here."""
    weight = linear.weight
    if hasattr(weight, "quant_state"):  # Params4bit
        bnb = import_bitsandbytes()
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    if hasattr(weight, "SCB") and not weight.is_floating_point():  # Int8Params without fp16 weights
        return weight.data.float() * weight.SCB.float()[:, None] / 127
    return weight
