"""The parallel plan on 4 real gloo ranks: the EP/TP ranks and groups make_parallel_plan gives,
the dispatcher built from each plan, and where a registered Megatron TP group is (not) used.

- A plain layer built while Megatron's TP group is registered (use_megatron_parallel_state) stays
  plain: its output and expert gradients equal a single-process reference layer fed the same
  (TP-replicated) tokens. Before plans it silently became a TP layer whose expert gradients were
  partial on each TP rank.
- The registered group is used where a call site asks for it (ParallelPlan.from_registered_groups):
  then the expert gradients summed over the TP group equal the reference.
Expected ranks are written out from the layouts (Megatron: TP = contiguous pairs, DP strided)."""
import pytest
import torch
import torch.distributed as dist

from dist_utils import run_distributed

pytest.importorskip("megatron.core")

KW = dict(hidden_size=8, num_experts=4, k=2, ffn_hidden_size=16)


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def _run(layer, x, go):
    torch.manual_seed(5)  # the noise: the same draws for every layer and rank
    y, _, _ = layer(x)
    ((y * go).sum() + layer.aux_loss()).backward()
    return y.detach()


def _grads(layer):
    return {"w1": layer.experts.w1.grad, "w2": layer.experts.w2.grad, "router": layer.router.weight.grad}


def _registration(rank):
    """Old API only (so this part runs, and fails, on code without plans)."""
    from megatron.core import parallel_state as ps

    from s2moe_dist.integrations.megatron import use_megatron_parallel_state
    from s2moe_dist.moe import S2MoELayer
    torch.manual_seed(0)
    ref = S2MoELayer(**KW)
    ps.initialize_model_parallel(tensor_model_parallel_size=2)
    use_megatron_parallel_state()
    torch.manual_seed(0)
    plain = S2MoELayer(**KW)
    g = torch.Generator().manual_seed(1)
    x, go = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)  # the same on every rank
    y_ref, y = _run(ref, x, go), _run(plain, x, go)
    errs = {"out": _rel(y, y_ref), **{k: _rel(v, _grads(ref)[k]) for k, v in _grads(plain).items()}}
    return ref, (x, go, y_ref), {"is_tp": plain.tp_plan is not None, "errs": errs}


def _asked_for(ref, data):
    from megatron.core import parallel_state as ps

    from s2moe_dist.moe import S2MoELayer
    from s2moe_dist.parallel.plan import ParallelPlan
    x, go, y_ref = data
    torch.manual_seed(0)
    layer = S2MoELayer(config=ref.config, plan=ParallelPlan.from_registered_groups(ref.config))
    y = _run(layer, x, go)
    errs = {"out": _rel(y, y_ref)}
    for k, v in _grads(layer).items():
        if k != "router":  # experts: each TP rank ran the rows it received; the router: replicated, full
            v = v.clone()
            dist.all_reduce(v, group=ps.get_tensor_model_parallel_group())
        errs[k] = _rel(v, _grads(ref)[k])
    return {"plan": (layer.plan.tp_size, layer.plan.tp_rank, layer.plan.shard_experts),
            "dispatcher": type(layer.dispatcher).__name__, "inner": type(layer.dispatcher.inner).__name__,
            "errs": errs}


def _plans(rank):
    from megatron.core import parallel_state as ps

    from s2moe_dist.moe.dispatcher import build_dispatcher
    from s2moe_dist.parallel.groups import new_group_of_this_rank
    from s2moe_dist.parallel.plan import make_parallel_plan
    tp = ps.get_tensor_model_parallel_group()
    strided = new_group_of_this_rank([[0, 2], [1, 3]])
    sizes = dict(num_experts=4, hidden_size=8, ffn_hidden_size=16)

    def describe(plan):
        d = build_dispatcher(plan, 4)
        return {"ep": (plan.ep_size, plan.ep_rank), "tp": (plan.tp_size, plan.tp_rank, plan.shard_experts),
                "ep_ranks": dist.get_process_group_ranks(plan.dispatch_group()), "dispatcher": type(d).__name__,
                "inner": type(getattr(d, "inner", d)).__name__}

    out = {"ep2": describe(make_parallel_plan(2)),
           "ep2_tp2_split": describe(make_parallel_plan(2, tp_group=tp, shard_experts=True, **sizes)),
           "ep2_tp2_whole": describe(make_parallel_plan(2, tp_group=tp, **sizes)),
           "ep2_given": describe(make_parallel_plan(2, ep_group=strided)),
           "ep1_tp2": describe(make_parallel_plan(1, tp_group=tp, shard_experts=True, **sizes))}
    errors = {}
    for name, call in {"ep3": lambda: make_parallel_plan(3),
                       "group_size": lambda: make_parallel_plan(4, ep_group=strided),
                       "tp_strided": lambda: make_parallel_plan(1, tp_group=strided),
                       "ep4_split": lambda: make_parallel_plan(4, tp_group=tp, shard_experts=True, **sizes)}.items():
        try:
            call()
        except ValueError as e:
            errors[name] = str(e)
    out["errors"] = errors
    return out


def _body(rank, world):
    from megatron.core import parallel_state as ps

    from s2moe_dist.parallel.tensor_parallel import set_tensor_parallel_group
    ref, data, registered = _registration(rank)
    out = {"registered": registered}
    for name, part in (("asked", lambda: _asked_for(ref, data)), ("plans", lambda: _plans(rank))):
        try:
            out[name] = part()
        except (ImportError, AttributeError) as e:  # code without plans
            out[name] = {"missing": str(e)}
    set_tensor_parallel_group(None)
    ps.destroy_model_parallel()
    return out


@pytest.fixture(scope="module")
def results():
    return run_distributed(_body, world_size=4, timeout=300)


def test_plain_layer_stays_plain_while_a_megatron_tp_group_is_registered(results):
    for rank, res in enumerate(results):
        got = res["registered"]
        assert not got["is_tp"], rank
        for name, err in got["errs"].items():
            assert err < 1e-6, f"rank {rank}: {name} differs from the single-process layer (rel err {err:.2e})"


def test_registered_group_is_used_where_the_call_site_asks_for_it(results):
    for rank, res in enumerate(results):
        got = res["asked"]
        assert got.get("missing") is None, got
        assert got["plan"] == (2, rank % 2, False)
        assert (got["dispatcher"], got["inner"]) == ("TensorParallelDispatcher", "LocalDispatcher")
        for name, err in got["errs"].items():
            assert err < 1e-5, f"rank {rank}: {name} rel err {err:.2e}"


def test_plan_ranks_groups_and_dispatchers_follow_the_layouts(results):
    for rank, res in enumerate(results):
        plans = res["plans"]
        assert plans.get("missing") is None, plans
        # no TP: contiguous EP blocks, DeepSpeed's ep_size_N
        block, dp_slice = [rank // 2 * 2, rank // 2 * 2 + 1], [rank % 2, rank % 2 + 2]
        assert plans["ep2"] == {"ep": (2, rank % 2), "tp": (1, 0, False), "ep_ranks": block,
                                "dispatcher": "AllToAllDispatcher", "inner": "AllToAllDispatcher"}
        # experts split over TP: E+M+D, EP groups inside a DP group {0, 2} / {1, 3}
        assert plans["ep2_tp2_split"] == {"ep": (2, rank // 2), "tp": (2, rank % 2, True), "ep_ranks": dp_slice,
                                          "dispatcher": "TensorParallelDispatcher", "inner": "AllToAllDispatcher"}
        # whole experts under TP: TP-blind contiguous blocks (holding TP peers)
        assert plans["ep2_tp2_whole"]["ep"] == (2, rank % 2) and plans["ep2_tp2_whole"]["tp"] == (2, rank % 2, False)
        assert plans["ep2_tp2_whole"]["ep_ranks"] == block
        # a group passed in: the EP rank is the place in it
        assert plans["ep2_given"]["ep"] == (2, rank // 2) and plans["ep2_given"]["ep_ranks"] == dp_slice
        assert (plans["ep1_tp2"]["dispatcher"], plans["ep1_tp2"]["inner"]) == ("TensorParallelDispatcher",
                                                                               "LocalDispatcher")
        errors = plans["errors"]
        assert errors["ep3"] == ("make_parallel_plan.ep_size=3 is invalid: must divide the world size (4); "
                                 "choose ep_size among [1, 2, 4]")
        assert errors["group_size"].startswith("make_parallel_plan: ep_group has 2 ranks but ep_size=4; pass the EP "
                                               "group of ep_size ranks (DeepSpeed's 'ep_size_4'), or set ep_size=2")
        assert errors["tp_strided"].startswith(f"tensor-parallel group ranks {[rank % 2, rank % 2 + 2]} are invalid")
        assert errors["ep4_split"].startswith("ep_size=4 is invalid: with experts split over TP")

