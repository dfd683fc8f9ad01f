"""noise_draws=1 (x_hat = x + sqrt((a sigma x)^2 + (b sigma)^2) * eps) against the paper's two-draw
form x_hat = n1 x + n2: the same distribution of x_hat (moments, Kolmogorov-Smirnov), its own
reparametrised gradient, and the config switch."""
import math

import pytest
import torch

from s2moe_dist.config import S2MoEConfig
from s2moe_dist.moe.noise import GaussianNoise


def ks_statistic_vs_normal(z: torch.Tensor) -> float:
    """One-sample Kolmogorov-Smirnov statistic of ``z`` against N(0, 1): sup |F_n - Phi|."""
    z = z.double().flatten().sort().values
    n = z.numel()
    cdf = torch.special.ndtr(z)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return float(torch.maximum(i / n - cdf, cdf - (i - 1) / n).max())


def ks_two_sample(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample KS statistic sup |F_a - F_b|, evaluated at every sample point."""
    a, b = a.double().flatten().sort().values, b.double().flatten().sort().values
    grid = torch.cat([a, b])
    fa = torch.searchsorted(a, grid, right=True).double() / a.numel()
    fb = torch.searchsorted(b, grid, right=True).double() / b.numel()
    return float((fa - fb).abs().max())


def tokens_with_known_statistics(T=512, d=64, seed=0):
    """Rows with a spread of means, scales and element values (x itself enters the variance)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, d, generator=g) * torch.linspace(0.2, 3.0, T)[:, None] + torch.linspace(-1, 1, T)[:, None]


def standardised_residual(x, x_hat, a, b, add_mean):
    """(x_hat - E[x_hat]) / std(x_hat) per element, with sigma, mu the per-token statistics: N(0, 1)
    for the right distribution, whatever the form."""
    mu = x.mean(-1, keepdim=True)
    sigma = x.std(-1, keepdim=True, correction=0)
    mean = x + (mu if add_mean else 0.0)
    std = sigma * torch.sqrt((a * x) ** 2 + b ** 2)
    return (x_hat - mean) / std


@pytest.mark.parametrize("a,b,add_mean", [(1.0, 1.0, False), (0.5, 2.0, False), (0.3, 0.2, True)])
def test_one_draw_has_the_two_draw_distribution(a, b, add_mean):
    x = tokens_with_known_statistics()
    n = x.numel()  # 32768 draws per form
    z = {}
    for draws in (1, 2):
        noise = GaussianNoise(a, b, add_mean, draws=draws)
        x_hat = noise(x, generator=torch.Generator().manual_seed(10 + draws))
        z[draws] = standardised_residual(x, x_hat, a, b, add_mean)
    for draws, r in z.items():  # both forms: zero mean, unit variance, Gaussian tails, N(0,1) by KS
        assert abs(float(r.mean())) < 5 / math.sqrt(n), draws
        assert float(r.var()) == pytest.approx(1.0, abs=0.04), draws
        assert float((r ** 4).mean()) == pytest.approx(3.0, abs=0.15), draws
        assert ks_statistic_vs_normal(r) < 1.95 / math.sqrt(n), draws  # alpha = 0.001
    assert ks_two_sample(z[1], z[2]) < 1.95 * math.sqrt(2 / n)


def test_the_ks_statistics_reject_a_wrong_distribution():
    """The checks above can fail: the two-draw form with the wrong variance (b doubled) is rejected."""
    x = tokens_with_known_statistics()
    x_hat = GaussianNoise(1.0, 2.0)(x, generator=torch.Generator().manual_seed(3))
    wrong = standardised_residual(x, x_hat, 1.0, 1.0, False)
    right = standardised_residual(x, GaussianNoise(1.0, 1.0, draws=1)(x, generator=torch.Generator().manual_seed(4)),
                                  1.0, 1.0, False)
    assert ks_statistic_vs_normal(wrong) > 1.95 / math.sqrt(x.numel())
    assert ks_two_sample(wrong, right) > 1.95 * math.sqrt(2 / x.numel())


@pytest.mark.parametrize("stacked", [False, True])
def test_one_draw_gradient_is_the_reparametrised_derivative(stacked):
    """d x_hat / d x of the one-draw form: autograd through x + sqrt((a s x)^2 + (b s)^2) * eps with the
    same eps and the per-token statistics detached."""
    a, b = 0.7, 0.4
    torch.manual_seed(0)
    x0 = torch.randn(6, 10) + 0.2
    x0[2, 3] = 0.0
    noise = GaussianNoise(a, b, draws=1)
    gen_seed = 5
    x = x0.clone().requires_grad_(True)
    out = noise(x, generator=torch.Generator().manual_seed(gen_seed), stacked=stacked)
    w = torch.randn_like(out)
    (dx,) = torch.autograd.grad((out * w).sum(), x)

    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(gen_seed))  # the module's one draw
    xr = x0.clone().requires_grad_(True)
    sigma = xr.detach().std(-1, keepdim=True, correction=0)
    x_hat = xr + torch.sqrt((a * sigma * xr) ** 2 + (b * sigma) ** 2) * eps
    ref = torch.cat([xr, x_hat]) if stacked else x_hat
    torch.testing.assert_close(out.detach(), ref.detach(), rtol=1e-5, atol=1e-6)
    (dx_ref,) = torch.autograd.grad((ref * w).sum(), xr)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-6)


def test_one_draw_constant_rows_give_no_noise_and_finite_gradients():
    """sigma = 0 (a constant row, e.g. padding): x_hat = x, slope 0, no 0/0."""
    x = torch.zeros(4, 8, requires_grad=True)
    out = GaussianNoise(1.0, 1.0, draws=1)(x, stacked=True)
    out.sum().backward()
    assert torch.equal(out.detach(), torch.zeros(8, 8)) and torch.equal(x.grad, torch.full((4, 8), 2.0))


def test_noise_draws_reaches_the_layer_and_bad_values_are_refused():
    from s2moe_dist.moe.layer import S2MoELayer
    layer = S2MoELayer(8, num_experts=4, k=1, ffn_hidden_size=8, noise_draws=1)
    assert layer.noise.draws == 1 and S2MoEConfig(hidden_size=8, num_experts=4).noise_draws == 2
    y, _, _ = layer(torch.randn(20, 8))
    assert torch.isfinite(y).all() and float(layer.uncertainty_loss) > 0
    for bad in (0, 3, True, 1.5):
        with pytest.raises(ValueError, match=r"noise_draws=.*must be 1 or 2"):
            S2MoEConfig(hidden_size=8, num_experts=4, noise_draws=bad)
