"""Tensor-parallel layout without process groups: topology errors, rank layouts against DeepSpeed's,
expert shards (math, init, checkpoint conversion between TP sizes), the missing-TP-group error."""
import re

import pytest
import torch
import torch.nn.functional as F

from s2moe_dist.moe import S2MoELayer
from s2moe_dist.moe.experts import ExpertBank
from s2moe_dist.moe.tp_shards import (merge_expert_state, reshard_expert_state, shard_tensor,
                                      split_expert_state)
from s2moe_dist.parallel.topology import expert_parallel_rank, expert_tp_ranks, validate_topology

GOOD = dict(world_size=8, tp_size=2, ep_size=2, num_experts=8, hidden_size=64, ffn_hidden_size=256)


@pytest.mark.parametrize("change, message", [
    (dict(world_size=3), "tp_size=2 is invalid: it must divide the world size (3), which factors as TP x DP; "
                         "choose tp_size among [1, 3]"),
    (dict(ep_size=8), "ep_size=8 is invalid: with experts split over TP (enable_expert_tensor_parallelism) "
                      "expert groups live inside a data-parallel group, so ep_size must divide the data-parallel "
                      "size world_size/tp_size = 8/2 = 4; choose ep_size among [1, 2, 4]"),
    (dict(num_experts=6), "num_experts=6 is invalid: it must be divisible by ep_size (4)"),
    (dict(hidden_size=63), "hidden_size=63 is invalid: it must be divisible by tp_size (2) for the "
                           "tensor-parallel layers; choose tp_size among [1, 3, 7, 9, 21, 63]"),
    (dict(ffn_hidden_size=255), "ffn_hidden_size=255 is invalid: it must be divisible by tp_size (2) to split "
                                "each expert over TP; choose tp_size among [1, 3, 5, 15, 17, 51, 85, 255]"),
    (dict(tp_size=0), "tp_size=0 is invalid: must be an integer >= 1"),
])
def test_bad_topologies_fail_with_clear_errors(change, message):
    args = {**GOOD, **change}
    if "num_experts" in change and "ep_size" not in change:
        args["ep_size"] = 4
    with pytest.raises(ValueError) as e:
        validate_topology(**args)
    assert str(e.value).startswith(message), str(e.value)


def test_good_topologies_pass():
    validate_topology(**GOOD)
    validate_topology(world_size=4, tp_size=2, ep_size=2, num_experts=4, hidden_size=16, ffn_hidden_size=32)
    validate_topology(world_size=1, tp_size=1, ep_size=1, num_experts=1, hidden_size=3, ffn_hidden_size=5)
    # experts whole on every rank: EP groups may span TP peers, EP divides the world (not DP)
    validate_topology(world_size=8, tp_size=2, ep_size=8, num_experts=8, hidden_size=64, ffn_hidden_size=255,
                      enable_expert_tensor_parallelism=False)
    with pytest.raises(ValueError, match=re.escape("ep_size=3 is invalid: it must divide the world size (8)")):
        validate_topology(world_size=8, tp_size=2, ep_size=3, num_experts=6, hidden_size=64, ffn_hidden_size=64,
                          enable_expert_tensor_parallelism=False)


@pytest.mark.parametrize("world, tp, ep", [(4, 2, 2), (4, 2, 1), (8, 2, 2), (16, 2, 4), (8, 4, 2), (8, 1, 4)])
def test_expert_groups_match_deepspeed_e_m_d_layout(world, tp, ep):
    from deepspeed.utils.groups import _get_expert_parallel_ranks
    ds_ep, ds_edp = _get_expert_parallel_ranks(world, tp, ep)
    ours_ep, ours_edp = expert_tp_ranks(world, tp, ep)
    assert ours_ep == [list(g) for g in ds_ep]
    assert ours_edp == [list(g) for g in ds_edp]
    for group in ours_ep:
        for position, rank in enumerate(group):
            assert expert_parallel_rank(rank, tp, ep, enable_expert_tensor_parallelism=True) == position


def _ffn(x, w1, b1, w2, b2, activation):
    h = x @ w1 + b1
    if activation == "swiglu":
        a, b = h.chunk(2, dim=-1)
        h = F.silu(a) * b
    else:
        h = F.gelu(h)
    return h @ w2 + b2


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("tp", [2, 4])
def test_shards_compute_the_full_expert(activation, tp):
    """sum over TP ranks of act(x W1_t + b1_t) W2_t, plus b2 once, is the full expert."""
    torch.manual_seed(0)
    d, h = 8, 16
    width = 2 * h if activation == "swiglu" else h
    x, w1, b1 = torch.randn(5, d), torch.randn(d, width), torch.randn(width)
    w2, b2 = torch.randn(h, d), torch.randn(d)
    sw = activation == "swiglu"
    partial = sum(_ffn(x, shard_tensor("w1", w1, t, tp, sw), shard_tensor("b1", b1, t, tp, sw),
                       shard_tensor("w2", w2, t, tp, sw), torch.zeros(d), activation) for t in range(tp))
    torch.testing.assert_close(partial + b2, _ffn(x, w1, b1, w2, b2, activation))


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_expert_init_does_not_depend_on_tp(activation):
    torch.manual_seed(7)
    full = ExpertBank(2, 8, 16, activation, first_expert=2)
    shards = []
    for t in range(2):
        torch.manual_seed(7)
        shards.append(ExpertBank(2, 8, 16, activation, first_expert=2, tp_size=2, tp_rank=t))
    merged = merge_expert_state([s.state_dict() for s in shards])
    for name, value in full.state_dict().items():
        assert torch.equal(merged[name], value), name
    assert shards[0].w1.shape == (2, 8, 16 if activation == "swiglu" else 8)
    assert shards[0].w2.shape == (2, 8, 8)


def _state(activation, key_style):
    torch.manual_seed(1)
    layer = S2MoELayer(hidden_size=8, num_experts=4, k=2, ffn_hidden_size=16, activation=activation,
                       expert_bias=True)
    state = layer.state_dict()
    if key_style == "deepspeed":  # DeepSpeed's per-expert checkpoint keys
        from s2moe_dist.integrations.ds_checkpoint import split_expert_state as ds_split
        ds_split(layer, state, "", {})
    return state


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("key_style", ["bank", "deepspeed"])
def test_checkpoint_tp2_to_tp1_and_back(activation, key_style):
    full = _state(activation, key_style)
    shards = split_expert_state(full, 2)
    expert_keys = [k for k in full if re.search(r"experts\.(\d+\.)?(w1|w2|b1)$", k)]
    assert expert_keys
    for key in expert_keys:  # every expert tensor is really split, in the documented layout
        dim = -2 if key.endswith("w2") else -1
        assert shards[0][key].shape[dim] * 2 == full[key].shape[dim], key
    sw = activation == "swiglu"
    w1_key = next(k for k in full if k.endswith("w1"))
    gate_cols = full[w1_key].shape[-1] // 2 if sw else full[w1_key].shape[-1]
    own = full[w1_key][..., : gate_cols // 2]  # TP rank 0: first half of the (gate) columns
    assert torch.equal(shards[0][w1_key][..., : own.shape[-1]], own)
    merged = merge_expert_state(shards)  # TP=2 -> 1
    assert merged.keys() == full.keys()
    for key in full:
        assert torch.equal(merged[key], full[key]), key
    four = reshard_expert_state(shards, 4)  # TP=2 -> 4 -> 1
    assert len(four) == 4
    back = reshard_expert_state(four, 1)[0]
    for key in full:
        assert torch.equal(back[key], full[key]), key


def test_merge_refuses_shards_that_disagree_on_replicated_weights():
    shards = split_expert_state(_state("gelu", "bank"), 2)
    shards[1]["router.weight"] = shards[1]["router.weight"] + 1
    with pytest.raises(ValueError, match=r"router.weight differs between TP shard 0 and 1: it must be replicated"):
        merge_expert_state(shards)


def test_expert_tensor_parallelism_without_tp_group_is_an_error():
    with pytest.raises(ValueError, match=re.escape(
            "S2MoEConfig.enable_expert_tensor_parallelism=True is invalid here: no tensor-parallel group is "
            "registered. With Megatron, call megatron.core.parallel_state.initialize_model_parallel(")):
        S2MoELayer(hidden_size=8, num_experts=4, enable_expert_tensor_parallelism=True)
