"""The Gaussian noise module's distribution, the balance and InfoNCE losses against their
formulas, and InfoNCE's bounded memory on 100k tokens."""
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from s2moe_dist import S2MoELayer as S2MoE  # the pure PyTorch layer
from s2moe_dist.moe.losses import balance_loss, infonce_loss, infonce_loss_stacked, sample_token_rows
from s2moe_dist.moe.noise import GaussianNoise
from reference import ref_balance, ref_infonce


# ---- noise moments --------------------------------------------------------------------------
def draw_n1_n2(noise, mu, sigma, d, seed):
    """Recover the per-element n1, n2 of x_hat = n1*x + n2 for tokens with known statistics.

    Token t is mu_t + sigma_t * s_t with s_t a +-1 pattern of zero mean: its mean is mu_t and its
    (population) std sigma_t. x_plus = mu + sigma*s and x_minus = mu - sigma*s have the same mean
    and std, hence the same n1, n2 for the same random draws (same generator seed), so
    x_hat(x_plus) - x_hat(x_minus) = 2 n1 sigma s  gives n1, and then n2 = x_hat(x_plus) - n1 x_plus.
    """
    T = mu.shape[0]
    s = torch.ones(T, d)
    s[:, d // 2:] = -1
    s = s[:, torch.randperm(d, generator=torch.Generator().manual_seed(seed + 1))]
    x_plus = mu[:, None] + sigma[:, None] * s
    x_minus = mu[:, None] - sigma[:, None] * s
    h_plus = noise(x_plus, generator=torch.Generator().manual_seed(seed))
    h_minus = noise(x_minus, generator=torch.Generator().manual_seed(seed))
    n1 = (h_plus - h_minus) / (2 * sigma[:, None] * s)
    n2 = h_plus - n1 * x_plus
    return n1, n2


@pytest.mark.parametrize("a,b,add_mean", [(1.0, 1.0, False), (0.5, 2.0, False), (0.3, 0.2, True)])
def test_noise_moments_match_the_configured_gaussians(a, b, add_mean):
    """n1 ~ N(1, (a sigma)^2), n2 ~ N(mu or 0, (b sigma)^2), per element, independent."""
    d, per_group = 64, 1024
    sigmas, mus = [0.25, 1.0, 3.0], [-2.0, 0.0, 1.5]
    sigma = torch.tensor(sigmas).repeat_interleave(per_group)
    mu = torch.tensor(mus).repeat_interleave(per_group)
    n1, n2 = draw_n1_n2(GaussianNoise(a, b, add_mean), mu, sigma, d, seed=0)
    n = per_group * d  # 65536 draws per group: std errors ~0.4% of the std
    for g, (sg, m) in enumerate(zip(sigmas, mus)):
        r1, r2 = n1[g * per_group:(g + 1) * per_group], n2[g * per_group:(g + 1) * per_group]
        mean2 = m if add_mean else 0.0
        assert abs(r1.mean() - 1.0) < 5 * a * sg / math.sqrt(n)
        assert abs(r2.mean() - mean2) < 5 * b * sg / math.sqrt(n)
        assert r1.std() == pytest.approx(a * sg, rel=0.03)
        assert r2.std() == pytest.approx(b * sg, rel=0.03)
        # Gaussian shape: 68.27% within one std, kurtosis 3
        z1 = (r1 - 1.0) / (a * sg)
        assert (z1.abs() < 1).float().mean() == pytest.approx(0.6827, abs=0.01)
        assert (z1 ** 4).mean() == pytest.approx(3.0, abs=0.1)
        # drawn per element, n1 independent of n2
        z2 = (r2 - mean2) / (b * sg)
        assert abs((z1 * z2).mean()) < 0.02
        assert abs((z1[:, 1:] * z1[:, :-1]).mean()) < 0.02


def test_noise_is_unbiased_and_zero_scales_are_identity():
    x = torch.randn(4096, 32) * 2 + 0.5
    x_hat = GaussianNoise(1.0, 1.0)(x, generator=torch.Generator().manual_seed(3))
    # E[x_hat] = x: the residual x_hat - x has mean 0 (relative to its spread)
    resid = x_hat - x
    assert abs(resid.mean()) < 5 * resid.std() / math.sqrt(resid.numel())
    assert GaussianNoise(0.0, 0.0)(x) is x


def test_noise_draws_follow_the_generator():
    x = torch.randn(8, 16)
    noise = GaussianNoise(1.0, 1.0)
    a = noise(x, generator=torch.Generator().manual_seed(5))
    b = noise(x, generator=torch.Generator().manual_seed(5))
    c = noise(x, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.allclose(a, c)


# ---- balance loss ---------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 3])
def test_balance_loss_equals_switch_formula(k):
    T, E = 37, 6
    probs = torch.softmax(torch.randn(T, E), -1).requires_grad_(True)
    idx = torch.topk(probs, k, -1).indices
    got = balance_loss(probs, idx, E)
    want = ref_balance(probs, idx, E)
    torch.testing.assert_close(got, want)
    # gradient only through P_e (f_e is a count): d/d p_te = E * f_e / T
    (grad,) = torch.autograd.grad(got, probs)
    f = torch.tensor([float((idx == e).sum()) / (T * k) for e in range(E)])
    torch.testing.assert_close(grad, (E * f / T).expand(T, E))


def test_balance_loss_is_one_when_perfectly_balanced():
    E = 4
    probs = torch.full((8, E), 1.0 / E)
    idx = torch.arange(8).remainder(E).unsqueeze(1)
    assert float(balance_loss(probs, idx, E)) == pytest.approx(1.0)


def test_layer_l_aux_is_mean_of_the_two_streams():
    from reference import capture_noise, make_layer, ref_smoe
    layer = make_layer(hidden_size=8, num_experts=4, k=2, ffn_hidden_size=8)
    seen = capture_noise(layer)
    x = torch.randn(30, 8)
    with torch.no_grad():
        _, l_aux, _ = layer(x)
        _, pc, tc, _ = ref_smoe(x, layer, 2)
        _, pn, tn, _ = ref_smoe(seen[-1], layer, 2)
    torch.testing.assert_close(l_aux, 0.5 * (ref_balance(pc, tc, 4) + ref_balance(pn, tn, 4)))
    layer.eval()
    with torch.no_grad():
        _, l_aux, _ = layer(x)
    torch.testing.assert_close(l_aux, ref_balance(pc, tc, 4))  # eval clean: the one stream


# ---- InfoNCE --------------------------------------------------------------------------------
@pytest.mark.parametrize("tau", [0.1, 1.0])
def test_infonce_equals_formula(tau):
    z = torch.randn(9, 5, requires_grad=True)
    z_hat = (z.detach() + 0.3 * torch.randn(9, 5)).requires_grad_(True)
    got = infonce_loss(z, z_hat, tau, max_tokens=1024)
    want = ref_infonce(z, z_hat, tau)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    g1 = torch.autograd.grad(got, (z, z_hat))
    g2 = torch.autograd.grad(want, (z, z_hat))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("T,max_tokens", [(40, 1024), (300, 64)])  # all tokens / a sample
def test_infonce_on_the_stacked_streams_equals_infonce_on_the_two_views(T, max_tokens):
    """The layer's one-gather form: same loss and same gradients as infonce_loss(z, z_hat) when the
    sampler draws the same rows."""
    z, z_hat = torch.randn(T, 16, requires_grad=True), torch.randn(T, 16, requires_grad=True)
    ref = infonce_loss(z, z_hat, 0.2, max_tokens, generator=torch.Generator().manual_seed(5))
    gz, gzh = torch.autograd.grad(ref, [z, z_hat])
    stacked = torch.cat([z, z_hat]).detach().requires_grad_(True)
    got = infonce_loss_stacked(stacked, 0.2, max_tokens, generator=torch.Generator().manual_seed(5))
    (gs,) = torch.autograd.grad(got, [stacked])
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    torch.testing.assert_close(gs, torch.cat([gz, gzh]), rtol=1e-6, atol=1e-7)
    if max_tokens < T:
        assert int((gs[:T].abs().sum(1) > 0).sum()) == max_tokens  # only the sampled rows get gradient


def test_infonce_identical_views_far_apart_is_near_zero_and_scale_free():
    z = torch.eye(6) * 3.0
    assert float(infonce_loss(z, 5 * z, 0.05)) < 1e-6  # cosine: scale does not matter
    assert float(infonce_loss(z, z.roll(1, 0), 0.05)) > 10  # positives are the wrong tokens


def test_infonce_sample_is_distinct_tokens_of_the_bounded_size():
    rows = sample_token_rows(1000, 64, "cpu", torch.Generator().manual_seed(0))
    assert rows.numel() == 64 and rows.unique().numel() == 64 and 0 <= int(rows.min()) and int(rows.max()) < 1000
    assert sample_token_rows(64, 64, "cpu") is None  # all tokens fit: no sampling


class LargestTensor(TorchDispatchMode):
    """Largest tensor (in elements) that any ATen op creates, forward and backward.

    Why this and not a memory profiler: tracemalloc does not see PyTorch's C++ allocator, and
    torch.profiler's CPU memory figures depend on the allocator and on when tensors are freed.
    Every tensor InfoNCE could build, the [N, N] logits included, is the output of some ATen op,
    so the dispatch mode sees its shape whatever the allocator does."""

    def __init__(self):
        super().__init__()
        self.largest, self.shapes = 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
                self.shapes.add(tuple(t.shape))
        return out


def test_infonce_on_100k_tokens_never_builds_a_token_by_token_matrix():
    T, d, m = 100_000, 16, 512
    z = torch.randn(T, d, requires_grad=True)
    z_hat = z.detach() + 0.1 * torch.randn(T, d)
    with LargestTensor() as mode:
        loss = infonce_loss(z, z_hat, 0.1, max_tokens=m)
        loss.backward()
    assert (m, m) in mode.shapes          # the mode does see the (sampled) logits matrix
    assert mode.largest <= max(T * d, m * m)  # nothing bigger than the inputs or m x m; T x T = 1e10
    assert torch.isfinite(loss) and z.grad.abs().sum() > 0


@pytest.mark.parametrize("uncertainty_on", ["input", "output"])
def test_layer_with_100k_tokens_keeps_infonce_bounded(uncertainty_on):
    T, m = 100_000, 256
    torch.manual_seed(0)
    layer = S2MoE(8, num_experts=4, k=1, ffn_hidden_size=8, infonce_max_tokens=m, uncertainty_on=uncertainty_on)
    x = torch.randn(T, 8)
    with torch.no_grad(), LargestTensor() as mode:
        layer(x)
    assert (m, m) in mode.shapes and (T, T) not in mode.shapes
    assert mode.largest <= 2 * T * 8  # the two token streams side by side are the largest tensor
    assert torch.isfinite(layer.uncertainty_loss) and float(layer.uncertainty_loss) > 0


def test_layer_uncertainty_loss_is_zero_in_eval():
    torch.manual_seed(0)
    layer = S2MoE(8, num_experts=4, k=2, ffn_hidden_size=8)
    layer(torch.randn(10, 8))
    assert float(layer.uncertainty_loss) > 0
    layer.eval()
    layer(torch.randn(10, 8))
    assert layer.uncertainty_loss.shape == () and float(layer.uncertainty_loss) == 0.0
