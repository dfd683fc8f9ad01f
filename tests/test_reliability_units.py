"""Reliability pieces without a training run: the checkpoint manifest (truncated / corrupted /
missing files detected, fallback to the previous complete tag), the write probe failing for real
as root, the fault-spec parser; on 2 real gloo ranks: a signal arriving during the flags'
all-reduce, an unwritable checkpoint folder on one rank, and the collective timeout reaching groups
created after (and before) it."""
import json
import os
import time


from dist_utils import run_distributed
from s2moe_dist.train import checkpoint as ckpt
from s2moe_dist.train import faults


def _tag(folder, step, files, latest=True):
    """A complete tag as ``ckpt.save`` leaves it: files, then the marker with their manifest."""
    tag_dir = folder / ckpt.tag_for(step)
    tag_dir.mkdir(parents=True)
    for name, data in files.items():
        (tag_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (tag_dir / name).write_bytes(data)
    manifest = ckpt.describe_files(str(tag_dir), ckpt.list_files(str(tag_dir)))
    (tag_dir / ckpt.COMPLETE).write_text(json.dumps({"step": step, ckpt.MANIFEST: manifest}))
    if latest:
        (folder / ckpt.LATEST).write_text(ckpt.tag_for(step))
    return tag_dir


def test_manifest_detects_truncated_corrupted_and_missing_files(tmp_path):
    import hashlib
    files = {"mp_rank_00_model_states.pt": os.urandom(5000), "zero_pp_rank_0_optim_states.pt": os.urandom(3000),
             "sub/layer_0_expert_0.pt": os.urandom(100)}
    tag_dir = _tag(tmp_path, 10, files)
    marker = ckpt.read_marker(str(tmp_path), "global_step10")
    assert set(marker[ckpt.MANIFEST]) == set(files)  # the marker itself is not in it
    for name, data in files.items():  # an independent sha256 / size
        assert marker[ckpt.MANIFEST][name] == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert ckpt.verify(str(tmp_path), "global_step10") is None
    # the shares of 2 ranks cover every file once
    shares = [sorted(marker[ckpt.MANIFEST])[r::2] for r in (0, 1)]
    assert sorted(shares[0] + shares[1]) == sorted(files)

    model = tag_dir / "mp_rank_00_model_states.pt"
    data = bytearray(files["mp_rank_00_model_states.pt"])
    data[1234] ^= 1
    model.write_bytes(bytes(data))
    assert ckpt.verify(str(tmp_path), "global_step10", checksums=False) is None  # same size
    assert ckpt.verify(str(tmp_path), "global_step10") == \
        "mp_rank_00_model_states.pt does not match its sha256 checksum"
    model.write_bytes(files["mp_rank_00_model_states.pt"][:4096])
    assert ckpt.verify(str(tmp_path), "global_step10", checksums=False) == \
        "mp_rank_00_model_states.pt has 4096 bytes, the manifest says 5000"
    (tag_dir / "sub" / "layer_0_expert_0.pt").unlink()
    problem = ckpt.verify(str(tmp_path), "global_step10")
    assert "mp_rank_00_model_states.pt has 4096 bytes" in problem and "sub/layer_0_expert_0.pt is missing" in problem


def test_resume_falls_back_to_the_newest_good_checkpoint_with_a_warning(tmp_path):
    _tag(tmp_path, 10, {"a.pt": b"x" * 100})
    _tag(tmp_path, 20, {"a.pt": b"y" * 100})
    t30 = _tag(tmp_path, 30, {"a.pt": b"z" * 100})
    (tmp_path / "global_step40").mkdir()  # killed mid-save: no marker, never a candidate
    (tmp_path / "global_step40" / "a.pt").write_bytes(b"w")
    (tmp_path / ckpt.LATEST).write_text("global_step20")  # latest first, then newest first
    assert ckpt.resume_candidates(str(tmp_path)) == ["global_step20", "global_step30", "global_step10"]
    (tmp_path / "global_step20" / "a.pt").write_bytes(b"Y" * 100)  # corrupted, same size
    (t30 / "a.pt").write_bytes(b"z" * 99)  # truncated
    warnings = []
    assert ckpt.find_resume_tag(str(tmp_path), check="size", warn=warnings.append) == "global_step20"
    assert ckpt.find_resume_tag(str(tmp_path), check="sha256", warn=warnings.append) == "global_step10"
    assert warnings == [f"WARNING: checkpoint {tmp_path}/global_step20 is damaged (a.pt does not match its sha256 "
                        "checksum); not loading it, falling back to the previous complete checkpoint",
                        f"WARNING: checkpoint {tmp_path}/global_step30 is damaged (a.pt has 99 bytes, the manifest "
                        "says 100); not loading it, falling back to the previous complete checkpoint"]
    assert ckpt.find_resume_tag(str(tmp_path), check=None) == "global_step20"  # the marker only
    # set aside: no longer complete, never pruned or resumed
    assert ckpt.mark_damaged(str(tmp_path), "global_step20").endswith("global_step20.damaged")
    assert ckpt.complete_tags(str(tmp_path)) == ["global_step10", "global_step30"]


def test_write_probe_fails_for_real_as_root(tmp_path):
    assert ckpt.probe_write(str(tmp_path / "ok" / "checkpoints")) is None
    assert os.listdir(tmp_path / "ok" / "checkpoints") == []  # the probe file is gone
    (tmp_path / "file").write_text("x")
    problem = ckpt.probe_write(str(tmp_path / "file" / "checkpoints"))
    assert problem == f"Not a directory (ENOTDIR): {tmp_path}/file/checkpoints"
    assert ckpt.probe_write("/proc/s2moe_checkpoints") is not None  # procfs: no new folders, even for root


def test_fault_specs_parse():
    got = faults.parse("kill_in_save@30:1; nan_param@12:1=blocks.1.ffn.moe.experts.w1;sigterm_at_start:0;"
                       "router_bias=0/0/10/40,1/7/-inf")
    assert [(f.kind, f.step, f.rank, f.arg) for f in got] == [
        ("kill_in_save", 30, 1, None), ("nan_param", 12, 1, "blocks.1.ffn.moe.experts.w1"),
        ("sigterm_at_start", None, 0, None), ("router_bias", None, None, "0/0/10/40,1/7/-inf")]
    assert faults.parse("") == []


def _timeout_body(rank, world, flag_dir):
    import datetime

    import torch
    import torch.distributed as dist

    from s2moe_dist.train.distributed import set_collective_timeout

    def timeout_of(group):
        return group._get_backend(torch.device("cpu")).options._timeout

    # a SIGUSR1 that lands while rank 0 waits in the flags' all-reduce is acted on at the next step
    # (it used to be cleared after the all-reduce returned, i.e. lost)
    import signal
    import threading

    from s2moe_dist.train.signals import SignalFlags
    flags = SignalFlags().install()
    try:
        if rank == 0:
            threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGUSR1)).start()
        else:
            time.sleep(2.0)  # rank 0 sits in the all-reduce meanwhile
        usr1 = [flags.agreed(), flags.agreed(), flags.agreed()]
    finally:
        flags.uninstall()

    # a checkpoint folder only rank 1 cannot write: every rank raises the same clear error, before
    # DeepSpeed writes anything (the engine is never reached)
    from s2moe_dist.train.checkpoint import CheckpointError, save
    folder = os.path.join(flag_dir, "ok" if rank == 0 else "afile/checkpoints")
    if rank == 1:
        open(os.path.join(flag_dir, "afile"), "w").close()
    try:
        save(None, folder, 7, {}, 2, rank)
        save_error = None
    except CheckpointError as e:
        save_error = str(e)
    before = dist.new_group([0, 1])  # made with torch's own new_group default (30 min for gloo)
    default = timeout_of(before)
    set_collective_timeout(3)
    after = dist.new_group([0, 1])  # e.g. DeepSpeed's expert-parallel group, made later
    seen = [timeout_of(g) for g in (dist.group.WORLD, before, after)]
    done = os.path.join(flag_dir, "rank0_done")
    if rank == 1:  # alive but silent, as a hung rank: never joins the all-to-all below
        while not os.path.exists(done):
            time.sleep(0.05)
        return {"seen": seen, "default": default, "save_error": save_error, "usr1": usr1}
    t0 = time.monotonic()
    try:
        dist.all_to_all_single(torch.zeros(2), torch.ones(2), group=after)
        error = None
    except RuntimeError as e:
        error = str(e)
    waited = time.monotonic() - t0
    open(done, "w").close()
    return {"seen": seen, "default": default, "error": error, "waited": waited, "save_error": save_error,
            "usr1": usr1,
            "expected": datetime.timedelta(seconds=3)}


def test_signal_during_all_reduce_unwritable_folder_on_one_rank_and_collective_timeout(tmp_path):
    import datetime
    r0, r1 = run_distributed(_timeout_body, world_size=2, args=(str(tmp_path),), timeout=120)
    # the SIGUSR1 reached rank 0 inside the first agreement: acted on (by both ranks) at the second
    assert r0["usr1"] == r1["usr1"] == [(False, False), (True, False), (False, False)]
    for r, folder in ((r0, "ok"), (r1, "afile/checkpoints")):
        err = r["save_error"]
        assert err is not None and err.startswith(
            f"checkpoint {tmp_path}/{folder}/global_step7 cannot be written (rank 1: Not a directory (ENOTDIR): "
            f"{tmp_path}/afile/checkpoints; "), err
        assert err.endswith("there is no earlier checkpoint; make the folder writable (--output) or free space, "
                            "then resume with --resume auto"), err
    assert r0["default"] == datetime.timedelta(minutes=30)  # what DeepSpeed's groups got before the fix
    assert r0["seen"] == r1["seen"] == [datetime.timedelta(seconds=3)] * 3
    assert r0["error"] is not None and "Timed out waiting 3000ms" in r0["error"]
    assert 3 <= r0["waited"] < 15, r0["waited"]
