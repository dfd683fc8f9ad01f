"""The fused InfoNCE (one autograd function, hand-written backward) against the autograd
implementation it replaced (kept here as the reference), and the layer's sampled path (the noise
module gathers the sample and adds its gradient) against the unfused path."""
import pytest
import torch
import torch.nn.functional as F

from s2moe_dist.moe.infonce import infonce_loss, infonce_loss_stacked, infonce_pair, sample_token_rows
from s2moe_dist.moe.noise import GaussianNoise


def reference_infonce(z, z_hat, temperature):
    """The implementation before the fused function: autograd through normalize, GEMM, cross-entropy."""
    if z.shape[0] < 2:
        return z.sum() * 0.0
    z = F.normalize(z.float(), dim=-1)
    z_hat = F.normalize(z_hat.float(), dim=-1)
    logits = z @ z_hat.t() / temperature
    return F.cross_entropy(logits, torch.arange(z.shape[0]))


def loss_and_grads(fn, z, z_hat, *args):
    z, z_hat = z.detach().clone().requires_grad_(True), z_hat.detach().clone().requires_grad_(True)
    loss = fn(z, z_hat, *args)
    gz, gzh = torch.autograd.grad(loss * 0.7, [z, z_hat])  # upstream gradient != 1
    return loss.detach(), gz, gzh


@pytest.mark.parametrize("S,d,tau", [(2, 3, 0.1), (37, 16, 0.1), (300, 64, 0.05), (64, 8, 1.0)])
def test_fused_infonce_equals_the_autograd_reference(S, d, tau):
    torch.manual_seed(S)
    z = torch.randn(S, d) * 3
    z_hat = z + torch.randn(S, d)
    got = loss_and_grads(lambda a, b, t: infonce_pair(torch.stack([a, b]), t), z, z_hat, tau)
    want = loss_and_grads(reference_infonce, z, z_hat, tau)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(got[1:], want[1:]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_fused_infonce_passes_gradcheck_in_float64():
    torch.manual_seed(0)
    pair = torch.randn(2, 6, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p: infonce_pair(p, 0.3), (pair,))


def test_fused_infonce_on_bf16_views_computes_in_fp32_and_returns_bf16_grads():
    torch.manual_seed(1)
    z = torch.randn(50, 32).bfloat16()
    z_hat = (z.float() + 0.5 * torch.randn(50, 32)).bfloat16()
    got = loss_and_grads(lambda a, b, t: infonce_pair(torch.stack([a, b]), t), z, z_hat, 0.1)
    want = loss_and_grads(reference_infonce, z, z_hat, 0.1)
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == torch.bfloat16
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(got[1:], want[1:]):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-4)  # bf16 rounding of the grads


def test_fused_infonce_zero_rows_are_finite_as_with_f_normalize():
    z, z_hat = torch.randn(8, 4), torch.randn(8, 4)
    z[3] = 0.0
    z_hat[5] = 0.0
    got = loss_and_grads(lambda a, b, t: infonce_pair(torch.stack([a, b]), t), z, z_hat, 0.2)
    want = loss_and_grads(reference_infonce, z, z_hat, 0.2)
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_fewer_than_two_tokens_is_a_zero_loss_with_zero_gradient():
    pair = torch.randn(2, 1, 4, requires_grad=True)
    loss = infonce_pair(pair, 0.1)
    loss.backward()
    assert float(loss) == 0.0 and torch.equal(pair.grad, torch.zeros_like(pair))


@pytest.mark.parametrize("T,max_tokens", [(40, 1024), (300, 64)])
def test_infonce_loss_and_stacked_match_the_reference_on_the_same_sample(T, max_tokens):
    torch.manual_seed(2)
    z, z_hat = torch.randn(T, 16), torch.randn(T, 16)
    rows = sample_token_rows(T, max_tokens, "cpu", torch.Generator().manual_seed(5))
    zr, zhr = (z, z_hat) if rows is None else (z[rows], z_hat[rows])
    want = reference_infonce(zr, zhr, 0.2)
    got = infonce_loss(z, z_hat, 0.2, max_tokens, generator=torch.Generator().manual_seed(5))
    stacked = infonce_loss_stacked(torch.cat([z, z_hat]), 0.2, max_tokens, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stacked, got, rtol=0, atol=0)


@pytest.mark.parametrize("draws", [1, 2])
def test_noise_module_sample_equals_the_unfused_path_with_gradients(draws):
    """noise(x, stacked=True, sample_tokens=m) + infonce_pair(sampled_pair) is the same loss and the
    same dx as noise(x, stacked=True) + infonce_loss_stacked(streams) with the same random numbers."""
    T, d, m = 200, 16, 48
    x0 = torch.randn(T, d) * 2 + 0.3
    w = torch.randn(2 * T, d)  # a stand-in for the dispatcher's use of the streams
    noise = GaussianNoise(0.8, 0.6, draws=draws)

    def run(fused):
        x = x0.clone().requires_grad_(True)
        gen = torch.Generator().manual_seed(11)
        if fused:
            streams = noise(x, generator=gen, stacked=True, sample_tokens=m)
            assert noise.sampled_pair is not None and noise.sampled_pair.shape == (2, m, d)
            loss_u = infonce_pair(noise.sampled_pair, 0.1)
        else:
            streams = noise(x, generator=gen, stacked=True)
            loss_u = infonce_loss_stacked(streams, 0.1, m, generator=gen)
        ((streams * w).sum() + 0.3 * loss_u).backward()
        return streams.detach(), loss_u.detach(), x.grad

    for a, b in zip(run(True), run(False)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    noise(x0, stacked=True, sample_tokens=T)  # all tokens fit: nothing sampled
    assert noise.sampled_pair is None


def test_custom_functions_trace_with_fullgraph():
    """No host sync, no branch on tensor values: torch.compile(fullgraph=True) traces the fused
    InfoNCE, the noise module's stacked (and sampled) streams and the gated mix, forward and backward."""
    from s2moe_dist.moe.mix import gated_mix
    noise = GaussianNoise(1.0, 1.0)

    def step(x, g):
        streams = noise(x, stacked=True, sample_tokens=8)
        loss = infonce_pair(noise.sampled_pair, 0.1) + gated_mix(streams * 2, g).sum()
        return loss

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x = torch.randn(16, 8, requires_grad=True)
    g = torch.rand(16, 1, requires_grad=True)
    loss = compiled(x, g)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all() and torch.isfinite(g.grad).all()


def test_layer_with_a_sampled_infonce_compiles_fullgraph_and_equals_eager():
    """T > infonce_max_tokens: the noise module gathers the sample (set as an attribute in its forward)
    and the fused InfoNCE runs on it, under torch.compile(fullgraph=True) as in eager."""
    from s2moe_dist.moe.layer import S2MoELayer

    def step(module, layer):
        x = torch.randn(24, 16, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
        torch.manual_seed(5)  # the same noise and sample in both runs
        y, _, _ = module(x)
        (y.square().sum() + layer.aux_loss()).backward()
        return [y.detach(), layer.uncertainty_loss.detach(), x.grad] + [p.grad for p in layer.parameters()]

    torch.manual_seed(0)
    layer = S2MoELayer(16, num_experts=8, k=1, ffn_hidden_size=32, infonce_max_tokens=8)
    eager = step(layer, layer)
    layer.zero_grad(set_to_none=True)
    compiled = step(torch.compile(layer, fullgraph=True, backend="aot_eager"), layer)
    assert layer.noise.sampled_pair is not None and layer.noise.sampled_pair.shape == (2, 8, 16)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
