"""Kernel launches of a layer training step, counted as aten compute ops (benchmarks/op_count.py:
a TorchDispatchMode over forward + backward; views, metadata queries and fill-less allocations are
not compute ops). On a GPU the expert GEMMs at the paper shape take tens of microseconds, so the
launch count sets the step time: S2MoE top-1 (same expert rows as SMoE top-2) must stay within
1.3x SMoE top-2's count."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from op_count import AtenComputeOps, count_training_step, is_compute_op  # noqa: E402

from s2moe_dist.moe.layer import S2MoELayer  # noqa: E402


def small_layer(moe_type, k, **kw):
    """The paper layer's structure (16 experts, gelu) at a small width; T > infonce_max_tokens so the
    InfoNCE sample is drawn, as at the paper shape (8k tokens, 1024 sampled)."""
    torch.manual_seed(0)
    return S2MoELayer(32, num_experts=16, k=k, ffn_hidden_size=64, activation="gelu", moe_type=moe_type,
                      infonce_max_tokens=64, **kw)


@pytest.fixture(scope="module")
def counts():
    return {name: count_training_step(small_layer(mt, k), tokens=256, by_site=True)
            for name, (mt, k) in {"s2moe_top1": ("s2moe", 1), "smoe_top2": ("smoe", 2)}.items()}


def test_s2moe_top1_step_is_within_1_3x_the_ops_of_smoe_top2(counts):
    s2, sm = counts["s2moe_top1"], counts["smoe_top2"]
    ratio = s2.total / sm.total
    sites = ", ".join(f"{k} {v}" for k, v in s2.by_site.most_common(12))
    assert ratio <= 1.3, f"S2MoE top-1 {s2.total} ops vs SMoE top-2 {sm.total} ({ratio:.2f}x); top sites: {sites}"


def test_the_count_sees_forward_and_backward(counts):
    """Each step runs the two expert GEMMs forward and four backward (grouped_mm), whatever the layer;
    InfoNCE's and the noise module's ops are all there for S2MoE and none for SMoE."""
    for c in counts.values():
        assert c.by_op["_grouped_mm"] == 6
    s2_sites, sm_sites = counts["s2moe_top1"].by_site, counts["smoe_top2"].by_site
    assert any(s.startswith("moe/infonce.py") for s in s2_sites) and any(s.startswith("moe/noise.py") for s in s2_sites)
    assert not any(s.startswith(("moe/infonce.py", "moe/noise.py")) for s in sm_sites)


def test_views_metadata_and_empty_allocations_are_not_compute_ops():
    x = torch.randn(4, 6)
    with AtenComputeOps() as ops:
        x.view(6, 4).t().unsqueeze(0).expand(3, 4, 6)[:, 1:].reshape(-1, 6)  # views (one copy: reshape)
        torch.empty(5)
        x.size(0), x.stride()
    assert dict(ops.by_op) == {"clone": 1}  # reshape of the non-contiguous slice copies; nothing else counts
    assert is_compute_op(torch.ops.aten.mm.default) and is_compute_op(torch.ops.aten.add_.Tensor)
    assert not is_compute_op(torch.ops.aten.view.default) and not is_compute_op(torch.ops.aten.empty.memory_format)
