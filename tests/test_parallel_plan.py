"""The parallel plan (s2moe_dist/parallel/plan.py) in one process: its builder's defaults and
errors, the dispatcher built from it, and a layer given a plan before it draws its experts.

Reference for the experts: the ep_size=1 layer built from the same seed holds every expert; a
layer whose plan puts it at EP rank r must hold exactly its slice [r * E_local, (r+1) * E_local).
Plans with ep_size > 1 are made here as ParallelPlan(...) directly (no process group needed until
the first dispatch). Multi-rank plans (ranks, groups, TP): test_parallel_plan_dist.py."""
import dataclasses

import pytest
import torch

from s2moe_dist.moe import S2MoELayer
from s2moe_dist.moe.a2a_dispatcher import AllToAllDispatcher
from s2moe_dist.moe.dispatcher import Dispatcher, LocalDispatcher, build_dispatcher
from s2moe_dist.moe.tp_dispatcher import TensorParallelDispatcher
from s2moe_dist.parallel.plan import ParallelPlan, make_parallel_plan

D, E, H = 8, 4, 16


def _layer(ep_size=1, plan=None, seed=0, **kw):
    torch.manual_seed(seed)
    return S2MoELayer(hidden_size=D, num_experts=E, k=2, ffn_hidden_size=H, ep_size=ep_size, plan=plan, **kw)


def test_default_plan_is_one_process_without_torch_distributed():
    assert not torch.distributed.is_initialized()
    plan = make_parallel_plan()
    assert plan == ParallelPlan(ep_size=1, ep_rank=0, ep_group=None, tp_size=1, tp_rank=0, tp_group=None,
                                shard_experts=False)
    assert not plan.tensor_parallel and plan.first_expert(4) == 0
    assert _layer().plan == plan


def test_plan_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        ParallelPlan().ep_rank = 1


@pytest.mark.parametrize("kwargs, fragments", [
    (dict(ep_size=0), ["make_parallel_plan.ep_size=0 is invalid", "integer >= 1"]),
    (dict(ep_size=True), ["make_parallel_plan.ep_size=True is invalid"]),
    (dict(ep_size=2), ["make_parallel_plan.ep_size=2 needs torch.distributed initialized",
                       "torch.distributed.init_process_group()", "or use ep_size=1"]),
    (dict(ep_size=2, owner="S2MoEConfig"), ["S2MoEConfig.ep_size=2 needs torch.distributed"]),
])
def test_builder_errors_name_the_argument_and_the_fix(kwargs, fragments):
    with pytest.raises(ValueError) as info:
        make_parallel_plan(**kwargs)
    for frag in fragments:
        assert frag in str(info.value), (frag, str(info.value))


def test_registered_groups_refused_when_none_is_registered():
    from s2moe_dist.config import S2MoEConfig
    with pytest.raises(ValueError, match=r"from_registered_groups\(\): no tensor-parallel group is registered; "
                                         r"call s2moe_dist.integrations.megatron.use_megatron_parallel_state\(\)"):
        ParallelPlan.from_registered_groups(S2MoEConfig(hidden_size=D, num_experts=E, ffn_hidden_size=H))


def test_every_dispatcher_declares_the_protocol():
    for cls in (LocalDispatcher, AllToAllDispatcher, TensorParallelDispatcher):
        assert Dispatcher in cls.__mro__, cls  # declared, not only shaped alike
    local = build_dispatcher(ParallelPlan(), E)
    assert type(local) is LocalDispatcher and isinstance(local, Dispatcher)
    group = object()  # an explicit EP group is used as given (no collective until a call)
    a2a = build_dispatcher(ParallelPlan(ep_size=2, ep_rank=1, ep_group=group), E)
    assert type(a2a) is AllToAllDispatcher and a2a.group is group and a2a.num_local_experts == 2


def test_layer_draws_the_experts_of_its_plans_rank():
    full = _layer()
    for rank in (0, 1):
        layer = _layer(ep_size=2, plan=ParallelPlan(ep_size=2, ep_rank=rank))
        assert layer.first_expert == layer.experts.first_expert == 2 * rank and layer.ep_rank == rank
        assert torch.equal(layer.experts.w1, full.experts.w1[2 * rank:2 * rank + 2])
        assert torch.equal(layer.experts.w2, full.experts.w2[2 * rank:2 * rank + 2])
        assert layer.tp_plan is None


def test_set_parallel_plan_moves_to_the_same_experts_of_the_new_rank():
    full = _layer()
    layer = _layer(ep_size=2, plan=ParallelPlan(ep_size=2, ep_rank=0))
    layer.set_parallel_plan(ParallelPlan(ep_size=2, ep_rank=1, ep_group=object()))
    assert layer.first_expert == 2 and torch.equal(layer.experts.w1, full.experts.w1[2:])
    assert type(layer.dispatcher) is AllToAllDispatcher and layer.dispatcher.group is layer.plan.ep_group
    layer.set_expert_parallel_rank(0)  # the older call goes through the plan
    assert layer.plan.ep_rank == 0 and torch.equal(layer.experts.w1, full.experts.w1[:2])


def test_plans_that_do_not_fit_the_layer_are_refused():
    with pytest.raises(ValueError, match=r"S2MoE\(plan=...\) has ep_size=2 but S2MoEConfig.ep_size=1; they must "
                                         r"be equal"):
        _layer(plan=ParallelPlan(ep_size=2))
    with pytest.raises(ValueError, match=r"S2MoE\(plan='ep2'\) is invalid: must be a "
                                         r"s2moe_dist.parallel.plan.ParallelPlan"):
        _layer(plan="ep2")
    layer = _layer(ep_size=2, plan=ParallelPlan(ep_size=2))
    with pytest.raises(ValueError, match="set_parallel_plan: the plan has TP size 2"):
        layer.set_parallel_plan(ParallelPlan(ep_size=2, tp_size=2, tp_group=object()))
    assert layer.plan == ParallelPlan(ep_size=2)  # a refused plan changes nothing


def test_a_plan_is_refused_when_the_experts_changed_since_they_were_drawn():
    layer = _layer(ep_size=2, plan=ParallelPlan(ep_size=2, ep_rank=0))
    with torch.no_grad():
        layer.experts.w1.add_(1.0)
    with pytest.raises(RuntimeError, match="changed since they were drawn"):
        layer.set_parallel_plan(ParallelPlan(ep_size=2, ep_rank=1))
    assert layer.plan.ep_rank == 0


def test_a_dispatcher_of_ones_own_is_kept_when_the_plan_changes():
    layer = _layer(ep_size=2, plan=ParallelPlan(ep_size=2, ep_rank=0))
    own = LocalDispatcher(E)
    layer.set_dispatcher(own)
    layer.set_parallel_plan(ParallelPlan(ep_size=2, ep_rank=1))
    assert layer.dispatcher is own
