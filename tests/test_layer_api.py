"""The public API of the S2MoE layer: call conventions (S2MoE's and deepspeed.moe.layer.MoE's),
forward contract, stable parameter layout, the one-call aux loss, eval modes, reproducibility,
bf16 autocast, and the DeepSpeed options it honours."""
import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from s2moe_dist import S2MoE, S2MoEConfig, S2MoELayer, s2moe_aux_loss
from s2moe_dist.moe.experts import ExpertBank
from reference import make_layer, ref_routing, ref_smoe

DEEPSPEED_KWARGS = ("expert", "num_experts", "ep_size", "k", "capacity_factor", "eval_capacity_factor",
                    "min_capacity", "use_residual", "noisy_gate_policy", "drop_tokens", "use_rts", "use_tutel",
                    "enable_expert_tensor_parallelism", "top2_2nd_expert_sampling")


# the pure PyTorch layer, and the public name (its DeepSpeed-facing subclass when DeepSpeed is installed)
CLASSES = pytest.mark.parametrize("cls", [S2MoELayer, S2MoE], ids=["S2MoELayer", "S2MoE"])


def deepspeed_moe_signature():
    layer_mod = pytest.importorskip("deepspeed.moe.layer")
    return inspect.signature(layer_mod.MoE.__init__).parameters


# ---- call conventions -----------------------------------------------------------------------
def test_public_names():
    import s2moe_dist
    assert {"S2MoE", "S2MoEConfig", "s2moe_aux_loss"} <= set(s2moe_dist.__all__)
    assert issubclass(S2MoE, S2MoELayer)


@CLASSES
def test_every_deepspeed_moe_keyword_in_deepspeed_order(cls):
    """The keywords (and positional order) of the installed deepspeed.moe.layer.MoE."""
    params = list(deepspeed_moe_signature())
    assert params[:2] == ["self", "hidden_size"] and tuple(params[2:]) == DEEPSPEED_KWARGS
    expert = nn.Linear(8, 8)
    # DeepSpeed's own defaults (drop_tokens, use_rts, top2_2nd_expert_sampling all True), k=1 as
    # Megatron-DeepSpeed passes them: accepted, nothing that raises among them.
    defaults = {n: p.default for n, p in deepspeed_moe_signature().items()
                if n not in ("self", "hidden_size", "expert")}
    layer = cls(8, expert, **{**defaults, "num_experts": 4})
    for name, value in defaults.items():
        if name != "num_experts":
            assert getattr(layer.config, name) == value, name
    # positional, in DeepSpeed's order
    values = (4, 1, 2, 1.5, 2.5, 3, False, None, True, False, False, False, False)
    layer = cls(8, expert, *values)
    for name, value in zip(DEEPSPEED_KWARGS[1:], values):
        assert getattr(layer.config, name) == value, name


class _TupleExpert(nn.Module):
    """Megatron-DeepSpeed's ParallelMLP returns (output, bias); DeepSpeed keeps output[0]."""

    def __init__(self, d):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return self.fc(x), self.fc.bias


def test_expert_returning_a_tuple_uses_its_first_element():
    torch.manual_seed(0)
    layer = S2MoE(6, _TupleExpert(6), num_experts=2, k=1, drop_tokens=False).eval()
    x = torch.randn(9, 6)
    with torch.no_grad():
        y, _, _ = layer(x)
        want = ref_smoe(x, layer, 1, expert=lambda e, xt: layer.experts.experts[e].fc(xt))[0]
    torch.testing.assert_close(y, want)


@CLASSES
def test_s2moe_call_conventions_agree(cls):
    a = cls(8, 4, 2, 16).config                       # positional: num_experts, k, ffn_hidden_size
    b = cls(hidden_size=8, num_experts=4, k=2, ffn_hidden_size=16).config
    c = cls(config=S2MoEConfig(hidden_size=8, num_experts=4, k=2, ffn_hidden_size=16)).config
    assert a == b == c
    assert S2MoEConfig(hidden_size=8).ffn_hidden_size == 32 and S2MoEConfig(hidden_size=8, k=3).eval_k == 3


def test_defaults_that_differ_from_deepspeed():
    cfg = S2MoEConfig(hidden_size=8)
    assert (cfg.drop_tokens, cfg.use_rts, cfg.top2_2nd_expert_sampling) == (False, False, False)
    assert (cfg.num_experts, cfg.k, cfg.activation, cfg.eval_mode) == (16, 2, "gelu", "clean")
    ds = deepspeed_moe_signature()
    assert (ds["drop_tokens"].default, ds["use_rts"].default, ds["top2_2nd_expert_sampling"].default) == (True,) * 3


# ---- forward contract -----------------------------------------------------------------------
@CLASSES
def test_forward_returns_output_l_aux_and_expert_counts(cls):
    layer = make_layer(cls=cls, hidden_size=8, num_experts=4, k=2, ffn_hidden_size=16)
    x = torch.randn(2, 5, 8, requires_grad=True)  # InfoNCE on the inputs trains what made x
    y, l_aux, counts = layer(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert l_aux.shape == () and l_aux.dtype == torch.float32 and l_aux.requires_grad
    assert counts.shape == (4,) and not counts.requires_grad and int(counts.sum()) == 2 * 10 * 2
    # InfoNCE's gradient rides on y (moe/aux_grad.py); the attribute is its value, for logging
    assert layer.uncertainty_loss.shape == () and not layer.uncertainty_loss.requires_grad
    assert float(layer.uncertainty_loss) > 0 and type(y.grad_fn).__name__ == "AttachAuxGradBackward"
    assert set(layer.last_stats) >= {"expert_counts", "drop_fraction", "gate_mean"}
    torch.testing.assert_close(layer.aux_loss(), 0.01 * l_aux + 0.1 * layer.uncertainty_loss)
    layer.eval()
    with torch.no_grad():
        _, _, counts = layer(x)
    assert int(counts.sum()) == 10 * 2  # eval clean: one stream


# ---- parameter layout -----------------------------------------------------------------------
@CLASSES
@pytest.mark.parametrize("activation,bias", [("gelu", False), ("relu", True), ("swiglu", False), ("swiglu", True)])
def test_parameter_layout(cls, activation, bias):
    E, d, h = 4, 8, 6
    layer = cls(d, num_experts=E, k=2, ffn_hidden_size=h, activation=activation, expert_bias=bias)
    w = 2 * h if activation == "swiglu" else h
    want = {"router.weight": (E, d), "experts.w1": (E, d, w), "experts.w2": (E, h, d),
            "gate.weight": (1, d), "gate.bias": (1,)}
    if bias:
        want.update({"experts.b1": (E, w), "experts.b2": (E, d)})
    assert {k: tuple(v.shape) for k, v in layer.named_parameters()} == want
    if cls is S2MoELayer:  # (DeepSpeed's subclass writes the bank in DeepSpeed's per-expert keys)
        assert {k: tuple(v.shape) for k, v in layer.state_dict().items()} == want
    if bias:  # expert biases start at zero, like an untouched residual
        assert not layer.experts.b1.any() and not layer.experts.b2.any()


def test_swiglu_w1_is_gate_half_then_up_half():
    d, h = 4, 3
    layer = S2MoE(d, num_experts=1, k=1, ffn_hidden_size=h, activation="swiglu").eval()
    x = torch.randn(5, d)
    w1, w2 = layer.experts.w1[0], layer.experts.w2[0]
    with torch.no_grad():
        y, _, _ = layer(x)
        gate_up = (F.silu(x @ w1[:, :h]) * (x @ w1[:, h:])) @ w2
        up_gate = (F.silu(x @ w1[:, h:]) * (x @ w1[:, :h])) @ w2
    torch.testing.assert_close(y, gate_up)  # one expert, k=1: weight = probability 1
    assert not torch.allclose(y, up_gate)


@CLASSES
def test_state_dict_round_trip_reproduces_the_layer(cls):
    a = make_layer(seed=0, cls=cls, hidden_size=8, num_experts=4, k=2, ffn_hidden_size=16, expert_bias=True)
    b = make_layer(seed=1, cls=cls, hidden_size=8, num_experts=4, k=2, ffn_hidden_size=16, expert_bias=True)
    x = torch.randn(12, 8)
    assert not torch.allclose(a.eval()(x)[0], b.eval()(x)[0])
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(x)[0], b(x)[0])


@pytest.mark.parametrize("ep_size", [2, 4])
def test_expert_parallel_rank_holds_a_contiguous_block_of_the_same_experts(ep_size):
    """Rank r of an EP group holds experts [r*E/ep, (r+1)*E/ep), initialised exactly as the
    same experts of a single-process layer built from the same seed."""
    E, d, h = 8, 4, 8
    torch.manual_seed(3)
    full = ExpertBank(E, d, h, "swiglu")
    n = E // ep_size
    for r in range(ep_size):
        torch.manual_seed(3)
        part = ExpertBank(n, d, h, "swiglu", first_expert=r * n)
        assert torch.equal(part.w1, full.w1[r * n:(r + 1) * n]) and torch.equal(part.w2, full.w2[r * n:(r + 1) * n])


# ---- the one-call aux loss ------------------------------------------------------------------
def test_s2moe_aux_loss_sums_every_layer_of_a_model():
    torch.manual_seed(0)
    model = nn.Sequential(S2MoE(8, num_experts=4, k=2, ffn_hidden_size=8, balance_coef=0.01, uncertainty_coef=0.1),
                          nn.Sequential(S2MoE(8, num_experts=4, k=1, ffn_hidden_size=8, balance_coef=0.5,
                                              uncertainty_coef=2.0)))
    l1, l2 = model[0], model[1][0]
    x = torch.randn(20, 8)
    h, aux1, _ = l1(x)
    _, aux2, _ = l2(h)
    want = 0.01 * aux1 + 0.1 * l1.uncertainty_loss + 0.5 * aux2 + 2.0 * l2.uncertainty_loss
    got = s2moe_aux_loss(model)
    torch.testing.assert_close(got, want)
    assert float(l1.uncertainty_loss) > 0 and float(l2.uncertainty_loss) > 0 and float(aux2) > 0
    got.backward()  # a loss term: it reaches both routers
    assert l1.router.weight.grad.abs().sum() > 0 and l2.router.weight.grad.abs().sum() > 0
    assert float(s2moe_aux_loss(nn.Linear(2, 2))) == 0.0


# ---- eval modes -----------------------------------------------------------------------------
def test_eval_noisy_mode_is_seeded_and_independent_of_the_global_rng():
    layer = make_layer(hidden_size=8, num_experts=4, k=2, ffn_hidden_size=8, eval_mode="noisy").eval()
    x = torch.randn(10, 8)
    with torch.no_grad():
        torch.manual_seed(1)
        a = layer(x)[0]
        torch.manual_seed(2)
        b = layer(x)[0]
        layer.config.eval_mode = "clean"
        clean = layer(x)[0]
        layer.config.eval_mode, layer.config.eval_seed = "noisy", 99
        c = layer(x)[0]
    assert torch.equal(a, b)
    assert not torch.allclose(a, clean) and not torch.allclose(a, c)


def test_training_noise_is_fresh_each_step_and_clean_eval_is_deterministic():
    layer = make_layer(hidden_size=8, num_experts=4, k=2, ffn_hidden_size=8)
    x = torch.randn(10, 8)
    with torch.no_grad():
        assert not torch.equal(layer(x)[0], layer(x)[0])
        layer.eval()
        assert torch.equal(layer(x)[0], layer(x)[0])


# ---- reproducibility ------------------------------------------------------------------------
def _seeded_step(seed):
    torch.manual_seed(seed)
    layer = S2MoE(16, num_experts=4, k=2, ffn_hidden_size=32, activation="swiglu", infonce_max_tokens=16)
    x = torch.randn(48, 16)  # > infonce_max_tokens: the InfoNCE token sample is seeded too
    y, _, _ = layer(x)
    ((y ** 2).mean() + s2moe_aux_loss(layer)).backward()
    return [y.detach(), layer.uncertainty_loss.detach()] + [p.grad for p in layer.parameters()]


def test_same_seed_is_bitwise_reproducible_and_another_seed_differs():
    a, b, c = _seeded_step(0), _seeded_step(0), _seeded_step(1)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not any(torch.equal(u, v) for u, v in zip(a, c))


def test_same_weights_same_seed_same_noise():
    layer = make_layer(hidden_size=8, num_experts=4, k=2, ffn_hidden_size=8)
    x = torch.randn(10, 8)
    with torch.no_grad():
        torch.manual_seed(7)
        a = layer(x)[0]
        torch.manual_seed(7)
        b = layer(x)[0]
        torch.manual_seed(8)
        c = layer(x)[0]
    assert torch.equal(a, b) and not torch.allclose(a, c)


# ---- bf16 autocast --------------------------------------------------------------------------
@pytest.mark.parametrize("d,h", [(16, 32), (7, 5)], ids=["grouped", "fallback"])
def test_bf16_autocast_routes_in_fp32(d, h):
    layer = make_layer(hidden_size=d, num_experts=4, k=2, ffn_hidden_size=h, activation="swiglu")
    logits_dtypes = []
    layer.router.register_forward_hook(lambda m, args, out: logits_dtypes.append(out.probs.dtype))
    x = torch.randn(24, d)
    with torch.no_grad():
        ref, _, _, _ = ref_smoe(x, layer, 2)
        layer.eval()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, l_aux, _ = layer(x)
    assert logits_dtypes == [torch.float32] and l_aux.dtype == torch.float32
    torch.testing.assert_close(y, ref, rtol=0.05, atol=0.05)  # bf16 expert matmuls, fp32 routing
    layer.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, l_aux, _ = layer(x.bfloat16())
        loss = y.float().square().mean() + s2moe_aux_loss(layer)
    loss.backward()
    assert y.dtype == torch.bfloat16 and logits_dtypes[-1] == torch.float32
    for name, p in layer.named_parameters():
        assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


# ---- DeepSpeed options the layer honours ----------------------------------------------------
def _routings(layer):
    seen = []
    layer.router.register_forward_hook(lambda m, args, out: seen.append(out))
    return seen


def test_top2_2nd_expert_sampling_samples_the_second_expert_in_training_only():
    layer = make_layer(hidden_size=8, num_experts=8, k=2, ffn_hidden_size=8, top2_2nd_expert_sampling=True,
                       noise_mult_std=0.0, noise_add_std=0.0)
    seen = _routings(layer)
    x = torch.randn(200, 8)
    with torch.no_grad():
        layer(x)
        _, probs, top, _ = ref_routing(x, layer.router.weight, 2, True)
        r = seen[-1]  # dropless top-k routes both streams in one call: the clean rows come first
        assert r.expert_idx.shape[0] == 2 * len(x)
        r = r.rows(0, len(x))
        assert torch.equal(r.expert_idx[:, 0], top[:, 0])       # first choice: the argmax
        assert (r.expert_idx[:, 1] != top[:, 1]).any()          # second: sampled, not always the runner-up
        assert (r.expert_idx[:, 1] != r.expert_idx[:, 0]).all()
        layer.eval()
        y, _, _ = layer(x)
        torch.testing.assert_close(y, ref_smoe(x, layer, 2)[0], rtol=1e-5, atol=1e-5)


def test_top2_2nd_expert_sampling_is_ignored_at_k1_as_in_deepspeed():
    layer = make_layer(hidden_size=8, num_experts=4, k=1, ffn_hidden_size=8, top2_2nd_expert_sampling=True,
                       noise_mult_std=0.0, noise_add_std=0.0)
    x = torch.randn(16, 8)
    with torch.no_grad():
        torch.testing.assert_close(layer(x)[0], ref_smoe(x, layer, 1)[0], rtol=1e-5, atol=1e-5)


def test_use_rts_randomises_which_tokens_overflow_in_training():
    layer = make_layer(hidden_size=8, num_experts=4, k=1, ffn_hidden_size=8, drop_tokens=True, use_rts=True,
                       capacity_factor=0.5, min_capacity=1, noise_mult_std=0.0, noise_add_std=0.0)
    seen = _routings(layer)
    x = torch.randn(64, 8)
    with torch.no_grad():
        patterns = []
        for seed in range(3):
            torch.manual_seed(seed)
            layer(x)
            patterns.append(seen[-1].dispatch_idx.clone())
        cap = 8  # ceil(64 / 4 * 0.5)
        for p in patterns:
            kept = p[p >= 0]
            assert torch.bincount(kept, minlength=4).max() <= cap and (p < 0).any()
        assert not torch.equal(patterns[0], patterns[1]) or not torch.equal(patterns[1], patterns[2])
        # without RTS the kept tokens are the first ones in token order (DeepSpeed's top-1 rule)
        layer.config.use_rts = False
        layer(x)
        _, _, top, _ = ref_routing(x, layer.router.weight, 1, False, capacity=cap)
        want = top[:, 0].clone()
        for e in range(4):
            rows = (top[:, 0] == e).nonzero().flatten()
            want[rows[cap:]] = -1
        assert torch.equal(seen[-1].dispatch_idx[:, 0], want)
