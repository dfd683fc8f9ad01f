"""Expert FLOPs measured with torch.utils.flop_counter.FlopCounterMode.

FlopCounterMode in torch 2.13 has no formula for ``aten._grouped_mm`` (it counts it as 0 FLOPs),
so the built-in expert bank's grouped GEMMs are counted with the formula registered below through
FlopCounterMode's ``custom_mapping`` argument. The per-expert fallback (odd sizes) and the
user-module experts run ``mm`` / ``addmm``, which FlopCounterMode counts natively: they check the
same ratios without the custom formula.
"""
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from s2moe_dist import S2MoELayer as S2MoE  # the pure PyTorch layer


def grouped_mm_flop(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """2 * multiply-adds of aten._grouped_mm. With offsets, the groups partition one dimension:
    2d x 3d ([M,K] @ [G,K,N], rows split by group) and 3d x 2d each do M*K*N multiply-adds in all;
    2d x 2d (weight gradient: [K,M] @ [M,N], M split by group) gives [G,K,N] at K*M*N;
    3d x 3d is a plain batched matmul."""
    if len(a_shape) == 2 and len(b_shape) == 3:
        return 2 * a_shape[0] * a_shape[1] * b_shape[2]
    if len(a_shape) == 3 and len(b_shape) == 2:
        return 2 * a_shape[1] * a_shape[2] * b_shape[1]
    if len(a_shape) == 2 and len(b_shape) == 2:
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]
    return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[2]


def test_flop_counter_does_not_count_grouped_mm_without_the_formula():
    """Documents why the formula is registered: drop it if a later torch counts grouped_mm."""
    x, w = torch.randn(8, 4), torch.randn(2, 4, 4)
    offs = torch.tensor([3, 8], dtype=torch.int32)
    with FlopCounterMode(display=False) as plain:
        torch.nn.functional.grouped_mm(x, w, offs=offs)
    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten._grouped_mm: grouped_mm_flop}) as counted:
        torch.nn.functional.grouped_mm(x, w, offs=offs)
    assert plain.get_total_flops() == 0
    assert counted.get_total_flops() == 2 * 8 * 4 * 4  # same as one dense [8,4] @ [4,4]


def expert_flops(layer, x):
    """FLOPs spent inside ``layer.experts`` (router, gate and losses excluded) for one forward."""
    with torch.no_grad(), FlopCounterMode(display=False,
                                          custom_mapping={torch.ops.aten._grouped_mm: grouped_mm_flop}) as fc:
        _, _, counts = layer(x)
    per_module = fc.get_flop_counts()
    key = [k for k in per_module if k.endswith(".experts")]
    assert len(key) == 1, list(per_module)
    return sum(per_module[key[0]].values()), int(counts.sum())


@pytest.mark.parametrize("d,h,activation", [(16, 32, "gelu"), (16, 32, "swiglu"), (7, 5, "relu")],
                         ids=["grouped-gelu", "grouped-swiglu", "fallback-odd"])
def test_eval_is_half_of_training_and_eval_k1_half_of_eval_k2(d, h, activation):
    T, E = 64, 8
    torch.manual_seed(0)
    layer = S2MoE(d, num_experts=E, k=2, ffn_hidden_size=h, activation=activation)
    x = torch.randn(T, d)
    width = 2 * h if activation == "swiglu" else h
    per_slot = 2 * (d * width + h * d)  # W1 then W2, per routed (token, expert) slot

    train, train_slots = expert_flops(layer.train(), x)
    eval_k2, eval_slots = expert_flops(layer.eval(), x)
    layer.config.eval_k = 1
    eval_k1, eval_k1_slots = expert_flops(layer, x)

    assert (train_slots, eval_slots, eval_k1_slots) == (2 * T * 2, T * 2, T)
    assert train == per_slot * train_slots  # every expert FLOP is counted, grouped_mm included
    assert eval_k2 * 2 == train             # eval "clean": ONE stream
    assert eval_k1 * 2 == eval_k2           # eval_k=1 halves it again


def test_user_expert_module_eval_is_half_of_training():
    torch.manual_seed(0)
    layer = S2MoE(8, nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)), num_experts=4, k=2, eval_k=1,
                  drop_tokens=False, use_rts=False, top2_2nd_expert_sampling=False)
    x = torch.randn(32, 8)
    train, _ = expert_flops(layer.train(), x)
    layer.eval()
    eval_k1, _ = expert_flops(layer, x)
    layer.config.eval_k = 2
    eval_k2, _ = expert_flops(layer, x)
    assert train == 2 * 32 * 2 * (2 * 8 * 16 * 2) and eval_k2 * 2 == train and eval_k1 * 2 == eval_k2


def test_grouped_mm_backward_flops_are_counted_too():
    """Backward of the bank: 2x the forward expert FLOPs (input and weight gradients)."""
    torch.manual_seed(0)
    layer = S2MoE(16, num_experts=4, k=2, ffn_hidden_size=32, moe_type="smoe", activation="relu")
    x = torch.randn(32, 16, requires_grad=True)  # so W1's grouped GEMM also has an input gradient
    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten._grouped_mm: grouped_mm_flop}) as fc:
        y, _, _ = layer(x)
        fwd = fc.get_flop_counts()["Global"][torch.ops.aten._grouped_mm]
        y.sum().backward()
    total = fc.get_flop_counts()["Global"][torch.ops.aten._grouped_mm]
    assert fwd == 32 * 2 * 2 * (16 * 32 + 32 * 16) and total == 3 * fwd
