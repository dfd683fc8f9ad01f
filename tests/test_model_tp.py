"""The character LM under Megatron tensor parallelism (issue 5).

- The model: at TP=2 (Megatron's parallel_state, ColumnParallelLinear/RowParallelLinear on CPU,
  experts split over TP) the logits, loss and every gradient equal the TP=1 model built from the
  same seed in the same process (plain torch.nn.Linear, no Megatron): dense shards are slices
  of the TP=1 tensors, replicated tensors equal.
- s2moe-train, ZeRO 1, 5 steps, TP=2 on 2 ranks (DP=1) against TP=1 on 1 rank, same batches:
  losses and gradient norms (clipping acts) match to 1e-4 relative, with experts split over TP
  and with whole experts at EP=2 (ZeRO's norm used to miss TP rank 1's experts: 2e-3 off); a
  TP=2 run resumed from its step-3 checkpoint continues the TP=1 curve; s2moe-eval merges the
  TP shards into one model whose BPC equals the TP=1 checkpoint's.
- Bad topologies through the run config fail with a message naming the field before any
  process group exists.
"""
import json
import os
import shutil

import pytest
import torch

from dist_utils import run_distributed
from train_ranks import ROOT, TINY, Ranks, losses, metrics

ZERO1 = os.path.join(ROOT, "configs", "deepspeed", "zero1_fp32.json")
STEPS = 5
SETTINGS = [f"train.steps={STEPS}", "model.seq_len=16", "model.d_model=32", "model.n_heads=4", "model.d_ff=64",
            "model.moe_every=2", "model.moe.num_experts=4", "model.moe.ffn_hidden_size=32",
            "model.moe.enable_expert_tensor_parallelism=true", "train.batch_size=4", "train.warmup_steps=0",
            "train.lr_schedule=constant", "train.log_every=1", "train.eval_every=0", "train.eval_windows=4",
            "train.ckpt_every=3", "train.progress=false"]
BASE = ["--config", TINY, "--deepspeed", ZERO1, "--set", *SETTINGS]
REL = 1e-4


# ---- the model, TP=2 against TP=1 -----------------------------------------------------------------
def _model_body(rank, world):
    from megatron.core import parallel_state as ps

    from s2moe_dist.model import CharLM, ModelConfig, lm_loss, set_linear_factory
    from s2moe_dist.parallel.tensor_parallel import set_tensor_parallel_group
    from s2moe_dist.train.distributed import init_model_parallel

    cfg = dict(vocab_size=11, seq_len=8, n_layers=2, d_model=16, n_heads=4, d_ff=32, moe_every=2,
               pos_encoding="rotary", moe={"num_experts": 4, "k": 2, "ffn_hidden_size": 16, "activation": "swiglu",
                                           "expert_bias": True, "enable_expert_tensor_parallelism": True})
    idx = torch.randint(0, 11, (3, 8), generator=torch.Generator().manual_seed(5))

    def run(model):
        torch.manual_seed(9)  # the S2MoE noise: the same draws at both TP sizes
        parts = lm_loss(model, model(idx), idx.roll(-1, 1))
        parts.total.backward()
        return parts.total.item(), {n: (p.detach().clone(), p.grad.clone()) for n, p in model.named_parameters()}

    torch.manual_seed(0)
    ref = run(CharLM(ModelConfig(**cfg)))  # TP=1, torch.nn.Linear, no Megatron
    layout = init_model_parallel(2)
    torch.manual_seed(0)
    model = CharLM(ModelConfig(**cfg, tp_size=2))
    kinds = {n: type(m).__name__ for n, m in model.named_modules() if n.endswith(("qkv", "proj", "fc1", "fc2"))}
    got = run(model)
    set_linear_factory(None)
    set_tensor_parallel_group(None)
    ps.destroy_model_parallel()
    return {"tp_rank": layout.tp_rank, "dp": (layout.dp_rank, layout.dp_size), "ref": ref, "got": got, "kinds": kinds}


def _tp_slice(name, full, rank):
    """The TP=2 shard of rank ``rank`` of a full (TP=1) tensor named ``name``."""
    column = (".qkv.", ".fc1.")
    if any(c in name for c in column) or (name.endswith(("experts.w1", "experts.b1"))):
        if name.endswith(("experts.w1", "experts.b1")):  # swiglu [gate | up]: same columns of each half
            gate, up = full.chunk(2, dim=-1)
            return torch.cat([gate.chunk(2, dim=-1)[rank], up.chunk(2, dim=-1)[rank]], dim=-1)
        return full.chunk(2, dim=0)[rank]
    if name.endswith(("proj.weight", "fc2.weight")):
        return full.chunk(2, dim=1)[rank]
    if name.endswith("experts.w2"):
        return full.chunk(2, dim=-2)[rank]
    return full


def test_lm_at_tp2_equals_tp1_with_the_same_seed():
    results = run_distributed(_model_body, world_size=2, timeout=240)
    for rank, res in enumerate(results):
        assert res["tp_rank"] == rank and res["dp"] == (0, 1)
        assert set(res["kinds"].values()) == {"MegatronColumnLinear", "MegatronRowLinear"}, res["kinds"]
        (ref_loss, ref), (loss, got) = res["ref"], res["got"]
        assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss), (loss, ref_loss)
        assert got.keys() == ref.keys()
        for name, (w, g) in got.items():
            rw, rg = (_tp_slice(name, t, rank) for t in ref[name])
            assert w.shape == rw.shape, (name, w.shape, rw.shape)
            torch.testing.assert_close(w, rw, rtol=0, atol=0, msg=f"weight {name}")  # init: bitwise
            torch.testing.assert_close(g, rg, rtol=1e-5, atol=1e-7, msg=f"grad {name}")


def test_model_refuses_a_tp_size_the_dense_layers_were_not_built_for():
    from s2moe_dist.model import CharLM, ModelConfig
    with pytest.raises(ValueError, match=r"^model.tp_size=2 is invalid here: the dense-layer factory builds "
                                         r"layers for TP=1"):
        CharLM(ModelConfig(vocab_size=11, d_model=16, n_heads=4, tp_size=2))


# ---- s2moe-train ------------------------------------------------------------------------------------
WHOLE = ["model.tp_size=2", "model.moe.ep_size=2", "model.moe.enable_expert_tensor_parallelism=false"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """TP=1 on 1 rank; on 2 ranks TP=2 with experts split over TP, and TP=2 with whole experts and
    EP=2 (the EP group is the TP group: each TP rank holds other experts). Side by side."""
    root = tmp_path_factory.mktemp("tp")
    started = {name: Ranks(root / name, world=w, base=BASE + extra, name=name)
               for name, w, extra in (("tp2", 2, ["model.tp_size=2"]), ("tp2_whole_ep2", 2, WHOLE), ("tp1", 1, []))}
    for name, ranks in started.items():
        assert ranks.wait() == [0] * len(ranks.procs), ranks.output()
    return {name: root / name for name in started}


def _close(a, b):
    return abs(a - b) <= REL * abs(b)


@pytest.mark.parametrize("name", ["tp2", "tp2_whole_ep2"])
def test_tp2_trains_like_tp1_under_zero1(runs, name):
    tp1, tp2 = runs["tp1"], runs[name]
    ref, got = losses(tp1), losses(tp2)
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
    for step in ref:
        assert all(_close(a, b) for a, b in zip(got[step], ref[step])), (step, got[step], ref[step])
    norms = {r["step"]: r["train/grad_norm"] for r in metrics(tp1) if "train/grad_norm" in r}
    norms2 = {r["step"]: r["train/grad_norm"] for r in metrics(tp2) if "train/grad_norm" in r}
    assert sorted(norms) == list(range(1, STEPS + 1))
    assert all(n > 1.0 for n in norms.values())  # train.grad_clip=1: clipping acts on every step
    assert all(_close(norms2[s], norms[s]) for s in norms), (norms2, norms)
    assert ref[STEPS][0] < ref[1][0]  # it learns
    # really tensor-parallel: one model file per TP rank, each with half of the qkv projection
    folder = os.path.join(str(tp2), "checkpoints", f"global_step{STEPS}")
    shards = [torch.load(os.path.join(folder, f"mp_rank_0{t}_model_states.pt"), weights_only=False)["module"]
              for t in range(2)]
    assert [s["blocks.0.attn.qkv.weight"].shape for s in shards] == [(48, 32), (48, 32)]
    assert not torch.equal(shards[0]["blocks.0.attn.qkv.weight"], shards[1]["blocks.0.attn.qkv.weight"])


def test_tp2_resumes_from_its_checkpoint(runs, tmp_path):
    tp1, tp2 = runs["tp1"], runs["tp2"]
    out = tmp_path / "resumed"
    shutil.copytree(str(tp2), str(out))
    shutil.rmtree(out / "checkpoints" / f"global_step{STEPS}")  # back to the step-3 checkpoint
    os.remove(out / "metrics.jsonl")
    resumed = Ranks(out, world=2, base=BASE + ["model.tp_size=2"], resume=True, name="resumed")
    assert resumed.wait() == [0, 0], resumed.output()
    assert "at step 3" in resumed.output()
    ref, got = losses(tp1), losses(out)
    assert sorted(got) == [4, 5]
    for step in got:
        assert all(_close(a, b) for a, b in zip(got[step], ref[step])), (step, got[step], ref[step])


def _eval(capsys, monkeypatch, out):
    from s2moe_dist.cli import eval_main
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # load_model exports them
        monkeypatch.setenv(var, os.environ.get(var, "0"))
    assert eval_main(["--checkpoint", str(out), "--split", "valid", "--max-windows", "8", "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_s2moe_eval_merges_the_tp_shards(runs, capsys, monkeypatch):
    ref = _eval(capsys, monkeypatch, runs["tp1"])
    for name in ("tp2", "tp2_whole_ep2"):
        got = _eval(capsys, monkeypatch, runs[name])
        assert got["characters_scored"] == ref["characters_scored"] == 8 * 16
        assert got["bpc"].keys() == ref["bpc"].keys() == {"1", "2"}
        for k in ref["bpc"]:
            assert _close(got["bpc"][k], ref["bpc"][k]), (name, k, got["bpc"], ref["bpc"])


# ---- bad topologies -----------------------------------------------------------------------------------
@pytest.mark.parametrize("world, override, message", [
    (3, ["model.tp_size=2"], "model.tp_size=2 is invalid: it must divide the world size (3), which factors as "
                             "TP x DP; choose tp_size among [1, 3]"),
    (4, ["model.tp_size=2", "model.moe.ep_size=4"],
     "model.moe.ep_size=4 is invalid: with experts split over TP (enable_expert_tensor_parallelism) expert groups "
     "live inside a data-parallel group, so ep_size must divide the data-parallel size world_size/tp_size = "
     "4/2 = 2"),
    (4, ["model.tp_size=2", "model.moe.ep_size=4", "model.moe.num_experts=6"],
     "model.moe.num_experts=6 is invalid: must be divisible by ep_size (4)"),
    (4, ["model.tp_size=4", "model.d_model=30", "model.n_heads=1"],
     "model.d_model=30 is invalid: must be divisible by model.tp_size (4)"),
    (4, ["model.tp_size=4", "model.d_model=32", "model.n_heads=2"],
     "model.n_heads=2 is invalid: must be divisible by model.tp_size (4): attention heads are split"),
    (4, ["model.tp_size=4", "model.moe.ffn_hidden_size=6"],
     "model.moe.ffn_hidden_size=6 is invalid: must be divisible by model.tp_size (4) to split each expert"),
    (4, ["model.tp_size=2", "train.batch_size=3"],
     "train.batch_size=3 is invalid: must be divisible by the data-parallel size (world_size / model.tp_size = "
     "4/2 = 2)"),
])
def test_bad_topologies_fail_before_any_process_group(monkeypatch, tmp_path, world, override, message):
    import torch.distributed as dist

    from s2moe_dist.train.trainer import TrainArgs, setup
    for var, value in (("RANK", "0"), ("WORLD_SIZE", str(world)), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", "1")):  # never reached: nothing may connect
        monkeypatch.setenv(var, value)
    overrides = [s for s in SETTINGS if not s.startswith("model.moe.enable")] + \
        ["model.moe.enable_expert_tensor_parallelism=true", *override]
    with pytest.raises(ValueError) as e:
        setup(TrainArgs(config=TINY, overrides=overrides, output=str(tmp_path)))
    assert str(e.value).startswith(message), str(e.value)
    assert not dist.is_initialized()


def test_offline_ep_reshard_refuses_a_tp_checkpoint(runs, tmp_path):
    from s2moe_dist.integrations.reshard import reshard_checkpoint
    src = os.path.join(str(runs["tp2"]), "checkpoints")
    with pytest.raises(ValueError, match=r"is tensor-parallel \(one model file per TP rank\); changing the EP size"):
        reshard_checkpoint(src, str(tmp_path / "out"), 2)
    assert not (tmp_path / "out").exists()
