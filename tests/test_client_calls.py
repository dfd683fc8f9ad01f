"""The call patterns of the DeepSpeed / Megatron-DeepSpeed clients S2MoE is swapped into, written
from their documented behaviour (no client code; CI has no network):

- Megatron-DeepSpeed's ``MoE(hidden, ParallelMLP(...), 12 keywords)`` and its loss
  ``lm + moe_loss_coeff * sum(l_aux)``; DeepSpeedExamples' CIFAR client, which drops ``l_aux``;
- activation checkpointing around the layer (``deepspeed.checkpointing.checkpoint``, torch's
  reentrant / non-reentrant checkpoint as Megatron's recompute is on CPU);
- ``noisy_gate_policy`` Jitter / RSample (against DeepSpeed's own gate and a formula), PR-MoE
  ``use_residual=True`` (against its formula), DeepSpeed's defaults for expert-module calls.

In every case the InfoNCE (uncertainty) gradient must reach the parameters exactly once, equal to
the reference ``task + coeff * l_aux + beta * L_u`` computed with a live L_u.
"""
import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from s2moe_dist import S2MoE, s2moe_aux_loss

D = 8
COEFF = 0.01  # Megatron-DeepSpeed's --moe-loss-coeff default


class TupleMLP(nn.Module):
    """Megatron-DeepSpeed's ParallelMLP contract: forward -> (output, bias)."""

    def __init__(self, d=D, h=16):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x))), self.fc2.bias


def megatron_deepspeed_layer(**over):
    """S2MoE built exactly as Megatron-DeepSpeed's ParallelTransformerLayer builds its MoE: hidden,
    expert module, then 12 keywords (the values of its default arguments, 4 experts, top-1)."""
    kw = dict(num_experts=4, ep_size=1, k=1, use_residual=False, capacity_factor=1.0, eval_capacity_factor=1.0,
              min_capacity=4, drop_tokens=True, use_tutel=False, enable_expert_tensor_parallelism=False,
              top2_2nd_expert_sampling=True)
    kw.update(over)
    return S2MoE(D, TupleMLP(), **kw)


def grads(layer, x, loss_fn, seed=7, wrap=None):
    """Gradients of every parameter and of x for ``loss_fn(y, l_aux, layer)`` (same noise draws)."""
    layer.zero_grad()
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)

    def run(h):
        y, l_aux, _ = layer(h)
        return y, l_aux

    y, l_aux = wrap(run, x) if wrap else run(x)
    loss_fn(y, l_aux, layer).backward()
    return {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None} | {"x": x.grad.clone()}


def reference_grads(layer, x, seed=7):
    """task + coeff * l_aux + beta * L_u, L_u live (the attached path off): what must be trained."""
    layer.attach_uncertainty_grad = False
    try:
        return grads(layer, x, lambda y, aux, m: task(y) + COEFF * aux + m.config.uncertainty_coef * m.uncertainty_loss,
                     seed)
    finally:
        layer.attach_uncertainty_grad = True


def task(y):
    return (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum()


def client_loss(y, l_aux, layer):  # Megatron-DeepSpeed: lm loss + moe_loss_coeff * l_aux
    return task(y) + COEFF * l_aux


def assert_same(got, want, atol=1e-6):
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=atol, msg=name)


@pytest.fixture(scope="module")
def x():
    return torch.randn(24, D, generator=torch.Generator().manual_seed(0))


def test_megatron_deepspeed_14_arguments_and_coeff_l_aux_train_infonce(x):
    torch.manual_seed(0)
    layer = megatron_deepspeed_layer(drop_tokens=False)  # dropless: no random token selection
    assert layer.config.k == 1 and layer.config.num_experts == 4
    want = reference_grads(layer, x)
    got = grads(layer, x, client_loss)
    assert float(want["router.weight"].abs().sum()) > 0
    assert_same(got, want)
    # the InfoNCE share is not negligible: without it the input gradient is different
    layer.attach_uncertainty_grad = False
    no_infonce = grads(layer, x, client_loss)
    layer.attach_uncertainty_grad = True
    assert (no_infonce["x"] - want["x"]).abs().max() > 1e-3


def test_client_that_drops_l_aux_still_trains_infonce(x):
    """DeepSpeedExamples' CIFAR client ignores l_aux: the uncertainty gradient must still arrive."""
    torch.manual_seed(0)
    layer = S2MoE(D, nn.Linear(D, D), num_experts=4, k=1, drop_tokens=False)
    layer.attach_uncertainty_grad = False
    want = grads(layer, x, lambda y, aux, m: task(y) + m.config.uncertainty_coef * m.uncertainty_loss)
    layer.attach_uncertainty_grad = True
    got = grads(layer, x, lambda y, aux, m: task(y))
    assert_same(got, want)


CHECKPOINTS = {
    "deepspeed": lambda fn, x: __import__("deepspeed").checkpointing.checkpoint(fn, x),
    "torch_reentrant": lambda fn, x: torch_checkpoint(fn, x, use_reentrant=True),
    "torch_non_reentrant": lambda fn, x: torch_checkpoint(fn, x, use_reentrant=False),
}


@pytest.mark.parametrize("kind", sorted(CHECKPOINTS))
def test_activation_checkpointing_keeps_the_infonce_gradient(x, kind):
    """Megatron-DeepSpeed's --checkpoint-activations --deepspeed-activation-checkpointing: the layer
    runs inside deepspeed.checkpointing.checkpoint; gradients equal the un-checkpointed reference."""
    torch.manual_seed(0)
    layer = megatron_deepspeed_layer(drop_tokens=False)
    want = reference_grads(layer, x)
    got = grads(layer, x, client_loss, wrap=CHECKPOINTS[kind])
    assert_same(got, want)


def test_s2moe_aux_loss_and_uncertainty_loss_cannot_double_count(x):
    torch.manual_seed(0)
    layer = S2MoE(D, num_experts=4, k=2, ffn_hidden_size=16)
    cfg = layer.config
    layer.attach_uncertainty_grad = False
    want = grads(layer, x,
                 lambda y, aux, m: task(y) + cfg.balance_coef * aux + cfg.uncertainty_coef * m.uncertainty_loss)
    layer.attach_uncertainty_grad = True
    assert_same(grads(layer, x, lambda y, aux, m: task(y) + s2moe_aux_loss(m)), want)
    # the README's earlier advice (add beta * layer.uncertainty_loss by hand) on top: still once
    both = grads(layer, x, lambda y, aux, m: task(y) + s2moe_aux_loss(m) + cfg.uncertainty_coef * m.uncertainty_loss)
    assert_same(both, want)
    # the logged values are the losses of the forward
    torch.manual_seed(7)
    y, l_aux, _ = layer(x)
    assert float(layer.uncertainty_loss) > 0 and not layer.uncertainty_loss.requires_grad
    torch.testing.assert_close(s2moe_aux_loss(layer),
                               cfg.balance_coef * l_aux + cfg.uncertainty_coef * layer.uncertainty_loss)


def test_explicit_scale_multiplies_only_the_attached_gradient(x):
    from s2moe_dist.moe.aux_grad import set_aux_grad_scale
    torch.manual_seed(0)
    layer = S2MoE(D, num_experts=4, k=2, ffn_hidden_size=16)
    beta = layer.config.uncertainty_coef
    layer.attach_uncertainty_grad = False
    want = grads(layer, x, lambda y, aux, m: 0.5 * task(y) + 0.5 * beta * m.uncertainty_loss)
    layer.attach_uncertainty_grad = True
    set_aux_grad_scale(0.5)  # a loop dividing its loss by 2 micro-batches
    try:
        got = grads(layer, x, lambda y, aux, m: 0.5 * task(y))
    finally:
        set_aux_grad_scale(1.0)
    assert_same(got, want)
    with pytest.raises(ValueError, match=r"set_aux_grad_scale\(scale=0\) is invalid"):
        set_aux_grad_scale(0)


# ---- DeepSpeed's defaults and exp_counts ---------------------------------------------------------
def test_deepspeed_style_call_gets_deepspeed_defaults():
    from deepspeed.moe.layer import MoE
    ds = {n: p.default for n, p in inspect.signature(MoE.__init__).parameters.items()
          if p.default is not inspect.Parameter.empty}
    layer = S2MoE(D, nn.Linear(D, D))           # an expert module: DeepSpeed's convention
    for name, default in ds.items():
        assert getattr(layer.config, name) == default, name
    positional = S2MoE(D, nn.Linear(D, D), 2)   # positional num_experts, the rest DeepSpeed's
    assert positional.config.num_experts == 2 and positional.config.k == 1 and positional.config.drop_tokens
    own = S2MoE(D).config                       # S2MoE's own convention keeps S2MoE's defaults
    assert (own.num_experts, own.k, own.drop_tokens, own.use_rts) == (16, 2, False, False)


def test_exp_counts_both_streams_and_deepspeed_per_stream_count(x):
    torch.manual_seed(0)
    layer = S2MoE(D, num_experts=4, k=2, ffn_hidden_size=16)
    _, _, counts = layer(x)
    assert int(counts.sum()) == 2 * x.shape[0] * 2  # kept slots, clean + noisy stream
    clean, noisy = layer.deepspeed_exp_counts("clean"), layer.deepspeed_exp_counts("noisy")
    assert int(clean.sum()) == int(noisy.sum()) == x.shape[0] * 2
    torch.testing.assert_close(clean + noisy, counts)  # dropless: routed = kept
    want = torch.bincount(layer._routed_idx[0].reshape(-1), minlength=4)
    torch.testing.assert_close(clean, want)
    layer.eval()
    layer(x)
    assert layer.deepspeed_exp_counts("noisy") is None and int(layer.deepspeed_exp_counts().sum()) == x.shape[0] * 2


# ---- noisy_gate_policy ----------------------------------------------------------------------------
def _per_token_weights(routing, E):
    """[T, E] combine weights of a Routing (dropped slots carry 0)."""
    T = routing.weights.shape[0]
    out = torch.zeros(T, E)
    keep = routing.dispatch_idx >= 0
    return out.index_put_((torch.arange(T).unsqueeze(1).expand_as(keep)[keep], routing.dispatch_idx[keep]),
                          routing.weights[keep], accumulate=True)


@pytest.mark.parametrize("policy", ["Jitter", "RSample"])
def test_noisy_gate_policy_is_deepspeeds(policy):
    """Top-1 routing of S2MoE's router with the policy == DeepSpeed's TopKGate (same weight, same
    seed: the noise draws use the RNG as DeepSpeed's do) == the policy's formula."""
    from deepspeed.moe.sharded_moe import TopKGate
    from s2moe_dist.moe.noisy_gate import NoisyGateRouter
    E, T = 4, 32
    router = NoisyGateRouter(D, E, policy).train()
    gate = TopKGate(D, E, k=1, noisy_gate_policy=policy, drop_tokens=False, use_rts=False).train()
    with torch.no_grad():
        gate.wg.weight.copy_(router.weight)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(11)
    r = router(x, 1, False)
    torch.manual_seed(11)
    _, combine, _, _ = gate(x)
    ds = combine.sum(dim=2)  # [T, E, capacity] -> [T, E]
    ours = _per_token_weights(r, E)
    torch.testing.assert_close(ours, ds)
    # the formula, written out
    torch.manual_seed(11)
    W = router.weight.detach()
    if policy == "Jitter":
        xj = x * torch.distributions.Uniform(torch.tensor(0.99), torch.tensor(1.01)).rsample(x.shape)
        probs = torch.softmax(xj @ W.T, dim=-1)
        choice = probs.argmax(dim=-1)
    else:
        logits = x @ W.T
        probs = torch.softmax(logits, dim=-1)
        choice = (logits + torch.distributions.Gumbel(0.0, 1.0).rsample(logits.shape)).argmax(dim=-1)
    want = torch.zeros(T, E).scatter_(1, choice.unsqueeze(1), probs.gather(1, choice.unsqueeze(1)))
    torch.testing.assert_close(ours, want)
    if policy == "RSample":  # the noise changes choices (else the test could not tell)
        assert (choice != probs.argmax(dim=-1)).any()
    # no noise in eval
    router.eval()
    torch.testing.assert_close(_per_token_weights(router(x, 1, False), E),
                               _per_token_weights(super(NoisyGateRouter, router).forward(x, 1, False), E))


@pytest.mark.parametrize("policy", ["Jitter", "RSample", "None"])
def test_noisy_gate_layer_trains_both_streams(x, policy):
    """DeepSpeedExamples' run_ds_moe.sh: --noisy-gate-policy RSample, top-1, an expert module."""
    torch.manual_seed(0)
    layer = S2MoE(D, nn.Linear(D, D), num_experts=4, k=1, noisy_gate_policy=policy, drop_tokens=False)
    assert layer.config.noisy_gate_policy == (None if policy == "None" else policy)
    y, l_aux, counts = layer(x)
    assert int(counts.sum()) == 2 * x.shape[0]
    client_loss(y, l_aux, layer).backward()
    assert layer.router.weight.grad.abs().sum() > 0


# ---- PR-MoE ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("expert_module", [False, True])
def test_use_residual_is_pr_moe(x, expert_module):
    torch.manual_seed(0)
    kw = dict(num_experts=4, k=1, drop_tokens=False)
    if expert_module:
        prmoe = megatron_deepspeed_layer(use_residual=True, **{"drop_tokens": False})
        plain = megatron_deepspeed_layer(drop_tokens=False)
    else:
        prmoe = S2MoE(D, use_residual=True, ffn_hidden_size=16, **kw)
        plain = S2MoE(D, ffn_hidden_size=16, **kw)
    missing = plain.load_state_dict(prmoe.state_dict(), strict=False).unexpected_keys
    assert sorted({k.split(".")[0] for k in missing}) == ["coefficient", "mlp"]  # DeepSpeed's names
    torch.manual_seed(5)
    y, _, _ = prmoe(x)
    torch.manual_seed(5)
    y_moe, _, _ = plain(x)
    dense = prmoe.mlp(x)
    dense = dense[0] if isinstance(dense, tuple) else dense
    c = torch.softmax(x @ prmoe.coefficient.weight.T + prmoe.coefficient.bias, dim=-1)
    torch.testing.assert_close(y, y_moe * c[:, :1] + dense * c[:, 1:])
    client_loss(y, torch.zeros(()), prmoe).backward()
    assert prmoe.coefficient.weight.grad.abs().sum() > 0 and next(prmoe.mlp.parameters()).grad is not None
    from deepspeed.moe.utils import is_moe_param
    assert prmoe.use_residual and not any(is_moe_param(p) for p in prmoe.mlp.parameters())
    assert all(is_moe_param(p) for p in prmoe.experts.parameters())
