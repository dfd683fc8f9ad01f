"""Training-mode gradients of the S2MoE layer: every parameter learns, gradients equal those of
the independent reference (tests/reference.py), and the noise statistics are constants."""
import pytest
import torch
from torch import nn

from s2moe_dist import S2MoELayer as S2MoE, s2moe_aux_loss  # the pure PyTorch layer
from s2moe_dist.moe.noise import GaussianNoise
from reference import ALIGNED, ODD, capture_noise, make_layer, ref_balance, ref_gate, ref_infonce, ref_smoe


@pytest.mark.parametrize("activation,bias,shape", [("relu", False, ODD), ("gelu", True, ALIGNED),
                                                   ("swiglu", True, ALIGNED), ("swiglu", False, ODD)])
def test_every_parameter_gets_a_finite_nonzero_gradient(activation, bias, shape):
    layer = make_layer(hidden_size=shape["d"], num_experts=shape["E"], k=2, ffn_hidden_size=shape["h"],
                       activation=activation, expert_bias=bias)
    x = torch.randn(64, shape["d"], requires_grad=True)
    y, l_aux, _ = layer(x)
    (y.sum() + s2moe_aux_loss(layer)).backward()  # y.sum(): an expanded (stride-0) output gradient
    names = {n for n, _ in layer.named_parameters()}
    expected = {"router.weight", "experts.w1", "experts.w2", "gate.weight", "gate.bias"}
    assert names == expected | ({"experts.b1", "experts.b2"} if bias else set())
    for name, p in layer.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
        if name.startswith("experts."):  # each expert of the bank received tokens and learns
            assert (p.grad.flatten(1).abs().sum(1) > 0).all(), name
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_user_expert_module_parameters_get_gradients():
    torch.manual_seed(0)
    layer = S2MoE(6, nn.Sequential(nn.Linear(6, 10), nn.GELU(), nn.Linear(10, 6)), num_experts=3, k=2,
                  drop_tokens=False, use_rts=False, top2_2nd_expert_sampling=False)
    y, _, _ = layer(torch.randn(40, 6))
    (y.square().mean() + s2moe_aux_loss(layer)).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_router_learns_from_the_task_loss_alone_at_k1():
    """k = 1 uses the raw top-1 probability, so the task loss reaches the router (Switch)."""
    layer = make_layer(hidden_size=8, num_experts=4, k=1, ffn_hidden_size=8)
    y, _, _ = layer(torch.randn(32, 8))
    y.sum().backward()
    assert layer.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("uncertainty_on", ["input", "output"])
@pytest.mark.parametrize("shape", [ODD, ALIGNED], ids=["odd", "aligned"])
def test_parameter_gradients_equal_reference_autograd(uncertainty_on, shape):
    """loss = <y, R> + alpha L_bal + beta L_u: the layer's parameter gradients equal autograd
    through the reference (same routing, x_hat taken from the noise module's output)."""
    T, d, E = 16, shape["d"], shape["E"]
    layer = make_layer(hidden_size=d, num_experts=E, k=2, ffn_hidden_size=shape["h"], activation="swiglu",
                       uncertainty_on=uncertainty_on, balance_coef=0.3, uncertainty_coef=0.7,
                       infonce_temperature=0.5)
    seen = capture_noise(layer)
    x = torch.randn(T, d)
    R = torch.randn(T, d)
    y, l_aux, _ = layer(x)
    loss = (y * R).sum() + s2moe_aux_loss(layer)
    params = list(layer.parameters())
    got = torch.autograd.grad(loss, params)

    x_hat = seen[-1]
    clean, p_c, top_c, _ = ref_smoe(x, layer, 2)
    noisy, p_n, top_n, _ = ref_smoe(x_hat, layer, 2)
    g = ref_gate(layer, x)
    y_ref = g * clean + (1 - g) * noisy
    bal = 0.5 * (ref_balance(p_c, top_c, E) + ref_balance(p_n, top_n, E))
    z, z_hat = (x, x_hat) if uncertainty_on == "input" else (clean, noisy)
    unc = ref_infonce(z, z_hat, 0.5)
    torch.testing.assert_close(l_aux, bal, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.uncertainty_loss, unc, rtol=1e-5, atol=1e-5)
    ref_loss = (y_ref * R).sum() + 0.3 * bal + 0.7 * unc
    want = torch.autograd.grad(ref_loss, params, allow_unused=True)
    for (name, _), a, b in zip(layer.named_parameters(), got, want):
        b = torch.zeros_like(a) if b is None else b
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


# ---- noise statistics are constants --------------------------------------------------------
def _noise_fn(noise, seed):
    """The noise module as a deterministic function of x (same draws on every call)."""
    return lambda x: noise(x, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("add_std,add_mean", [(0.0, False), (0.7, False), (0.7, True)])
def test_noise_jacobian_is_diagonal_n1(add_std, add_mean):
    """x_hat = n1*x + n2 with sigma_x, mu_x detached => d x_hat / d x = diag(n1) exactly.
    Were sigma or mu differentiated, each x_hat element would depend on its whole token: the
    Jacobian would have non-zero off-diagonal entries within a token."""
    T, d = 3, 6
    noise = GaussianNoise(mult_std=0.8, add_std=add_std, add_mean=add_mean)
    f = _noise_fn(noise, seed=7)
    x = torch.randn(T, d, dtype=torch.float32) + 0.5
    J = torch.autograd.functional.jacobian(f, x)  # [T, d, T, d]
    eye = torch.eye(T * d).reshape(T, d, T, d).bool()
    assert (J[~eye] == 0).all()
    diag = J[eye].reshape(T, d)
    # n1, recovered independently of autograd. Without n2: n1 = x_hat / x. With n2 (and mu_x = 0):
    # x and -x share sigma_x, so the same draws give x_hat(x) - x_hat(-x) = 2 n1 x.
    if add_std == 0.0:
        n1 = f(x) / x
    else:
        x = x - x.mean(-1, keepdim=True)  # mu_x = 0 so that -x has the same statistics
        J = torch.autograd.functional.jacobian(f, x)
        diag = J[eye].reshape(T, d)
        n1 = (f(x) - f(-x)) / (2 * x)
    torch.testing.assert_close(diag, n1, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(diag, torch.ones_like(diag))  # the noise is really on


def test_noise_statistics_carry_no_gradient_through_the_layer():
    """Layer level: with the gate forced to 0 (y = SMoE(x_hat)) and routing frozen (router weight
    0: uniform probabilities, fixed top-k), dy/dx matches the reference with x_hat := n1*x + n2
    where n1, n2 are constants."""
    torch.manual_seed(0)
    d = 8
    layer = make_layer(hidden_size=d, num_experts=4, k=1, ffn_hidden_size=8, noise_add_std=0.0, activation="relu")
    with torch.no_grad():
        layer.gate.weight.zero_()
        layer.gate.bias.fill_(-1e4)  # g = 0
        layer.router.weight.zero_()
    layer.attach_uncertainty_grad = False  # dy/dx alone, without the InfoNCE gradient on x
    seen = capture_noise(layer)
    x = torch.randn(6, d, requires_grad=True)
    y, _, _ = layer(x)
    (gx,) = torch.autograd.grad((y * torch.arange(y.numel()).reshape(y.shape)).sum(), x)
    n1 = (seen[-1] / x).detach()  # add_std 0: x_hat = n1 * x
    x2 = x.detach().clone().requires_grad_(True)
    ref, _, _, _ = ref_smoe(n1 * x2, layer, 1)
    (gref,) = torch.autograd.grad((ref * torch.arange(ref.numel()).reshape(ref.shape)).sum(), x2)
    torch.testing.assert_close(gx, gref, rtol=1e-5, atol=1e-6)
