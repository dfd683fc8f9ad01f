"""The gated mix of S2MoE's two streams: ``y = g * out[:T] + (1 - g) * out[T:]`` (docs/design.md 1.5).

``out`` is the dispatcher's [2T, d] output (clean rows, then noisy rows). Splitting it and mixing
with ``lerp`` would make autograd ``cat`` the two halves' gradients back together (a [2T, d] copy);
here the backward writes them straight into one [2T, d] buffer.
"""
from __future__ import annotations

import torch


class _GatedMix(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out, g):
        T = out.shape[0] // 2
        clean, noisy = out[:T], out[T:]
        ctx.save_for_backward(out, g)
        return torch.lerp(noisy, clean, g)  # noisy + g * (clean - noisy)

    @staticmethod
    def backward(ctx, grad):
        out, g = ctx.saved_tensors
        T = out.shape[0] // 2
        grad_out = torch.empty_like(out)
        torch.mul(grad, g, out=grad_out[:T])
        torch.sub(grad, grad_out[:T], out=grad_out[T:])  # grad * (1 - g)
        grad_g = None
        if ctx.needs_input_grad[1]:
            grad_g = (grad * (out[:T] - out[T:])).sum(dim=-1, keepdim=True)
        return grad_out, grad_g


def gated_mix(out: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``g * out[:T] + (1 - g) * out[T:]`` for ``out`` [2T, d] and ``g`` [T, 1] (same dtype)."""
    return _GatedMix.apply(out, g)
