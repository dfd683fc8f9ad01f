"""Faults, preemption and numerics under real 2-rank s2moe-train runs (CPU, gloo, EP=2, ZeRO-1 as in
the quickstart), with faults injected through the test-only ``S2MOE_FAULTS`` hooks
(``s2moe_dist/train/faults.py``). Several checks share each run to keep the file near 3 minutes.

- reference: 50 steps, SIGTERM near step 25 + ``--resume auto``, RSS sampled every 5 steps (the
  soak of benchmarks/soak.py, short). Its losses are the reference of the other runs.
- a rank SIGKILLed inside save_checkpoint; a corrupted file of the newest complete checkpoint;
  disk full (ENOSPC) inside the next save; each time ``--resume auto`` continues from the last
  good checkpoint, and the losses of every step equal the reference bit for bit (same seed =>
  same losses, fresh run or resumed).
- NaN/Inf: a NaN loss on one rank and an inf gradient on another are skipped on all ranks; a NaN
  parameter makes 3 skipped steps in a row, which stops the run naming step, layer and tensor with
  nothing saved after the last good checkpoint. A different seed gives different losses.
- under torchrun (the quickstart's launcher) a rank SIGKILLed mid-step ends the job; resumed, it
  trains 50 steps with a router biased to one expert in block 0 and one expert never used in
  block 1: no hang, no NaN, block 0's balance loss rises to E/k. At the same time: a hung rank
  ends its job after train.collective_timeout_s; a SIGTERM during start-up exits 0.
"""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from s2moe_dist.train import checkpoint as ckpt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import soak  # noqa: E402  (benchmarks/soak.py: launch helpers and the soak itself)

STEPS = 50
SETTINGS = soak.MICRO + ["train.log_every=1", "train.eval_every=0", "train.ckpt_every=10",
                         f"train.steps={STEPS}"]
TIMEOUT = 300
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")


# ---- reading a run ------------------------------------------------------------------------------
def rows(out):
    path = os.path.join(str(out), "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def losses(out, first=False):
    """step -> (total, task, balance, uncertainty): the last value logged for each step (a
    resumed run logs the steps after its checkpoint again), or the first with ``first``."""
    got = {}
    for r in rows(out):
        if "train/loss_total" in r and not (first and r["step"] in got):
            got[r["step"]] = (r["train/loss_total"], r["train/loss_task"], r["train/loss_balance"],
                              r["train/loss_uncertainty"])
    return got


def moe_rows(out):
    return {r["step"]: r for r in rows(out) if "moe/layer0/balance_loss" in r}


def tags(out):
    folder = os.path.join(str(out), "checkpoints")
    return sorted(n for n in os.listdir(folder) if n.startswith("global_step")) if os.path.isdir(folder) else []


def fault_time(text):
    """t= of the first injected fault in a log."""
    i = text.index("FAULT INJECTED (t=")
    return float(text[i + len("FAULT INJECTED (t="):].split(")")[0])


def wait_for(cond, ranks, timeout=TIMEOUT, what=""):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            ranks.kill()
            raise AssertionError(f"timed out waiting for {what}:\n{ranks.output()[-3000:]}")
        time.sleep(0.05)


def run(out, faults=None, resume=False, extra=(), name="run"):
    ranks = soak.Ranks(out, SETTINGS + list(extra), resume=resume, name=name, faults=faults)
    codes = ranks.wait(TIMEOUT)
    return ranks, codes


class Torchrun:
    """``torchrun --nproc_per_node 2 -m s2moe_dist.cli train ...`` as launch_scripts/quickstart.sh."""

    def __init__(self, out, faults=None, resume=False, name="torchrun"):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMI_", "PMIX_"))
               and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "S2MOE_FAULTS")}
        env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, ".torch_extensions"))
        if faults:
            env["S2MOE_FAULTS"] = faults
        args = [TORCHRUN, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
                str(soak.free_port()), "-m", "s2moe_dist.cli", "train", "--config", soak.TINY, "--deepspeed",
                soak.ZERO1, "--output", str(out), "--set", *SETTINGS] + (["--resume", "auto"] if resume else [])
        self.log = open(os.path.join(os.path.dirname(str(out)), f"{name}.log"), "w+")
        self.proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        self.ended = None

    def poll(self):
        code = self.proc.poll()
        if code is not None and self.ended is None:
            self.ended = time.time()
        return code

    def output(self):
        self.log.flush()
        with open(self.log.name) as f:
            return f.read()

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# ---- the reference: a short soak -------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    res = soak.run_soak(str(out), steps=STEPS, ckpt_every=10, sigterm_at=25, rss_every=5, settings=SETTINGS,
                        warmup_samples=2, timeout=TIMEOUT, log_every=1, log=lambda *_: None)
    return out, res


def test_short_soak_sigterm_resume_and_flat_memory(reference):
    out, res = reference
    assert res["codes"] == [[0, 0], [0, 0]], res["log0"] + res.get("log1", "")
    stop = res["sigterm_checkpoint"]
    assert stop is not None and 25 <= stop < STEPS and res["resumed_at"] == stop
    assert sorted(losses(out)) == list(range(1, STEPS + 1)) and res["final_step"] == STEPS
    assert all(math.isfinite(v) for step in losses(out).values() for v in step)
    # RSS of each rank in each process, after 2 warm-up samples: no growth beyond noise (the
    # 2000-step soak in RESULTS.md measures the slope; 25 steps can only catch a gross leak)
    for key, fit in res["fits"].items():
        assert fit["samples"] >= 4, res["fits"]
        assert fit["max_mib"] - fit["min_mib"] < 24, (key, fit)
    print(f"[figures] soak-50: SIGTERM checkpoint {stop}; RSS spread per process/rank (MiB): "
          + ", ".join(f"{k} {f['max_mib'] - f['min_mib']:.1f}" for k, f in sorted(res["fits"].items())))


# ---- checkpoints: killed mid-save, corrupted, disk full -----------------------------------------------
def test_kill_mid_save_corrupt_checkpoint_and_disk_full_lose_nothing(reference, tmp_path):
    ref_out, _ = reference
    ref = losses(ref_out)
    out = tmp_path / "run"
    ckpts = os.path.join(str(out), "checkpoints")

    # 1. rank 1 SIGKILLs itself inside save_checkpoint of step 30, after writing its first file
    ranks, codes = run(out, faults="kill_in_save@30:1", name="killed")
    ended = time.time()
    # rank 0 reports the lost save (exit 4; a process leaving with a dead gloo peer may also abort)
    assert codes[1] == -signal.SIGKILL and codes[0] in (4, -signal.SIGABRT), ranks.output()
    assert ended - fault_time(ranks.output(1)) < 60  # the survivor did not hang
    print(f"[figures] SIGKILL in save -> both ranks gone after {ended - fault_time(ranks.output(1)):.1f} s")
    assert "rank 0: writing checkpoint" in ranks.output(0) and "global_step20 is untouched" in ranks.output(0)
    partial = os.path.join(ckpts, "global_step30")
    assert os.listdir(partial) and not os.path.exists(os.path.join(partial, ckpt.COMPLETE))
    assert open(os.path.join(ckpts, "latest")).read() == "global_step20"
    assert ckpt.find_resume_tag(ckpts, check="sha256") == "global_step20"
    first = losses(out)
    assert sorted(first) == list(range(1, 31))
    for step in range(1, 30):  # two fresh runs, same seed and config: bit-equal (>= 20 steps)
        assert first[step] == ref[step], f"step {step}: {first[step]} != {ref[step]}"

    # 2. a flipped byte in global_step20 (same size: only the checksum sees it)
    victim = os.path.join(ckpts, "global_step20", "layer_1_expert_5_mp_rank_00_model_states.pt")
    data = bytearray(open(victim, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(victim, "wb").write(data)
    assert ckpt.verify(ckpts, "global_step20", checksums=False) is None  # sizes still match
    # ... resumed: falls back to global_step10 with a warning; then the disk fills in the save of step 40
    ranks, codes = run(out, faults="enospc_in_save@40:1", resume=True, name="full")
    log0, log1 = ranks.output(0), ranks.output(1)
    assert (f"WARNING: checkpoint {ckpts}/global_step20 is damaged (layer_1_expert_5_mp_rank_00_model_states.pt "
            "does not match its sha256 checksum); not loading it, falling back") in log0
    assert f"resumed from {ckpts}/global_step10 at step 10" in log0
    assert os.path.isdir(os.path.join(ckpts, "global_step20.damaged"))
    assert codes[1] == 4 and codes[0] in (4, -signal.SIGABRT), log0[-3000:] + log1[-3000:]
    assert (f"s2moe-train: error: rank 1: writing checkpoint {ckpts}/global_step40 failed (RuntimeError: "
            "[enforce fail at inline_container.cc") in log1
    assert f"the previous checkpoint {ckpts}/global_step30 is untouched (--resume auto continues from it)" in log1
    assert open(os.path.join(ckpts, "latest")).read() == "global_step30"
    assert ckpt.verify(ckpts, "global_step30", checksums=True) is None
    assert not os.path.exists(os.path.join(ckpts, "global_step40", ckpt.COMPLETE))

    # 3. resumed again: to the end, every step's losses equal to the reference's
    ranks, codes = run(out, resume=True, name="resumed")
    assert codes == [0, 0], ranks.output()[-3000:]
    assert f"resumed from {ckpts}/global_step30 at step 30" in ranks.output()
    got = losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert got[step] == ref[step], f"step {step}: {got[step]} != {ref[step]}"
    ref_eval = [r for r in rows(ref_out) if "eval/bpc_k1" in r][-1]
    assert [r for r in rows(out) if "eval/bpc_k1" in r][-1] == ref_eval


# ---- NaN / Inf ---------------------------------------------------------------------------------------
def _optimizer_steps(tag_dir):
    import torch
    steps = set()
    for rank in (0, 1):
        sd = torch.load(os.path.join(tag_dir, f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"), map_location="cpu",
                        weights_only=False)
        steps |= {float(s["step"]) for s in sd["optimizer_state_dict"]["base_optimizer_state"]["state"].values()}
    return steps


def _all_weights_finite(tag_dir):
    import glob

    import torch
    files = glob.glob(os.path.join(tag_dir, "*model_states.pt"))
    for f in files:
        sd = torch.load(f, map_location="cpu", weights_only=False)
        sd = sd.get("module", sd)
        for v in sd.values():
            if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all():
                return False
    return len(files) > 1


def test_nonfinite_steps_are_skipped_on_all_ranks_and_a_streak_stops_the_run(reference, tmp_path):
    ref_out, _ = reference
    out = tmp_path / "run"
    ckpts = os.path.join(str(out), "checkpoints")
    faults = ("nan_loss@4:1;inf_grad@7:0=blocks.0.attn.qkv.weight;"
              "nan_param@12:1=blocks.1.ffn.moe.experts.w1")
    ranks, codes = run(out, faults=faults, name="nan", extra=["train.seed=1235", "train.ckpt_every=4",
                                                             "train.max_consecutive_nonfinite=3"])
    log = ranks.output(0)
    assert codes == [3, 3], log[-3000:]
    # different seed: different losses from the first step
    assert losses(out)[1] != losses(ref_out)[1]
    # a NaN loss on rank 1 (its gradients reach rank 0's experts through the all-to-all): skipped by both
    assert ("step 4: non-finite loss on ranks [1], gradients on ranks [0, 1]: step skipped on every rank "
            "(1 in a row, stop at train.max_consecutive_nonfinite=3)") in log
    assert "step 4: checkpoint postponed (the step was skipped as non-finite)" in log
    # an inf gradient on rank 0 with a finite loss
    assert "step 7: non-finite loss on ranks [], gradients on ranks [0]: step skipped on every rank" in log
    assert math.isfinite(losses(out)[7][0]) and math.isnan(losses(out)[4][0])
    assert [r["train/skipped_steps"] for r in rows(out) if "train/skipped_steps" in r][:8] == [0, 0, 0, 1, 1, 1, 2, 2]
    # the poisoned expert weight: steps 12-14 skipped, then the run stops naming step, layer and tensor
    assert "step 14: non-finite loss on ranks [0, 1], gradients on ranks [0, 1]: step skipped on every rank " \
           "(3 in a row" in log
    err = ("s2moe-train: error: step 14: 3 steps in a row (steps 12-14) had a non-finite loss or gradient "
           "(train.max_consecutive_nonfinite=3); loss non-finite on ranks [0, 1], gradients on ranks [0, 1]. "
           "First non-finite tensor: rank 1: parameter blocks.1.ffn.moe.experts.w1 (block 1, expert 4): 1 of 8192 "
           "values non-finite (first: nan)")
    assert err in log and err in ranks.output(1)
    assert f"Nothing was saved after the last good step; the last good checkpoint is {ckpts}/global_step8" in log
    assert max(losses(out)) == 14
    # checkpoints: step 4's postponed to 5, then 8; none during the streak
    assert tags(out) == ["global_step5", "global_step8"]
    assert open(os.path.join(ckpts, "latest")).read() == "global_step8"
    # skipped steps left the optimizer alone: AdamW took 8 - 2 steps; the weights are finite
    assert _optimizer_steps(os.path.join(ckpts, "global_step8")) == {6.0}
    assert _all_weights_finite(os.path.join(ckpts, "global_step8"))


# ---- a rank dies / hangs / is signalled at start-up; routing extremes ----------------------------------
ROUTER = "router_bias=0/0/10/40,1/7/-inf"  # block 0: expert 0 +10 ramped over 40 steps; block 1: expert 7 -inf


def test_dead_rank_hung_rank_and_startup_signal_end_in_bounded_time(reference, tmp_path):
    ref_out, _ = reference
    routed = tmp_path / "routed"
    killed = Torchrun(routed, faults=f"{ROUTER};kill_in_step@40:1", name="torchrun_killed")
    hung = soak.Ranks(tmp_path / "hung", SETTINGS + ["train.collective_timeout_s=30"], name="hung",
                      faults="hang_in_step@6:1")
    early = soak.Ranks(tmp_path / "early", SETTINGS, name="early", faults="sigterm_at_start:1")
    ends = {}  # when each was first seen gone (polled together: no waiting on one while another ends)

    def gone():
        now = time.time()
        for key, done in (("early", not early.running()), ("hung", hung.procs[0].poll() is not None),
                          ("torchrun", killed.poll() is not None)):
            if done:
                ends.setdefault(key, now)
        return len(ends) == 3

    try:
        deadline = time.monotonic() + TIMEOUT
        while not gone():
            assert time.monotonic() < deadline, f"not ended: {sorted({'early', 'hung', 'torchrun'} - set(ends))}"
            time.sleep(0.05)
        # SIGTERM during start-up (handlers installed at CLI entry): exit 0, nothing written
        assert early.codes() == [0, 0], early.output(0)[-3000:]
        assert "SIGTERM during start-up: nothing to save (step 0), exiting" in early.output(0)
        assert tags(tmp_path / "early") == [] and rows(tmp_path / "early") == []

        # the hung rank: rank 0 waits in the EP all-to-all (a DeepSpeed group) and times out
        assert hung.procs[1].poll() is None  # still hung: a launcher kills it (torchrun after 30 s)
        hung.kill()
        waited = ends["hung"] - fault_time(hung.output(1))
        assert 30 <= waited < 75, waited
        print(f"[figures] hung rank: rank 0 exited {waited:.1f} s after the hang (timeout 30 s)")
        assert hung.procs[0].returncode in (1, -signal.SIGABRT)
        text = hung.output(0)
        assert "Timed out waiting 30000ms" in text and "all_to_all" in text
        assert "s2moe-train: error: a collective failed: another rank died or hung" in text

        # torchrun: rank 1 SIGKILLed in step 40 -> torchrun stops rank 0 and exits non-zero
        text = killed.output()
        assert killed.proc.returncode != 0
        assert "exitcode  : -9" in text and "SIGKILLs itself in step 40" in text
        after = ends["torchrun"] - fault_time(text)
        assert after < 60, after
        print(f"[figures] torchrun: exited {after:.1f} s after the SIGKILL of rank 1")
    finally:
        for r in (killed, hung, early):
            r.kill()
    # --resume auto under torchrun continues from step 30 to the end
    resumed = Torchrun(routed, faults=ROUTER, resume=True, name="torchrun_resumed")
    try:
        wait_for(lambda: resumed.poll() is not None, resumed, what="the resumed run")
    finally:
        resumed.kill()
    assert resumed.proc.returncode == 0, resumed.output()[-3000:]
    assert f"resumed from {routed}/checkpoints/global_step30 at step 30" in resumed.output()

    # routing extremes over the 50 steps: finite, expert 7 of block 1 never used, block 0 collapses
    got, moe, ref_moe = losses(routed), moe_rows(routed), moe_rows(ref_out)
    assert sorted(got) == list(range(1, STEPS + 1)) and sorted(moe) == list(range(1, STEPS + 1))
    assert all(math.isfinite(v) for step in got.values() for v in step)
    assert all(r["train/skipped_steps"] == 0 for r in rows(routed) if "train/skipped_steps" in r)
    assert all(moe[s]["moe/layer1/expert_fraction"][7] == 0.0 for s in moe)
    assert all(moe[s]["moe/layer0/expert_fraction"][0] == 0.5 for s in range(40, STEPS + 1))  # every token
    bal0 = [moe[s]["moe/layer0/balance_loss"] for s in range(1, STEPS + 1)]
    ref0 = [ref_moe[s]["moe/layer0/balance_loss"] for s in range(1, STEPS + 1)]
    early_mean, late_mean = sum(bal0[:5]) / 5, sum(bal0[-10:]) / 10
    assert late_mean > 3.9 and late_mean <= 4.0 + 1e-6  # E * f0 * P0 with f0 = 1/k, P0 -> 1: E/k = 4
    assert early_mean < 0.75 * late_mean  # rises as the bias grows
    print(f"[figures] balance loss block 0: first 5 steps {early_mean:.3f}, last 10 {late_mean:.4f}; reference "
          f"{min(ref0):.3f}-{max(ref0):.3f}; block 1 (expert 7 unused) last 10 "
          f"{sum(moe[s]['moe/layer1/balance_loss'] for s in range(41, 51)) / 10:.3f}")
    assert late_mean > 3 * max(ref0) and all(0.99 < b < 1.6 for b in ref0)  # the balanced reference: ~1
