"""Gaussian noise module of S2MoE (docs/design.md 1.1): x_hat = n1 * x + n2, E[x_hat] = x.

``noise(x, stacked=True)`` returns both streams in one ``[2T, d]`` buffer, ``[x; x_hat]``, ready for
ONE dispatch: written in place (no x_hat temporary, no ``torch.cat``), and its backward is one
``addcmul`` (``dx = g[:T] + J * g[T:]``, J = d x_hat / d x elementwise) instead of a split and three
accumulations into x.

n1 ~ N(1, (a*sigma_x)^2), n2 ~ N(0 or mu_x, (b*sigma_x)^2), drawn per element, with sigma_x and
mu_x the per-token statistics over the hidden dimension, detached. Per-token statistics keep the
module local: no cross-token or cross-rank communication. Both draws come from ONE ``randn`` call
([2, T, d]: one kernel, one generator advance).

``draws=1``: x_hat = x + sqrt((a sigma x)^2 + (b sigma)^2) * eps (+ mu_x), eps ~ N(0, 1): per element
the same Gaussian as n1 * x + n2 (its variance is (a sigma x)^2 + (b sigma)^2), with half the random
numbers. Its reparametrised gradient J = 1 + eps (a sigma)^2 x / sqrt(...) differs from the
two-draw form's J = n1 (both are unbiased gradients of the same expected loss).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn


def _noisy(x, n1, n2, out=None):
    """n1 * x + n2, or x + n2 when the multiplicative part is folded into n2 (n1 None)."""
    return torch.add(x, n2, out=out) if n1 is None else torch.addcmul(n2, n1, x, out=out)


class _StackedStreams(torch.autograd.Function):
    """[x; n1 * x + n2] with d/dx = [1; jac] (jac None: n1, two draws; the one-draw slope otherwise;
    the same tensor is never passed twice, which torch.compile cannot trace)."""

    @staticmethod
    def forward(ctx, x, n1, n2, jac):
        T = x.shape[0]
        out = x.new_empty((2 * T,) + tuple(x.shape[1:]))
        out[:T].copy_(x)
        _noisy(x, n1, n2, out=out[T:])
        ctx.save_for_backward(n1 if jac is None else jac)
        return out

    @staticmethod
    def backward(ctx, g):
        (jac,) = ctx.saved_tensors
        T = jac.shape[0]
        return torch.addcmul(g[:T], g[T:], jac), None, None, None


class _StackedStreamsSampled(torch.autograd.Function):
    """``_StackedStreams`` that also returns the rows ``rows`` of both streams, [2, S, d] (the InfoNCE
    sample). Their gradient is index-added into the streams' gradient here, instead of autograd
    zero-filling a [2T, d] gradient for the gather and adding it to the dispatcher's."""

    @staticmethod
    def forward(ctx, x, n1, n2, jac, rows):
        T = x.shape[0]
        out = x.new_empty((2 * T,) + tuple(x.shape[1:]))
        out[:T].copy_(x)
        _noisy(x, n1, n2, out=out[T:])
        pair = out.view(2, T, -1).index_select(1, rows)
        ctx.save_for_backward(n1 if jac is None else jac, rows)
        return out, pair

    @staticmethod
    def backward(ctx, g, g_pair):
        jac, rows = ctx.saved_tensors
        T = jac.shape[0]
        g = g.reshape(2, T, -1).index_add(1, rows, g_pair.reshape(2, rows.shape[0], -1))
        return torch.addcmul(g[0], g[1], jac).reshape(jac.shape), None, None, None, None


class _OneDrawNoise(torch.autograd.Function):
    """x + n2 with d/dx = jac (the one-draw x_hat, not stacked)."""

    @staticmethod
    def forward(ctx, x, n2, jac):
        ctx.save_for_backward(jac)
        return x + n2

    @staticmethod
    def backward(ctx, g):
        (jac,) = ctx.saved_tensors
        return g * jac, None, None


class GaussianNoise(nn.Module):
    def __init__(self, mult_std: float = 1.0, add_std: float = 1.0, add_mean: bool = False, draws: int = 2):
        super().__init__()
        if draws not in (1, 2):
            raise ValueError(f"GaussianNoise.draws={draws!r} is invalid: must be 1 or 2")
        self.mult_std = float(mult_std)
        self.add_std = float(add_std)
        self.add_mean = bool(add_mean)
        self.draws = int(draws)
        self.sampled_pair: Optional[torch.Tensor] = None

    @property
    def is_identity(self) -> bool:
        return self.mult_std == 0.0 and self.add_std == 0.0 and not self.add_mean

    def sample(self, x: torch.Tensor, generator: Optional[torch.Generator] = None):
        """``(n1, n2, jac)`` for ``x`` ([..., d]) in x's dtype, without gradient: x_hat = n1 * x + n2
        and d x_hat / d x = jac (elementwise). Two draws: jac is ``None`` (it is n1). One draw: n1
        is ``None`` (x_hat = x + n2, the multiplicative part folded into n2)."""
        with torch.no_grad():  # statistics are constants: no gradient flows through them
            xf = x.float()
            mu = xf.mean(dim=-1, keepdim=True)
            # sigma = population std = norm of the centred row / sqrt(d): vectorised, ~5x faster than
            # Tensor.std on CPU
            centred_norm = torch.linalg.vector_norm(xf - mu, dim=-1, keepdim=True)
            if self.draws == 2:
                n1, n2 = self._two_draws(xf, centred_norm, generator)
            else:
                n1, (n2, jac) = None, self._one_draw(xf, centred_norm.div_(math.sqrt(x.shape[-1])), generator)
            if self.add_mean:
                n2.add_(mu)
            n2 = n2.to(x.dtype)  # no-ops in fp32
            if n1 is not None:
                n1, jac = n1.to(x.dtype), None
            else:
                jac = jac.to(x.dtype)
        return n1, n2, jac

    def _two_draws(self, xf, centred_norm, generator):
        """n1 = 1 + a sigma eps1, n2 = b sigma eps2, sigma = centred_norm / sqrt(d): both draws in one
        [2, T, d] buffer, drawn with std 1/sqrt(d) (a and b too where a == b) and scaled by the norm in
        one pass."""
        eps = torch.empty((2,) + tuple(xf.shape), device=xf.device, dtype=torch.float32)
        std = 1.0 / math.sqrt(xf.shape[-1])
        if self.mult_std == self.add_std:
            eps.normal_(0.0, self.mult_std * std, generator=generator)
        else:
            eps[0].normal_(0.0, self.mult_std * std, generator=generator)
            eps[1].normal_(0.0, self.add_std * std, generator=generator)
        eps.mul_(centred_norm)
        # n1 out of place: the backward keeps n1 alone, not the [2, T, d] buffer n2 lives in
        return eps[0] + 1.0, eps[1]

    def _one_draw(self, xf, sigma, generator):
        eps = torch.randn(xf.shape, generator=generator, device=xf.device, dtype=torch.float32)
        var_mult = (sigma * self.mult_std).square_()  # (a sigma)^2 and (b sigma)^2: [T, 1]
        var_add = var_mult if self.add_std == self.mult_std else (sigma * self.add_std).square_()
        slope = xf * var_mult
        var = torch.addcmul(var_add, slope, xf)  # (a sigma x)^2 + (b sigma)^2, the variance of x_hat
        n2 = eps.mul_(var.sqrt())
        # d n2 / d x = eps (a sigma)^2 x / sqrt(var) = n2 * (a sigma)^2 x / var; var = 0 only where
        # (a sigma)^2 x = 0 too (sigma = 0, or b = 0 and x = 0): slope 0 there, not NaN
        jac = slope.mul_(n2).div_(var.clamp_min_(torch.finfo(torch.float32).tiny)).add_(1.0)
        return n2, jac

    def forward(self, x: torch.Tensor, generator: Optional[torch.Generator] = None,
                stacked: bool = False, sample_tokens: Optional[int] = None) -> torch.Tensor:
        """x_hat, or with ``stacked`` (x of shape [T, d]) the [2T, d] buffer [x; x_hat].

        ``sample_tokens`` (with ``stacked``): also gather a random sample of at most that many
        tokens' rows of both streams (InfoNCE's, drawn after the noise) into ``self.sampled_pair``
        ([2, S, d]; None when all tokens fit, then the caller uses the streams themselves)."""
        self.sampled_pair = None
        if self.is_identity:
            return torch.cat([x, x], dim=0) if stacked else x
        n1, n2, jac = self.sample(x, generator)
        if stacked and sample_tokens is not None and x.shape[0] > sample_tokens:
            from .infonce import sample_token_rows
            rows = sample_token_rows(x.shape[0], sample_tokens, x.device, generator)
            out, self.sampled_pair = _StackedStreamsSampled.apply(x, n1, n2, jac, rows)
            return out
        if stacked:
            return _StackedStreams.apply(x, n1, n2, jac)
        return torch.addcmul(n2, n1, x) if n1 is not None else _OneDrawNoise.apply(x, n2, jac)
