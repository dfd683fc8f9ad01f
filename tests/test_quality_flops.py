"""benchmarks/quality_flops.py: the expert GEMMs FlopCounterMode cannot see (grouped_mm counts 0)
are counted from the routed rows; that count equals FlopCounterMode's count of an explicit
per-expert matmul reference over the same rows, forward and backward."""
import os
import sys

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import quality_flops  # noqa: E402

from s2moe_dist.moe.layer import S2MoELayer  # noqa: E402


def test_expert_flops_from_rows_match_a_counted_per_expert_matmul_reference():
    torch.manual_seed(0)
    layer = S2MoELayer(32, num_experts=4, k=2, ffn_hidden_size=64)
    counts = [5, 0, 9, 2]
    x = torch.randn(sum(counts), 32, requires_grad=True)
    w1 = layer.experts.w1.detach().clone().requires_grad_()
    w2 = layer.experts.w2.detach().clone().requires_grad_()
    with FlopCounterMode(display=False) as fc:
        outs = [F.gelu(chunk @ w1[e]) @ w2[e] for e, chunk in enumerate(torch.split(x, counts))]
        torch.cat(outs).backward(torch.randn(sum(counts), 32))
    assert fc.get_total_flops() == 3 * sum(counts) * quality_flops.expert_gemm_flops_per_row(layer)
    assert not quality_flops._experts_counted(layer)  # the bank's grouped_mm is invisible to the counter


def test_training_step_flops_counts_two_streams_and_top_k_rows():
    from s2moe_dist.train.config import load_run_config

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = os.path.join(root, "configs", "model", "tiny.yaml")
    runs = {}
    for name, sets in {"smoe2": ["model.moe.moe_type=smoe"], "s2moe1": ["model.moe.k=1"],
                       "s2moe2": []}.items():
        run = load_run_config(cfg, ["train.batch_size=2", "model.seq_len=16", *sets])
        run.model.vocab_size = 27
        runs[name] = quality_flops.training_step_flops(run)
    tokens = 2 * 16 * 2  # batch x seq x MoE layers (tiny.yaml: 2 layers, every FFN an MoE)
    assert runs["smoe2"]["expert_rows"] == runs["s2moe1"]["expert_rows"] == 2 * tokens
    assert runs["s2moe2"]["expert_rows"] == 4 * tokens
    assert runs["s2moe1"]["experts"] == runs["smoe2"]["experts"] > 0
    assert runs["s2moe1"]["counted"] > runs["smoe2"]["counted"]  # gate, noise-stream router, InfoNCE
