"""Bad S2MoE configurations: one test per rule. Each error is a ValueError naming the field, the
bad value and what is allowed, raised by S2MoEConfig and by the S2MoE constructor alike (the
DeepSpeed-style keyword call included) before any tensor or process group exists."""
import pytest
import torch
from torch import nn

from s2moe_dist import S2MoE, S2MoEConfig
from s2moe_dist.config import moe_config_from_dict

BASE = dict(hidden_size=8, num_experts=4, k=2, ffn_hidden_size=16)


def build(entry, **overrides):
    kw = {**BASE, **overrides}
    if entry == "config":
        return S2MoEConfig(**kw)
    if entry == "layer":
        return S2MoE(**kw)
    # deepspeed.moe.layer.MoE's call: S2MoE(hidden_size, expert, num_experts=..., ...)
    kw.pop("ffn_hidden_size")
    d = kw.pop("hidden_size")
    return S2MoE(d, nn.Linear(d, d), **kw)


def assert_error(entry, overrides, *fragments):
    with pytest.raises(ValueError) as info:
        build(entry, **overrides)
    msg = str(info.value)
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in {msg!r}"


ENTRIES = pytest.mark.parametrize("entry", ["config", "layer", "deepspeed_call"])


@ENTRIES
def test_k_above_num_experts(entry):
    assert_error(entry, dict(k=5), "k=5", "num_experts (4)")


@ENTRIES
def test_k_zero(entry):
    assert_error(entry, dict(k=0), "k=0", ">= 1")


@ENTRIES
def test_eval_k_above_num_experts(entry):
    assert_error(entry, dict(eval_k=6), "eval_k=6", "num_experts (4)")


@ENTRIES
def test_num_experts_not_divisible_by_ep_size(entry):
    assert_error(entry, dict(num_experts=6, k=1, ep_size=4), "num_experts=6", "ep_size (4)", "[1, 2, 3, 6]")


@pytest.mark.parametrize("field", ["noise_mult_std", "noise_add_std"])
@ENTRIES
def test_negative_noise_std(entry, field):
    assert_error(entry, {field: -0.5}, f"{field}=-0.5", ">= 0")


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan")])
def test_infonce_temperature_not_positive(value):
    for entry in ("config", "layer"):
        assert_error(entry, dict(infonce_temperature=value), f"infonce_temperature={value!r}", "> 0")


@ENTRIES
def test_unknown_activation(entry):
    assert_error(entry, dict(activation="tanh"), "activation='tanh'", "['relu', 'gelu', 'swiglu']")


@ENTRIES
def test_unknown_eval_mode(entry):
    assert_error(entry, dict(eval_mode="dirty"), "eval_mode='dirty'", "['clean', 'noisy']")


@ENTRIES
def test_unknown_noisy_routing(entry):
    assert_error(entry, dict(noisy_routing="both"), "noisy_routing='both'", "['own', 'shared']")


@ENTRIES
def test_unknown_uncertainty_on(entry):
    assert_error(entry, dict(uncertainty_on="hidden"), "uncertainty_on='hidden'", "['input', 'output']")


@ENTRIES
def test_unknown_moe_type(entry):
    assert_error(entry, dict(moe_type="xmoe"), "moe_type='xmoe'", "['s2moe', 'smoe']")


@ENTRIES
def test_use_tutel_raises(entry):
    assert_error(entry, dict(use_tutel=True), "use_tutel=True", "use_tutel=False")


@ENTRIES
def test_unknown_noisy_gate_policy_raises(entry):
    assert_error(entry, dict(noisy_gate_policy="Gumbel"), "noisy_gate_policy='Gumbel'", "'Jitter'", "'RSample'")


@ENTRIES
def test_noisy_gate_policy_on_another_router_raises(entry):
    assert_error(entry, dict(noisy_gate_policy="Jitter", router_type="xmoe"), "noisy_gate_policy='Jitter'",
                 "router_type='topk'", "noisy_gate_policy=None")


@pytest.mark.parametrize("value", [1, 0])
@ENTRIES
def test_infonce_max_tokens_below_two(entry, value):
    assert_error(entry, dict(infonce_max_tokens=value), f"infonce_max_tokens={value}", ">= 2")


@pytest.mark.parametrize("field", ["capacity_factor", "eval_capacity_factor"])
@pytest.mark.parametrize("value", [0.0, -1.0])
@ENTRIES
def test_capacity_factor_not_positive(entry, field, value):
    assert_error(entry, {field: value}, f"{field}={value!r}", "> 0")


@ENTRIES
def test_min_capacity_negative(entry):
    assert_error(entry, dict(min_capacity=-1), "min_capacity=-1", ">= 0")


@pytest.mark.parametrize("field", ["balance_coef", "uncertainty_coef"])
def test_negative_loss_coefficient(field):
    assert_error("config", {field: -0.1}, f"{field}=-0.1", ">= 0")


@pytest.mark.parametrize("field,value", [("hidden_size", 0), ("ffn_hidden_size", 0), ("num_experts", 0),
                                         ("k", 1.5), ("k", True)])
def test_sizes_must_be_positive_integers(field, value):
    assert_error("config", {field: value}, f"{field}={value!r}", "integer >= 1")


def test_ep_size_above_one_without_torch_distributed():
    assert not torch.distributed.is_initialized()
    S2MoEConfig(**BASE, ep_size=2)  # a valid config: the check belongs to building the layer
    for entry in ("layer", "deepspeed_call"):
        assert_error(entry, dict(ep_size=2), "ep_size=2", "torch.distributed", "ep_size=1")


def test_expert_must_be_a_module():
    with pytest.raises(ValueError, match=r"S2MoE\.expert=.*torch\.nn\.Module"):
        S2MoE(8, expert="mlp", num_experts=4, k=2)


def test_config_and_keywords_together_are_refused():
    with pytest.raises(ValueError, match="either config=S2MoEConfig"):
        S2MoE(config=S2MoEConfig(**BASE), num_experts=8)


def test_unknown_keyword_is_refused_by_name():
    with pytest.raises(TypeError, match="capacity_factr"):
        S2MoE(8, num_experts=4, k=2, capacity_factr=1.0)
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['capacity_factr'\]"):
        moe_config_from_dict({**BASE, "capacity_factr": 1.0})


def test_forward_rejects_wrong_hidden_size_and_used_token():
    layer = S2MoE(**BASE)
    with pytest.raises(ValueError, match="hidden size 6.*hidden_size=8"):
        layer(torch.randn(3, 6))
    with pytest.raises(ValueError, match="used_token"):
        layer(torch.randn(3, 8), used_token=torch.ones(3))
