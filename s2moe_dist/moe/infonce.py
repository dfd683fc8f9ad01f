"""Sampled InfoNCE between the clean and noisy views of the same tokens (docs/design.md 1.6).

Rows of z / z_hat are L2-normalised; logits = z z_hat^T / tau; cross-entropy with the diagonal
(same token) as target, averaged over the S sampled tokens. A random sample of at most
``max_tokens`` tokens bounds the logits matrix to max_tokens^2 whatever the number of tokens is.

normalise -> logits -> cross-entropy is ONE autograd function with a hand-written backward
(``_InfoNCE``): 9 aten ops forward and 8 backward instead of ~50 through autograd (each of which
is a kernel launch on a GPU), one [S, S] buffer in the backward instead of four, and no zero-filled
[S, d] slice gradients. The function has no host syncs and no branch on tensor values, so
``torch.compile(fullgraph=True)`` traces it.
"""
from __future__ import annotations

from typing import Optional

import torch

_NORM_EPS = 1e-12  # F.normalize's eps: rows are divided by max(||row||, eps)


def sample_token_rows(num_tokens: int, max_tokens: int, device, generator: Optional[torch.Generator] = None):
    """Indices of at most ``max_tokens`` distinct tokens, or None when all tokens fit."""
    if num_tokens <= max_tokens:
        return None
    return torch.randperm(num_tokens, device=device, generator=generator)[:max_tokens]


class _InfoNCE(torch.autograd.Function):
    """InfoNCE of ``pair`` [2, S, d] (pair[0] = z, pair[1] = z_hat), computed in (at least) fp32.

    u = row / max(||row||, eps) for both views; logits = u0 u1^T / tau (1/tau as the GEMM's alpha,
    not a pass over [S, S]); loss = -mean(diag(log_softmax(logits))).
    Backward, with c = 1 / (S tau): dU0 = c (P - I) u1 and dU1 = c (P - I)^T u0 as two addmm
    (beta = -c subtracts the identity without touching P = softmax), then through the
    normalisation d row = (dU - u (u . dU)) * g / n with n = max(||row||, eps) (rows of norm < eps,
    zero rows in practice, get the projected dU * g / eps, where F.normalize's clamp gives dU * g / eps).
    """

    @staticmethod
    def forward(ctx, pair, temperature: float):
        S = pair.shape[1]
        f = pair.to(torch.float64 if pair.dtype == torch.float64 else torch.float32)
        n = torch.linalg.vector_norm(f, dim=-1, keepdim=True).clamp_min_(_NORM_EPS)
        u = f / n
        zero = u.new_zeros(()).expand(S, S)  # addmm's input, weighted 0 (zeros, not empty: 0 * NaN is NaN)
        logits = torch.addmm(zero, u[0], u[1].t(), beta=0.0, alpha=1.0 / temperature)
        log_p = torch.log_softmax(logits, dim=1)
        ctx.save_for_backward(u, n, log_p)
        ctx.temperature, ctx.in_dtype = temperature, pair.dtype
        return log_p.diagonal().sum().mul_(-1.0 / S)

    @staticmethod
    def backward(ctx, grad):
        u, n, log_p = ctx.saved_tensors
        c = 1.0 / (u.shape[1] * ctx.temperature)
        p = torch.exp(log_p)
        d_u = torch.empty_like(u)
        torch.addmm(u[1], p, u[1], beta=-c, alpha=c, out=d_u[0])  # c (P - I) u1
        torch.addmm(u[0], p.t(), u[0], beta=-c, alpha=c, out=d_u[1])  # c (P - I)^T u0
        along = torch.linalg.vecdot(u, d_u, dim=-1).unsqueeze(-1)  # u . dU per row: [2, S, 1]
        d_f = torch.addcmul(d_u, u, along, value=-1.0)
        d_f.mul_(torch.div(grad, n))  # g / n, an [2, S, 1] column
        return d_f.to(ctx.in_dtype), None


def infonce_pair(pair: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE of the views ``pair[0]`` (z) and ``pair[1]`` (z_hat), ``pair`` of shape [2, S, d]."""
    if pair.shape[1] < 2:
        return pair.sum() * 0.0
    return _InfoNCE.apply(pair, float(temperature))


def infonce_loss(z: torch.Tensor, z_hat: torch.Tensor, temperature: float,
                 max_tokens: int = 1024, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """InfoNCE between clean and noisy views of the same tokens ([T, d] each)."""
    rows = sample_token_rows(z.shape[0], max_tokens, z.device, generator)
    if rows is not None:
        z, z_hat = z.index_select(0, rows), z_hat.index_select(0, rows)
    return infonce_pair(torch.stack([z, z_hat]), temperature)


def infonce_loss_stacked(streams: torch.Tensor, temperature: float, max_tokens: int = 1024,
                         generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``infonce_loss(streams[:T], streams[T:])`` for the layer's [2T, d] stack of clean and noisy
    rows (same sample for the same generator state). Both views' sampled rows are gathered with ONE
    index_select over the [2, T, d] view (backward: one zero-filled [2T, d] gradient and one
    index_add); with all tokens in the sample nothing is gathered or zero-filled."""
    T = streams.shape[0] // 2
    pair = streams.reshape(2, T, streams.shape[-1])
    rows = sample_token_rows(T, max_tokens, streams.device, generator)
    if rows is not None:
        pair = pair.index_select(1, rows)
    return infonce_pair(pair, temperature)


def infonce_accuracy(z: torch.Tensor, z_hat: torch.Tensor, max_tokens: int = 1024) -> float:
    """Fraction of sampled tokens whose nearest noisy view is their own (a health metric)."""
    import torch.nn.functional as F
    with torch.no_grad():
        rows = sample_token_rows(z.shape[0], max_tokens, z.device)
        if rows is not None:
            z, z_hat = z[rows], z_hat[rows]
        if z.shape[0] < 2:
            return 1.0
        sim = F.normalize(z.float(), dim=-1) @ F.normalize(z_hat.float(), dim=-1).t()
        return (sim.argmax(dim=1) == torch.arange(z.shape[0], device=z.device)).float().mean().item()
