"""S2MoEConfig.gate: "fixed" mixes the two streams 0.5 / 0.5 with no gate parameters (the no-gate
ablation); the reference is the learned gate with zero weight and bias (sigmoid(0) = 0.5)."""
import pytest
import torch

from s2moe_dist.config import S2MoEConfig
from s2moe_dist.moe.layer import S2MoELayer


def test_fixed_gate_is_the_learned_gate_at_one_half():
    torch.manual_seed(0)
    fixed = S2MoELayer(16, num_experts=4, k=2, ffn_hidden_size=32, gate="fixed")
    ref = S2MoELayer(16, num_experts=4, k=2, ffn_hidden_size=32)
    assert not any(n.startswith("gate.") for n, _ in fixed.named_parameters())
    with torch.no_grad():
        ref.gate.weight.zero_()
        ref.gate.bias.zero_()
    missing = ref.load_state_dict(fixed.state_dict(), strict=False).missing_keys
    assert sorted(missing) == ["gate.bias", "gate.weight"]
    x = torch.randn(2, 8, 16)
    outs = []
    for layer in (fixed, ref):
        xi = x.clone().requires_grad_()
        torch.manual_seed(1)  # the same noise draw for both
        y, _, _ = layer(xi)
        (y.square().sum() + layer.aux_loss()).backward()
        outs.append((y.detach(), xi.grad, layer.experts.w1.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b)
    assert fixed.last_stats["gate_mean"] == pytest.approx(0.5)


def test_gate_field_is_checked():
    with pytest.raises(ValueError, match=r"S2MoEConfig.gate='none' is invalid: must be one of \['learned', 'fixed'\]"):
        S2MoEConfig(hidden_size=8, gate="none")
