"""The same seed gives the same experts, per global expert id, whatever ep_size: also in DeepSpeed's
D+E layout (``use_data_before_expert_parallel_``), where a rank's place in its expert-parallel
group is not the one the layer assumes when it is built (global rank % ep_size).

Reference: the ep_size=1 layer built from the same seed holds every expert; a rank's experts
must be its slice ``[p * E_local, (p + 1) * E_local)``, p its position in DeepSpeed's EP group
(read from the group's member list, not from the layer). 4 gloo ranks, ep_size=2, so data
parallel 2: the D+E layout puts rank 1 at position 0 of its group and rank 2 at position 1
(DeepSpeed then broadcasts each position's experts from one rank of the group holding them)."""
import torch
import torch.distributed as dist

from deepspeed_tiny_train import TinyMoEModel, ds_config
from dist_utils import run_distributed

EP = 2


def _experts_match(ref, engine_model, rank):
    from deepspeed.utils import groups
    out = []
    for full, moe in zip(ref.moes, engine_model.moes):
        members = dist.get_process_group_ranks(groups._get_expert_parallel_group(moe.expert_group_name))
        lo = members.index(rank) * moe.num_local_experts
        hi = lo + moe.num_local_experts
        out.append({"position": members.index(rank), "first_expert": moe.first_expert, "local": moe.num_local_experts,
                    "w1": torch.equal(moe.experts.w1, full.experts.w1[lo:hi]),
                    "w2": torch.equal(moe.experts.w2, full.experts.w2[lo:hi])})
    return out


def _body(rank, world):
    import deepspeed
    from s2moe_dist import S2MoE
    torch.manual_seed(0)
    ref = TinyMoEModel(S2MoE, ep_size=1)
    torch.manual_seed(0)
    model = TinyMoEModel(S2MoE, ep_size=EP)
    cfg = {**ds_config(), "use_data_before_expert_parallelism": True}  # DeepSpeed JSON key of the D+E layout
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg,
                                      optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    result = {"layers": _experts_match(ref, engine.module, rank)}
    # experts changed after construction (a load, a step) cannot be redrawn: refused, not overwritten
    torch.manual_seed(0)
    changed = TinyMoEModel(S2MoE, ep_size=EP)
    with torch.no_grad():
        changed.moes[0].experts.w1.add_(1.0)
    try:
        changed.moes[0].set_deepspeed_parallelism(use_data_before_expert_parallel_=True)
        result["refused"] = None
    except RuntimeError as e:
        result["refused"] = str(e)
    return result


def test_same_seed_same_experts_in_the_data_before_expert_layout():
    results = run_distributed(_body, world_size=4, use_deepspeed=True, timeout=240)
    positions = [r["layers"][0]["position"] for r in results]
    assert positions != [rank % EP for rank in range(4)], positions  # the layout under test differs
    for rank, r in enumerate(results):
        for layer in r["layers"]:
            assert layer["w1"] and layer["w2"], (rank, layer)
            assert layer["first_expert"] == layer["position"] * layer["local"], (rank, layer)
    for rank, r in enumerate(results):
        moved = positions[rank] != rank % EP
        if moved:
            assert r["refused"] and "changed since they were drawn" in r["refused"], r["refused"]
        else:
            assert r["refused"] is None, r["refused"]
