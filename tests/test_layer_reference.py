"""S2MoE layer output against an independent plain-PyTorch top-k MoE (tests/reference.py)."""
import math

import pytest
import torch
from torch import nn

from reference import (ALIGNED, ODD, capture_noise, make_layer, ref_act, ref_bank_expert, ref_gate, ref_routing,
                       ref_smoe)
from s2moe_dist import S2MoE, S2MoELayer


# ---- the tests ------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [ODD, ALIGNED], ids=["odd", "aligned"])
@pytest.mark.parametrize("activation", ["relu", "gelu", "swiglu"])
@pytest.mark.parametrize("k", [1, 2])
def test_eval_and_noise_free_training_equal_reference(shape, activation, k):
    # k=2 swiglu: the public S2MoE class too (DeepSpeed's subclass when DeepSpeed is installed)
    cls = S2MoE if (k, activation) == (2, "swiglu") else S2MoELayer
    layer = make_layer(cls=cls, hidden_size=shape["d"], num_experts=shape["E"], k=k, ffn_hidden_size=shape["h"],
                       activation=activation)
    x = torch.randn(shape["T"], shape["d"])
    with torch.no_grad():
        ref, _, _, _ = ref_smoe(x, layer, k)
        layer.eval()
        y, _, counts = layer(x)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
        assert int(counts.sum()) == shape["T"] * k  # one stream, dropless
        # training with both noise scales 0: y = g*SMoE(x) + (1-g)*SMoE(x) = SMoE(x)
        layer.train()
        layer.noise.mult_std = layer.noise.add_std = 0.0
        y_train, _, counts = layer(x)
        torch.testing.assert_close(y_train, ref, rtol=1e-5, atol=1e-5)
        assert int(counts.sum()) == 2 * shape["T"] * k  # both streams dispatched


def test_noise_free_training_via_config_equals_reference():
    layer = make_layer(hidden_size=8, num_experts=4, k=2, ffn_hidden_size=8, noise_mult_std=0.0, noise_add_std=0.0)
    x = torch.randn(3, 5, 8)  # leading shape is flattened and restored
    with torch.no_grad():
        y, _, _ = layer(x)
        ref, _, _, _ = ref_smoe(x.reshape(-1, 8), layer, 2)
    assert y.shape == x.shape
    torch.testing.assert_close(y.reshape(-1, 8), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [ODD, ALIGNED], ids=["odd", "aligned"])
@pytest.mark.parametrize("noisy_routing", ["own", "shared"])
def test_training_with_noise_equals_gated_two_stream_reference(shape, noisy_routing):
    """y = g(x) SMoE(x) + (1 - g(x)) SMoE(x_hat), x_hat taken from the noise module's output;
    with noisy_routing="shared" the noisy stream reuses the clean stream's experts and weights."""
    layer = make_layer(hidden_size=shape["d"], num_experts=shape["E"], k=2, ffn_hidden_size=shape["h"],
                       activation="swiglu", noisy_routing=noisy_routing, expert_bias=True)
    with torch.no_grad():
        layer.experts.b1.normal_()
        layer.experts.b2.normal_()
    seen = capture_noise(layer)
    x = torch.randn(shape["T"], shape["d"])
    with torch.no_grad():
        y, _, _ = layer(x)
        x_hat = seen[-1]
        assert not torch.allclose(x_hat, x)
        clean, _, top, _ = ref_smoe(x, layer, 2)
        if noisy_routing == "own":
            noisy, _, _, _ = ref_smoe(x_hat, layer, 2)
        else:
            routes, _, _, _ = ref_routing(x, layer.router.weight, 2, True)
            expert = ref_bank_expert(layer)
            noisy = torch.stack([sum(w * expert(e, x_hat[t]) for e, w in r) for t, r in enumerate(routes)])
        g = ref_gate(layer, x)
        torch.testing.assert_close(y, g * clean + (1 - g) * noisy, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k,eval_k", [(2, 1), (2, 3), (1, 2)])
def test_eval_k_differs_from_k(k, eval_k):
    """eval_k experts at inference; weights renormalised iff the layer was trained with k >= 2."""
    layer = make_layer(hidden_size=8, num_experts=4, k=k, eval_k=eval_k, ffn_hidden_size=8, activation="gelu").eval()
    x = torch.randn(19, 8)
    with torch.no_grad():
        y, _, counts = layer(x)
        ref, probs, _, _ = ref_smoe(x, layer, eval_k)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert int(counts.sum()) == 19 * eval_k
    if k == 1:  # raw probabilities: not the renormalised mixture
        with torch.no_grad():
            s = torch.topk(probs, eval_k, dim=-1).values.sum(-1)
        assert (s < 0.999).all()


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("shape", [ODD, ALIGNED], ids=["odd", "aligned"])
def test_capacity_mode_matches_deepspeed_drop_priority(k, shape):
    T, E = shape["T"], shape["E"]
    cf, min_cap = 0.6, 1
    layer = make_layer(hidden_size=shape["d"], num_experts=E, k=k, ffn_hidden_size=shape["h"], activation="relu",
                       drop_tokens=True, capacity_factor=cf, eval_capacity_factor=cf, min_capacity=min_cap).eval()
    # skew the router so some experts overflow
    with torch.no_grad():
        layer.router.weight[0] += 0.5
    x = torch.randn(T, shape["d"]) + 0.3
    cap = max(math.ceil(T * k / E * cf), min_cap)  # DeepSpeed: ceil(T / E * capacity_factor * k)
    with torch.no_grad():
        ref, _, top, dropped = ref_smoe(x, layer, k, capacity=cap)
        y, _, counts = layer(x)
    assert dropped > 0, "test setup must make some expert overflow"
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert int(counts.max()) <= cap and int(counts.sum()) == T * k - dropped
    assert layer.last_stats["drop_fraction"] == pytest.approx(dropped / (T * k))
    # training, noise 0: both streams see the same tokens and drop the same slots
    layer.train()
    layer.noise.mult_std = layer.noise.add_std = 0.0
    with torch.no_grad():
        y, _, counts = layer(x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert int(counts.sum()) == 2 * (T * k - dropped)


def test_capacity_mode_drops_nothing_when_capacity_suffices():
    layer = make_layer(hidden_size=8, num_experts=4, k=2, ffn_hidden_size=8, drop_tokens=True,
                       eval_capacity_factor=4.0).eval()
    x = torch.randn(16, 8)
    with torch.no_grad():
        y, _, counts = layer(x)
        ref, _, _, _ = ref_smoe(x, layer, 2)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert int(counts.sum()) == 32 and layer.last_stats["drop_fraction"] == 0.0


@pytest.mark.parametrize("k", [1, 2])
def test_user_expert_module_deepspeed_style(k):
    """DeepSpeed's call: S2MoE(hidden, expert_module, num_experts=..., k=...)."""
    d, h, E, T = 7, 6, 4, 21
    torch.manual_seed(0)
    expert_module = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, d))
    layer = S2MoE(d, expert_module, num_experts=E, k=k,  # dropless: DeepSpeed-style calls default to capacity
                  drop_tokens=False, use_rts=False, top2_2nd_expert_sampling=False)
    experts = layer.experts.experts
    assert len(experts) == E
    with torch.no_grad():  # distinct experts, so a wrong expert index would show
        for m in experts:
            for p in m.parameters():
                p.normal_()

    def expert(e, xt):
        l1, l2 = experts[e][0], experts[e][2]
        return ref_act(xt @ l1.weight.t() + l1.bias, "relu") @ l2.weight.t() + l2.bias

    x = torch.randn(T, d)
    with torch.no_grad():
        ref, _, _, _ = ref_smoe(x, layer, k, expert=expert)
        y, _, _ = layer.eval()(x)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
        layer.train()
        layer.noise.mult_std = layer.noise.add_std = 0.0
        y, _, _ = layer(x)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_eval_noisy_mode_is_two_stream_gated_reference():
    layer = make_layer(hidden_size=8, num_experts=4, k=2, ffn_hidden_size=8, eval_mode="noisy").eval()
    seen = capture_noise(layer)
    x = torch.randn(12, 8)
    with torch.no_grad():
        y, _, counts = layer(x)
        x_hat = seen[-1]
        ref = ref_gate(layer, x) * ref_smoe(x, layer, 2)[0] + (1 - ref_gate(layer, x)) * ref_smoe(x_hat, layer, 2)[0]
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert int(counts.sum()) == 2 * 12 * 2
    assert float(layer.uncertainty_loss) == 0.0  # no InfoNCE outside training


def test_smoe_baseline_is_plain_topk_moe_in_training():
    """moe_type="smoe": the same layer without noise and gate, one stream even in training."""
    layer = make_layer(hidden_size=8, num_experts=4, k=2, ffn_hidden_size=8, moe_type="smoe")
    assert not hasattr(layer, "gate") and not hasattr(layer, "noise")
    x = torch.randn(10, 8)
    with torch.no_grad():
        y, _, counts = layer(x)
        ref, _, _, _ = ref_smoe(x, layer, 2)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert int(counts.sum()) == 20


@pytest.mark.parametrize("shape,grouped", [(ODD, False), (ALIGNED, True)], ids=["odd", "aligned"])
def test_aligned_shapes_run_grouped_mm_odd_shapes_fall_back(shape, grouped):
    """The two shape families above really exercise the two expert-bank code paths."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.add(func.overloadpacket)
            return func(*args, **(kwargs or {}))

    layer = make_layer(hidden_size=shape["d"], num_experts=shape["E"], k=2, ffn_hidden_size=shape["h"]).eval()
    with torch.no_grad(), Ops() as mode:
        layer(torch.randn(shape["T"], shape["d"]))
    assert (torch.ops.aten._grouped_mm in mode.ops) == grouped


@pytest.mark.parametrize("shape", [ODD, ALIGNED], ids=["odd", "aligned"])
def test_experts_without_tokens(shape):
    """Empty expert groups (grouped_mm with repeated offsets): right output, zero finite grads."""
    layer = make_layer(hidden_size=shape["d"], num_experts=shape["E"], k=2, ffn_hidden_size=shape["h"],
                       noise_mult_std=0.0, noise_add_std=0.0)
    with torch.no_grad():
        layer.router.weight[2:] = -100.0  # no token picks experts 2.. as long as x has a positive sum
    x = torch.rand(shape["T"], shape["d"]) + 0.5
    y, _, counts = layer(x)
    assert counts[2:].sum() == 0
    with torch.no_grad():
        torch.testing.assert_close(y, ref_smoe(x, layer, 2)[0], rtol=1e-5, atol=1e-5)
    y.sum().backward()
    g = layer.experts.w1.grad
    assert torch.isfinite(g).all() and g[:2].abs().sum() > 0 and not g[2:].any()
