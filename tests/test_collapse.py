"""Expert-collapse diagnostics (moe/collapse.py): identical experts measure as collapsed (cosine 1,
effective rank 1), random experts as diverse; the values in an s2moe-train run's TensorBoard
events are the ones the measure gives on the run's final weights."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from s2moe_dist.moe.collapse import collapse_stats, effective_rank, expert_outputs, mean_pairwise_cosine
from s2moe_dist.moe.layer import S2MoELayer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "..", "shared", "data", "text8-head-12.5M.gz")


def _layer(seed=0, E=8, d=16):
    torch.manual_seed(seed)
    return S2MoELayer(d, num_experts=E, k=2, ffn_hidden_size=32)


def test_identical_experts_are_collapsed():
    layer = _layer()
    with torch.no_grad():
        layer.experts.w1.copy_(layer.experts.w1[:1].expand_as(layer.experts.w1))
        layer.experts.w2.copy_(layer.experts.w2[:1].expand_as(layer.experts.w2))
    outs = expert_outputs(layer, torch.randn(64, 16))
    assert mean_pairwise_cosine(outs) == pytest.approx(1.0, abs=1e-6)
    assert effective_rank(outs) == pytest.approx(1.0, abs=1e-6)


def test_random_experts_are_diverse_and_measures_match_a_direct_computation():
    layer = _layer()
    x = torch.randn(64, 16)
    outs = expert_outputs(layer, x)
    # reference: each expert as its own two matmuls, cosines pair by pair, SVD entropy by hand
    ref = torch.stack([torch.nn.functional.gelu(x @ layer.experts.w1[e]) @ layer.experts.w2[e]
                       for e in range(8)]).detach()
    assert torch.allclose(outs, ref, atol=1e-5)
    cos = [torch.nn.functional.cosine_similarity(ref[i], ref[j], dim=-1).mean().item()
           for i in range(8) for j in range(8) if i != j]
    assert mean_pairwise_cosine(outs) == pytest.approx(sum(cos) / len(cos), abs=1e-5)
    m = ref.reshape(8, -1)
    s = np.linalg.svd((m / m.norm(dim=1, keepdim=True)).double().numpy(), compute_uv=False)
    p = s / s.sum()
    assert effective_rank(outs) == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-6)
    assert abs(mean_pairwise_cosine(outs)) < 0.3 and effective_rank(outs) > 6.0  # lower / higher than collapsed


def test_two_distinct_functions_give_rank_two():
    layer = _layer(E=4)
    with torch.no_grad():  # experts 0,1 share one function, 2,3 another
        for w in (layer.experts.w1, layer.experts.w2):
            w[1].copy_(w[0])
            w[3].copy_(w[2])
    outs = expert_outputs(layer, torch.randn(32, 16))
    assert 1.5 < effective_rank(outs) <= 2.0 + 1e-9
    assert 0.2 < mean_pairwise_cosine(outs) < 0.5  # 2 of the 6 pairs identical (1), the others ~0


def test_collapse_stats_uses_the_layer_inputs_and_draws_no_random_numbers():
    layer = _layer()
    model = torch.nn.Sequential(torch.nn.Embedding(10, 16), _Wrap(layer))
    probe = torch.arange(20).remainder(10).reshape(2, 10)
    torch.manual_seed(5)
    before = torch.get_rng_state()
    model.train()
    stats = collapse_stats(model, [(3, layer)], probe)
    assert torch.equal(before, torch.get_rng_state()) and model.training
    x = model[0](probe).reshape(-1, 16)
    outs = expert_outputs(layer, x)
    assert stats == {3: {"expert_cosine": pytest.approx(mean_pairwise_cosine(outs)),
                         "expert_effective_rank": pytest.approx(effective_rank(outs))}}


class _Wrap(torch.nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)[0]


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isfile(DATA), reason="needs ../shared/data/text8-head-12.5M.gz")
def test_s2moe_train_logs_the_collapse_tags_at_every_eval(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from s2moe_dist.train.metrics import all_tags

    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "s2moe_dist.cli", "train",
           "--config", os.path.join(ROOT, "configs", "model", "tiny.yaml"),
           "--data", DATA, "--output", str(out), "--set", "train.steps=6", "train.eval_every=3", "train.eval_windows=4",
           "train.log_every=3", "train.batch_size=4", "model.seq_len=32", "train.progress=false", "train.ckpt_every=6"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    acc = EventAccumulator(os.path.join(str(out), "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for i in (0, 1):
        for name in ("expert_cosine", "expert_effective_rank"):
            tag = f"moe/layer{i}/{name}"
            assert tag in tags and tag in all_tags([1, 2], [0, 1])
            assert [e.step for e in acc.Scalars(tag)] == [3, 6]
    # the last logged values are the measure on the final checkpoint's weights and the same probe
    # the last logged values are the measure on the final checkpoint's weights and the same probe
    ev = subprocess.run([sys.executable, "-m", "s2moe_dist.train.collapse_eval", str(out), "--data", DATA],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert ev.returncode == 0, ev.stderr[-2000:]
    final = json.loads(ev.stdout.strip().splitlines()[-1])
    assert final["step"] == 6 and sorted(final["layers"]) == ["0", "1"]
    for i, st in final["layers"].items():
        for name, v in st.items():
            assert acc.Scalars(f"moe/layer{i}/{name}")[-1].value == pytest.approx(v, rel=1e-4, abs=1e-6)
        assert -1.0 <= st["expert_cosine"] <= 1.0 and 1.0 <= st["expert_effective_rank"] <= 8.0
