"""s2moe-train end to end on 2 CPU ranks (gloo, DeepSpeed engine, ZeRO-2, expert parallel 2).

Ranks are started as plain processes with the variables a launcher sets (torchrun's RANK/...,
or srun's SLURM_PROCID/...), so the tests can signal and kill each rank like Slurm does.
One uninterrupted run is the reference: its TensorBoard events must hold every documented
tag; a SIGKILLed run resumed with --resume auto must reproduce its losses exactly; SIGUSR1
checkpoints and keeps going; SIGTERM checkpoints and exits 0.
"""
import json
import os
import signal
import subprocess
import sys

import pytest

from train_ranks import ROOT, STEPS, TIMEOUT, Ranks, losses, metrics, wait_for


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("reference") / "run"
    ranks = Ranks(out, name="reference")
    codes = ranks.wait()
    assert codes == [0, 0], ranks.output()
    return out, ranks.output()


def test_reference_run_writes_every_documented_tensorboard_tag(reference):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from s2moe_dist.train.metrics import all_tags

    out, log = reference
    acc = EventAccumulator(os.path.join(str(out), "tensorboard"), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"]) | set(acc.Tags()["histograms"])
    expected = set(all_tags([1, 2], [0, 1], "s2moe"))
    assert tags == expected
    # scalars agree with metrics.jsonl; eval logged at steps 12 and 24
    by_step = {r["step"]: r for r in metrics(out) if "train/loss_total" in r}
    for ev in acc.Scalars("train/loss_total"):
        assert ev.value == pytest.approx(by_step[ev.step]["train/loss_total"], rel=1e-6)
    assert [e.step for e in acc.Scalars("eval/bpc_k1")] == [12, 24]
    final = json.load(open(os.path.join(str(out), "final_eval.json")))
    assert acc.Scalars("eval/bpc_k2")[-1].value == pytest.approx(final["bpc_valid"]["2"], rel=1e-6)
    # the expert histogram: one bucket per expert, fractions of the routed slots summing to 1
    hist = acc.Histograms("moe/layer0/expert_fraction")[-1].histogram_value
    assert len(hist.bucket) == 8 and sum(hist.bucket) == pytest.approx(1.0)
    ratio = acc.Scalars("moe/layer0/expert_fraction_max_over_mean")[-1].value
    assert ratio == pytest.approx(max(hist.bucket) / (1 / 8), rel=1e-5)
    for tag in ("moe/layer1/gate_mean", "moe/layer1/infonce_accuracy", "moe/layer0/drop_fraction"):
        assert all(0.0 <= e.value <= 1.0 for e in acc.Scalars(tag))
    assert all(e.value == 0.0 for e in acc.Scalars("moe/layer0/drop_fraction"))  # dropless default
    # checkpoints: periodic, complete, latest points at the last one, keep_checkpoints=2
    ckpts = os.path.join(str(out), "checkpoints")
    assert sorted(n for n in os.listdir(ckpts) if n.startswith("global_step")) == ["global_step20", "global_step24"]
    assert open(os.path.join(ckpts, "latest")).read() == "global_step24"
    assert os.path.isfile(os.path.join(ckpts, "global_step24", "s2moe_complete.json"))
    assert "final validation BPC k=1" in log and "TensorBoard logs:" in log


def test_sigkill_then_resume_auto_continues_the_loss_curve_exactly(reference, tmp_path):
    ref_out, _ = reference
    out = tmp_path / "run"
    ranks = Ranks(out, name="killed")
    wait_for(lambda: max(losses(out), default=0) >= 6, ranks, what="step 6")
    ranks.signal(signal.SIGKILL)
    ranks.wait()
    done = max(losses(out))
    assert done < STEPS, "the run finished before it was killed"
    from s2moe_dist.train.checkpoint import find_resume_tag
    tag = find_resume_tag(os.path.join(str(out), "checkpoints"))
    start = int(tag[len("global_step"):])
    assert start % 4 == 0 and start <= done

    resumed = Ranks(out, resume=True, name="resumed")
    assert resumed.wait() == [0, 0], resumed.output()
    assert f"resumed from {os.path.join(str(out), 'checkpoints', tag)} at step {start}" in resumed.output()
    ref, got = losses(ref_out), losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):  # exact: same data, RNG, optimizer state
        assert got[step] == ref[step], f"step {step}: {got[step]} != {ref[step]}"
    ref_eval = [r for r in metrics(ref_out) if "eval/bpc_k1" in r][-1]
    got_eval = [r for r in metrics(out) if "eval/bpc_k1" in r][-1]
    assert got_eval == ref_eval


def test_sigusr1_checkpoints_and_sigterm_checkpoints_and_exits_0(tmp_path):
    """Ranks started like srun starts them (SLURM_PROCID / SLURM_NTASKS / SLURM_NODELIST)."""
    from s2moe_dist.train.checkpoint import COMPLETE, find_resume_tag

    out = tmp_path / "run"
    ckpts = os.path.join(str(out), "checkpoints")
    ranks = Ranks(out, extra=["train.ckpt_every=0"], steps=10_000, style="slurm", name="signalled")
    wait_for(lambda: max(losses(out), default=0) >= 2, ranks, what="step 2")
    ranks.signal(signal.SIGUSR1)
    wait_for(lambda: find_resume_tag(ckpts) is not None, ranks, what="the SIGUSR1 checkpoint")
    usr1_step = int(find_resume_tag(ckpts)[len("global_step"):])
    wait_for(lambda: max(losses(out)) >= usr1_step + 2, ranks, what="training to go on after SIGUSR1")
    ranks.signal(signal.SIGTERM)
    codes = ranks.wait()
    assert codes == [0, 0], ranks.output()
    last = max(losses(out))
    tag = find_resume_tag(ckpts)
    assert tag == f"global_step{last}" and last > usr1_step
    assert os.path.isfile(os.path.join(ckpts, tag, COMPLETE))
    assert f"SIGTERM: checkpointed at step {last}, exiting" in ranks.output()

    resumed = Ranks(out, extra=["train.ckpt_every=0"], steps=last + 2, style="slurm", resume=True, name="resumed")
    assert resumed.wait() == [0, 0], resumed.output()
    assert f"at step {last}" in resumed.output()
    assert max(losses(out)) == last + 2


def _reference_bpc(ckpt_dir, tokens, seq_len, windows, ks):
    """BPC computed without DeepSpeed: the checkpoint's files merged by hand into the pure
    PyTorch model, plain cross-entropy over the first ``windows`` windows."""
    import glob
    import math
    import re

    import torch

    from s2moe_dist.integrations.ds_checkpoint import batched_expert_state_dict
    from s2moe_dist.model import CharLM, ModelConfig
    from s2moe_dist.moe.layer import S2MoELayer

    states = torch.load(os.path.join(ckpt_dir, "mp_rank_00_model_states.pt"), map_location="cpu",
                        weights_only=False)
    sd = dict(states["module"])
    for f in glob.glob(os.path.join(ckpt_dir, "layer_*_expert_*_mp_rank_00_model_states.pt")):
        sd.update(torch.load(f, map_location="cpu", weights_only=False))
    n_experts = {re.search(r"expert_(\d+)_", f).group(1) for f in glob.glob(os.path.join(ckpt_dir, "layer_0_*"))}
    cfg = dict(states["s2moe"]["config"]["model"])
    cfg["moe"] = {**cfg["moe"], "ep_size": 1}
    assert len(n_experts) == cfg["moe"]["num_experts"]

    import s2moe_dist
    saved = s2moe_dist.__dict__.get("S2MoE")
    s2moe_dist.S2MoE = S2MoELayer  # the pure layer, no DeepSpeed hooks
    try:
        model = CharLM(ModelConfig(**cfg))
    finally:
        if saved is not None:
            s2moe_dist.S2MoE = saved
        else:
            del s2moe_dist.S2MoE  # back to the lazy lookup
    model.load_state_dict(batched_expert_state_dict(sd))
    model.eval()
    out = {}
    for k in ks:
        for m in model.modules():
            if isinstance(m, S2MoELayer):
                m.config.eval_k = k
        nll, count = 0.0, 0
        with torch.no_grad():
            for w in range(windows):
                seg = torch.as_tensor(tokens[w * seq_len: (w + 1) * seq_len + 1].astype("int64"))
                logits = model(seg[None, :-1])
                nll += torch.nn.functional.cross_entropy(logits[0], seg[1:], reduction="sum").item()
                count += seq_len
        out[str(k)] = nll / count / math.log(2)
    return out


def test_s2moe_eval_on_an_expert_parallel_checkpoint(reference):
    """s2moe-eval loads the EP=2, ZeRO-2 checkpoint on one process; BPC on the test split equals an
    independent computation from the checkpoint files."""
    from s2moe_dist.data import load_corpus

    out, _ = reference
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "s2moe_dist.cli", "eval", "--checkpoint", str(out),
                           "--eval-k", "1", "2", "--max-windows", "6", "--json"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    ckpt_dir = os.path.join(str(out), "checkpoints", "global_step24")
    assert result["checkpoint"] == ckpt_dir and result["step"] == STEPS and result["split"] == "test"
    assert result["characters_scored"] == 6 * 64
    corpus = load_corpus(None)
    ref = _reference_bpc(ckpt_dir, corpus.test, 64, 6, [1, 2])
    assert result["bpc"].keys() == ref.keys()
    for k in ref:
        assert result["bpc"][k] == pytest.approx(ref[k], rel=1e-5)
    assert result["bpc"]["1"] != result["bpc"]["2"]
