"""LLaMA-Adapter v2's epilogue ``scale * (x @ W^T + b)`` fused into one autograd node.

Autograd's unfused form makes four passes over the output beside the matmul: the bias add and the scale multiply
forward, ``grad * scale`` and ``grad * z`` (for the scale's gradient, ``z = x W^T + b``) backward, each into a
freshly allocated output-sized tensor. At the output head those tensors are (B*T, vocab) (131 MB at stories15M's
4 x 256 tokens and 32,000 pieces). :class:`ScaleBiasLinear`:

* forward: ``z = addmm(b, x, W^T)`` (the bias enters as the GEMM's accumulator: no separate add pass, no
  intermediate ``x W^T``), then ``out = z * scale``; ``z`` is saved for the backward, as autograd's ``mul`` saves
  it in the unfused form;
* backward: ``grad_z = grad * scale``; the scale's gradient reuses the saved ``z`` in place (``z *= grad``, then
  a column sum), so no third output-sized tensor is allocated; ``grad_b`` is ``grad_z``'s column sum and
  ``grad_x = grad_z @ W`` (``grad_W = grad_z^T x`` only if ``W`` trains).

The values are the unfused form's up to floating-point reassociation (tests/test_adapter_v2.py: float64 to 1e-12,
float32 to 1e-6). Because the saved ``z`` is consumed, a second backward through the same graph raises autograd's
in-place error instead of returning a wrong gradient.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch


class ScaleBiasLinear(torch.autograd.Function):
    """``scale * (x @ weight.T + bias)`` for ``x`` (..., in), ``weight`` (out, in), ``bias`` and ``scale`` (out,)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        z = torch.addmm(bias, x2, weight.t())  # (rows, out)
        out = z * scale
        ctx.save_for_backward(x2, weight, scale, z)
        ctx.x_shape = x.shape
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        x2, weight, scale, z = ctx.saved_tensors
        g = grad.reshape(-1, weight.shape[0])
        grad_z = g * scale
        grad_x = grad_weight = grad_bias = grad_scale = None
        if ctx.needs_input_grad[3]:
            grad_scale = z.mul_(g).sum(0)  # the saved z is consumed: see the module docstring
        if ctx.needs_input_grad[2]:
            grad_bias = grad_z.sum(0)
        if ctx.needs_input_grad[0]:
            grad_x = (grad_z @ weight).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            grad_weight = grad_z.t() @ x2
        return grad_x, grad_weight, grad_bias, grad_scale


def fusable(linear: torch.nn.Module, x: torch.Tensor, *vectors: torch.Tensor) -> bool:
    """Whether :class:`ScaleBiasLinear` may replace ``scale * (linear(x) + bias)``: a plain ``nn.Linear`` without
    its own bias, every tensor of one floating dtype, and no autocast (which would change the matmul's dtype)."""
    if type(linear) is not torch.nn.Linear or linear.bias is not None or x.dim() < 2:
        return False
    if torch.is_autocast_enabled(x.device.type):
        return False
    dtype = linear.weight.dtype
    return dtype.is_floating_point and x.dtype == dtype and all(v.dtype == dtype for v in vectors)


def scale_bias_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return ScaleBiasLinear.apply(x, weight, bias, scale)
