"""The S2MoE uncertainty loss's gradient, attached to the layer output.

A DeepSpeed / Megatron-DeepSpeed client adds ``coeff * l_aux`` (or nothing) to its loss, and under
activation checkpointing only what the checkpointed function returns carries a gradient. So the
layer does not wait for the client to add ``beta * L_u``: in training it passes its output through
``AttachAuxGrad`` (the idea of Megatron-core's ``MoEAuxLossAutoScaler``), an autograd function that
returns the output unchanged and, in backward, adds ``beta * scale`` as the gradient of ``L_u``.
The uncertainty gradient therefore flows whenever the output's gradient does: plain training,
``deepspeed.checkpointing.checkpoint``, ``torch.utils.checkpoint`` and Megatron's recompute (the
recomputed forward attaches it again), whatever the client does with ``l_aux``.

Scaling is explicit and never the client's ``moe_loss_coeff``: the gradient of ``L_u`` is
``uncertainty_coef * scale``, where ``scale`` is

- inside ``scale_like(loss)`` (which ``deepspeed.initialize`` wraps around ``engine.backward`` of
  every engine holding S2MoE layers): the gradient that reaches ``loss`` itself, i.e. whatever the
  engine multiplies the loss by before back-propagating (1 / gradient_accumulation_steps, the fp16
  loss scale), so ``beta * L_u`` is scaled exactly like the loss it is part of;
- otherwise the value of ``set_aux_grad_scale`` (default 1.0): a hand-written loop that divides
  its loss by N micro-batches sets ``set_aux_grad_scale(1 / N)``.

Double counting is impossible: while the gradient is attached, ``layer.uncertainty_loss`` (and so
``layer.aux_loss()`` and ``s2moe_aux_loss(model)``) hold the value of ``L_u`` detached, for logging;
adding them to the loss adds the balance gradient only. ``layer.attach_uncertainty_grad = False``
(the Megatron-core adapter does this; it attaches the aux loss through Megatron's own scaler)
restores a live ``uncertainty_loss`` for a caller that adds it itself.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Optional, Union

import torch

_explicit_scale: float = 1.0
_loss_grad: Optional[torch.Tensor] = None  # set by scale_like()'s hook during a backward


def set_aux_grad_scale(scale: float) -> None:
    """Scale of the attached uncertainty gradient outside ``scale_like`` (default 1.0)."""
    global _explicit_scale
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"set_aux_grad_scale(scale={scale!r}) is invalid: must be a number > 0, e.g. "
                         "1 / gradient_accumulation_steps")
    _explicit_scale = float(scale)


def current_scale() -> Union[float, torch.Tensor]:
    return _loss_grad if _loss_grad is not None else _explicit_scale


@contextmanager
def scale_like(loss: torch.Tensor):
    """Around ``loss``'s backward: scale the attached gradients by the gradient that reaches ``loss``.

    The hook on ``loss`` fires first in its backward (``loss`` is the root, or next to it), before
    any layer's ``AttachAuxGrad`` node runs. Nests; restores the previous scale on exit."""
    global _loss_grad
    prev = _loss_grad
    handle = None
    if isinstance(loss, torch.Tensor) and loss.requires_grad:
        def record(grad):
            global _loss_grad
            _loss_grad = grad.detach()

        handle = loss.register_hook(record)
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()
        _loss_grad = prev


class AttachAuxGrad(torch.autograd.Function):
    """``output`` unchanged; backward adds ``coef * current_scale()`` as the gradient of ``aux_loss``."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, aux_loss: torch.Tensor, coef: float):
        ctx.save_for_backward(aux_loss)
        ctx.coef = coef
        return output

    @staticmethod
    def backward(ctx, grad_output):
        (aux_loss,) = ctx.saved_tensors
        scale = current_scale()
        if isinstance(scale, torch.Tensor):
            scale = scale.to(device=aux_loss.device, dtype=aux_loss.dtype)
        return grad_output, torch.full_like(aux_loss, ctx.coef) * scale, None


def attach_aux_grad(output: torch.Tensor, aux_loss: torch.Tensor, coef: float) -> torch.Tensor:
    """``output`` carrying ``coef * aux_loss``'s gradient (see the module docstring)."""
    return AttachAuxGrad.apply(output, aux_loss, float(coef))
