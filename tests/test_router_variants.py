"""Router baselines (router_type xmoe / stablemoe) against independent plain-PyTorch routing
written here from the routers' own parameters: scores, choices, combine weights, layer output,
StableMoE's balance loss and two-stage freeze, gradients, parameter layout, config errors."""
import math

import pytest
import torch

from s2moe_dist import S2MoEConfig
from s2moe_dist.moe.layer import S2MoELayer

D, E, H = 8, 4, 12  # aligned sizes: the grouped_mm path


def make(router_type, **kw):
    torch.manual_seed(0)
    base = dict(hidden_size=D, num_experts=E, k=2, ffn_hidden_size=H, router_type=router_type)
    return S2MoELayer(**{**base, **kw})


def routings(layer):
    seen = []
    layer.router.register_forward_hook(lambda m, args, out: seen.append(out))
    return seen


# ---- the reference: scores from the documented parameters, per-token loops -------------------
def ref_scores(layer, x):
    """(selection scores, combine-weight scores) [T, E] for ``layer.router``."""
    r = layer.router
    if layer.config.router_type == "xmoe":
        z = x @ r.proj.weight.t()
        z = z / z.norm(dim=1, keepdim=True)
        e = r.expert_embeddings / r.expert_embeddings.norm(dim=1, keepdim=True)
        logits = (z @ e.t()) / r.temperature
        return logits, torch.softmax(logits, dim=1)
    live = x @ r.expert_centroids.t()
    select = x @ r.frozen_centroids.t() if r.frozen else live
    weights = torch.softmax(live, dim=1) if layer.config.k >= 2 else torch.sigmoid(live)
    return select, weights


def ref_choice(layer, x, k):
    select, wscore = ref_scores(layer, x)
    out = []
    for t in range(x.shape[0]):
        order = sorted(range(E), key=lambda e: -float(select[t, e]))[:k]
        w = [wscore[t, e] for e in order]
        if layer.config.k >= 2:
            s = sum(w)
            w = [v / s for v in w]
        out.append(list(zip(order, w)))
    return out


def ref_moe(layer, x, k):
    bank = layer.experts
    rows = []
    for t, choice in enumerate(ref_choice(layer, x, k)):
        y = torch.zeros(D)
        for e, w in choice:
            h = x[t] @ bank.w1[e]
            y = y + w * ((0.5 * h * (1 + torch.erf(h / math.sqrt(2)))) @ bank.w2[e])
        rows.append(y)
    return torch.stack(rows)


# ---- layout ----------------------------------------------------------------------------------
@pytest.mark.parametrize("router_type,want", [
    ("topk", {"router.weight": (E, D)}),
    ("xmoe", {"router.proj.weight": (16, D), "router.expert_embeddings": (E, 16), "router.temperature": (1,)}),
    ("stablemoe", {"router.expert_centroids": (E, D)}),
])
def test_router_parameters(router_type, want):
    layer = make(router_type)
    got = {n: tuple(p.shape) for n, p in layer.named_parameters() if n.startswith("router.")}
    assert got == want
    if router_type == "stablemoe":
        assert tuple(layer.state_dict()["router.frozen_centroids"].shape) == (E, D)
        assert layer.state_dict()["router._extra_state"] == {"num_updates": 0}
    if router_type == "xmoe":
        assert float(layer.router.temperature) == pytest.approx(0.07)
        assert make("xmoe", router_dim=5).router.proj.weight.shape == (5, D)


# ---- routing against the reference ------------------------------------------------------------
@pytest.mark.parametrize("router_type", ["xmoe", "stablemoe"])
@pytest.mark.parametrize("k", [1, 2])
def test_routing_and_output_match_reference(router_type, k):
    layer = make(router_type, k=k, moe_type="smoe").eval()
    seen = routings(layer)
    x = torch.randn(24, D)
    with torch.no_grad():
        y, l_aux, counts = layer(x)
        r = seen[-1]
        want = ref_choice(layer, x, k)
        assert r.probs.dtype == torch.float32 and r.weights.shape == (24, k)
        for t in range(24):
            assert [int(e) for e in r.expert_idx[t]] == [e for e, _ in want[t]]
            torch.testing.assert_close(r.weights[t], torch.stack([w for _, w in want[t]]).float())
        torch.testing.assert_close(y, ref_moe(layer, x, k), rtol=1e-5, atol=1e-5)
        assert int(counts.sum()) == 24 * k


def test_xmoe_eval_k_differs_from_training_k():
    layer = make("xmoe", k=2, eval_k=3, moe_type="smoe").eval()
    x = torch.randn(16, D)
    with torch.no_grad():
        torch.testing.assert_close(layer(x)[0], ref_moe(layer, x, 3), rtol=1e-5, atol=1e-5)


def test_xmoe_scores_are_scale_free_cosines():
    layer = make("xmoe")
    x = torch.randn(10, D)
    with torch.no_grad():
        a, b = layer.router.logits(x), layer.router.logits(3.0 * x)
        layer.router.expert_embeddings.mul_(7.0)
        c = layer.router.logits(x)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)
    assert a.abs().max() <= 1 / 0.07 + 1e-4


# ---- StableMoE balance loss and two stages ----------------------------------------------------
def test_stablemoe_balance_loss_is_the_papers_formula():
    layer = make("stablemoe", k=2, moe_type="smoe")
    seen = routings(layer)
    x = torch.randn(40, D)
    _, l_aux, _ = layer(x)
    idx = seen[-1].expert_idx
    s = x @ layer.router.expert_centroids.t()
    n_avg = 40 * 2 / E
    want = 0.0
    for e in range(E):
        n_e = int((idx == e).sum())
        routed = [t for t in range(40) if e in idx[t].tolist()]
        want = want + (n_e - n_avg) / n_avg * sum(torch.sigmoid(s[t, e]) for t in routed)
    torch.testing.assert_close(l_aux, want / 40)
    l_aux.backward()
    assert layer.router.expert_centroids.grad.abs().sum() > 0


def test_stablemoe_freezes_routing_after_n_training_forwards():
    layer = make("stablemoe", k=1, moe_type="smoe", freeze_router_after=2)
    seen = routings(layer)
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    x = torch.randn(32, D)
    for _ in range(2):  # stage 1: the centroids train and route
        y, l_aux, _ = layer(x)
        opt.zero_grad()
        (y.square().mean() + l_aux).backward()
        opt.step()
        assert not layer.router.frozen and l_aux.requires_grad
    after_stage1 = layer.router.expert_centroids.detach().clone()
    y, l_aux, _ = layer(x)  # first stage-2 forward: snapshot of the centroids after 2 updates
    assert layer.router.frozen and float(l_aux) == 0.0
    torch.testing.assert_close(layer.router.frozen_centroids, after_stage1)
    choice = seen[-1].expert_idx.clone()
    (y.square().mean() + l_aux).backward()
    assert layer.router.expert_centroids.grad.abs().sum() > 0  # the sigmoid gate still trains them
    with torch.no_grad():
        layer.router.expert_centroids.copy_(torch.randn(E, D))  # would route differently when live
        _, _, _ = layer(x)
        r = seen[-1]
        assert torch.equal(r.expert_idx, choice)
        live = x @ layer.router.expert_centroids.t()
        torch.testing.assert_close(r.weights, torch.sigmoid(live.gather(1, choice)))
    # the schedule survives a state-dict round trip
    fresh = make("stablemoe", k=1, moe_type="smoe", freeze_router_after=2)
    fresh.load_state_dict(layer.state_dict())
    assert fresh.router.num_updates == 4 and fresh.router.frozen
    torch.testing.assert_close(fresh.router.frozen_centroids, after_stage1)


def test_stablemoe_eval_forwards_do_not_advance_the_schedule():
    layer = make("stablemoe", freeze_router_after=1).eval()
    with torch.no_grad():
        for _ in range(3):
            layer(torch.randn(8, D))
    assert layer.router.num_updates == 0 and not layer.router.frozen


# ---- gradients, both moe_types ------------------------------------------------------------------
@pytest.mark.parametrize("moe_type", ["s2moe", "smoe"])
@pytest.mark.parametrize("router_type", ["xmoe", "stablemoe"])
def test_gradients_reach_router_parameters(router_type, moe_type):
    layer = make(router_type, moe_type=moe_type)
    y, l_aux, _ = layer(torch.randn(2, 12, D))
    assert y.shape == (2, 12, D)
    (y.square().mean() + layer.aux_loss()).backward()
    for name, p in layer.named_parameters():
        if name.startswith("router."):
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_xmoe_balance_loss_is_switch_on_its_probabilities():
    layer = make("xmoe", moe_type="smoe")
    seen = routings(layer)
    x = torch.randn(30, D)
    _, l_aux, _ = layer(x)
    probs, _ = ref_scores(layer, x)
    probs = torch.softmax(probs, dim=1)
    f = torch.bincount(seen[-1].expert_idx.reshape(-1), minlength=E).float() / (30 * 2)
    torch.testing.assert_close(l_aux, E * (f * probs.mean(0)).sum())


# ---- config errors ------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,fragments", [
    (dict(router_type="hash"), ["router_type='hash'", "['topk', 'xmoe', 'stablemoe']"]),
    (dict(router_type="xmoe", router_dim=0), ["router_dim=0", ">= 1"]),
    (dict(router_type="xmoe", router_temperature=0.0), ["router_temperature=0.0", "> 0"]),
    (dict(router_type="stablemoe", freeze_router_after=-1), ["freeze_router_after=-1", ">= 0"]),
    (dict(freeze_router_after=10), ["freeze_router_after=10", "router_type='stablemoe'", "got router_type='topk'"]),
])
@pytest.mark.parametrize("entry", ["config", "layer"])
def test_config_errors(entry, overrides, fragments):
    kw = dict(hidden_size=D, num_experts=E, **overrides)
    with pytest.raises(ValueError) as info:
        S2MoEConfig(**kw) if entry == "config" else S2MoELayer(**kw)
    for frag in fragments:
        assert frag in str(info.value)


# ---- expert parallel: the routers are replicated, routing is per token ------------------------
def _ep_body(rank, world, router_type):
    import torch.distributed as dist
    kw = dict(hidden_size=D, num_experts=E, k=2, ffn_hidden_size=H, router_type=router_type, moe_type="smoe")
    torch.manual_seed(0)
    ref = S2MoELayer(ep_size=1, **kw)
    ep = S2MoELayer(ep_size=world, **kw)
    e0, el = ep.first_expert, ep.num_local_experts
    with torch.no_grad():
        for name, p in ep.router.named_parameters():
            p.copy_(dict(ref.router.named_parameters())[name])
        ep.experts.w1.copy_(ref.experts.w1[e0:e0 + el])
        ep.experts.w2.copy_(ref.experts.w2[e0:e0 + el])
    xs = torch.randn(world, 12, D, generator=torch.Generator().manual_seed(1))
    y, l_aux, _ = ep(xs[rank])
    (y.square().sum() + l_aux).backward()
    ys, losses = [], 0.0
    for r in range(world):  # each rank's tokens through the single-process layer
        yr, lr, _ = ref(xs[r])
        ys.append(yr)
        losses = losses + yr.square().sum() + lr
    losses.backward()
    torch.testing.assert_close(y, ys[rank], rtol=1e-5, atol=1e-5)
    for name, p in ep.router.named_parameters():  # replicated: gradients sum over ranks
        dist.all_reduce(p.grad)
        torch.testing.assert_close(p.grad, dict(ref.router.named_parameters())[name].grad, rtol=1e-4, atol=1e-6)
    return True


@pytest.mark.parametrize("router_type", ["xmoe", "stablemoe"])
def test_router_variants_under_expert_parallelism(router_type):
    from dist_utils import run_distributed
    assert run_distributed(_ep_body, world_size=2, args=(router_type,), timeout=120) == [True, True]
