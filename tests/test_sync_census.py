"""Host syncs of the MoE layer, counted on CPU by SyncCensus (s2moe_dist/testing/sync_census.py).

Part 1 checks the counter on snippets whose CUDA syncs are known. Part 2 counts a layer training
step (forward + backward): dropless, 0 syncs at EP=1 and exactly 1 at EP=2 (the split sizes of the
all-to-all); with capacity drops, one more (the dropped-slot count that sizes the kept rows).
A failure lists every remaining site (file:line op).
"""
import inspect

import pytest
import torch

from dist_utils import run_distributed
from s2moe_dist.moe import S2MoELayer
from s2moe_dist.moe import dispatcher as dispatcher_module
from s2moe_dist.moe.router import expert_counts
from s2moe_dist.testing.sync_census import SyncCensus

D, E, H, T = 16, 8, 32, 24  # fp32 rows 64 bytes: grouped_mm's aligned path, as on a GPU


def _count(fn) -> SyncCensus:
    with SyncCensus() as census:
        fn()
    return census


# ---- the counter ----------------------------------------------------------------------------
@pytest.mark.parametrize("snippet, syncs", [
    (lambda x, i: x.sum().item(), 1),
    (lambda x, i: int(i.sum()), 1),
    (lambda x, i: bool((x > 0).any()), 1),
    (lambda x, i: torch.bincount(i, minlength=4), 2),
    (lambda x, i: x[x > 0], 1),
    (lambda x, i: x[i], 0),                       # integer index: sizes known
    (lambda x, i: i.nonzero(), 1),
    (lambda x, i: i.tolist(), 1),
    (lambda x, i: x.cpu(), 1),
    (lambda x, i: torch.repeat_interleave(x, i, dim=0), 1),
    (lambda x, i: torch.repeat_interleave(x, i, dim=0, output_size=13), 0),
    (lambda x, i: torch.argsort(i, stable=True).cumsum(0), 0),
    (lambda x, i: expert_counts(i, 4), 0),
])
def test_counts_known_snippets(snippet, syncs):
    x, i = torch.randn(10, 4), torch.arange(10) % 4
    census = _count(lambda: snippet(x, i))
    assert census.total == syncs, census.report()


def test_counts_backward_and_attributes_to_the_package_frame():
    x = torch.randn(10, 4, requires_grad=True)
    census = _count(lambda: x[x > 0].sum().backward())  # mask index forward, mask index_put backward
    assert census.total == 2, census.report()
    assert all(site.startswith("tests/test_sync_census.py:") for site in census.by_site), census.by_site

    line = next(n for n, text in enumerate(inspect.getsourcelines(dispatcher_module)[0], 1)
                if "dropped = int(num_dropped)" in text)
    idx = torch.tensor([[0, -1], [1, 1]])
    census = _count(lambda: dispatcher_module.sort_slots(idx, torch.ones(2, 2), 2))  # drops unknown: counted
    assert census.by_site == {f"moe/dispatcher.py:{line} _local_scalar_dense": 1}


def test_simulate_device_off_ignores_cpu_tensors_and_methods_are_restored():
    tolist = torch.Tensor.tolist
    with SyncCensus(simulate_device=False) as census:
        torch.arange(4).tolist()
        torch.arange(4).sum().item()
    assert census.total == 0, census.report()
    assert torch.Tensor.tolist is tolist


# ---- the layer ------------------------------------------------------------------------------
def _layer_step_census(moe_type, k, drop_tokens, ep_size=1):
    torch.manual_seed(0)
    layer = S2MoELayer(hidden_size=D, num_experts=E, k=k, ffn_hidden_size=H, moe_type=moe_type,
                       ep_size=ep_size, drop_tokens=drop_tokens, capacity_factor=1.0).train()
    x = torch.randn(T, D, requires_grad=True)
    layer(x)  # first call: lazy dispatcher / group set-up is not a step
    with SyncCensus() as census:
        y, l_aux, _ = layer(x)
        (y.square().sum() + layer.aux_loss()).backward()
    return census


MODES = [(m, k) for m in ("s2moe", "smoe") for k in (1, 2)]


@pytest.mark.parametrize("moe_type, k", MODES)
@pytest.mark.parametrize("drop_tokens, expected", [(False, 0), (True, 1)])
def test_layer_step_syncs_ep1(moe_type, k, drop_tokens, expected):
    census = _layer_step_census(moe_type, k, drop_tokens)
    assert census.total == expected, f"{census.total} host syncs, expected {expected}:\n{census.report()}"


def _ep_body(rank, world):
    return {f"{m} k={k} drop={d}": _layer_step_census(m, k, d, ep_size=world).by_site
            for m, k in MODES for d in (False, True)}


def test_layer_step_syncs_ep2():
    for rank, result in enumerate(run_distributed(_ep_body, world_size=2)):
        for case, by_site in result.items():
            expected = 2 if "drop=True" in case else 1
            report = "\n".join(f"  {n}  {site}" for site, n in sorted(by_site.items()))
            assert sum(by_site.values()) == expected, f"rank {rank} {case}: expected {expected}:\n{report}"
            assert any("a2a_dispatcher.py" in site and "tolist" in site for site in by_site), report
