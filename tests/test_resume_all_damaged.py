"""--resume auto when EVERY checkpoint fails its manifest: a clear error (exit 2) naming what was
tried, nothing loaded and nothing trained; the damaged tags are kept (renamed), never deleted, and
a rerun of the same command does not quietly restart the run from step 0 over them."""
import os
import subprocess
import sys

from dist_utils import single_process_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = ["train.steps=4", "train.ckpt_every=2", "train.keep_checkpoints=0", "train.eval_every=0",
            "train.progress=false", "train.batch_size=4", "model.seq_len=32"]


def _train(out, *extra):
    cmd = [sys.executable, "-m", "s2moe_dist.cli", "train",
           "--config", os.path.join(ROOT, "configs", "model", "tiny.yaml"), "--output", str(out),
           *extra, "--set", *SETTINGS]
    return subprocess.run(cmd, cwd=ROOT, env=single_process_env(), capture_output=True, text=True, timeout=300)


def _flip_a_byte(tag_dir):
    victim = sorted(f for f in os.listdir(tag_dir) if f.endswith(".pt"))[0]
    path = os.path.join(tag_dir, victim)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(data)


def test_every_checkpoint_damaged_stops_with_a_clear_error(tmp_path):
    first = _train(tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    ckpts = tmp_path / "checkpoints"
    tags = sorted(t for t in os.listdir(ckpts) if t.startswith("global_step"))
    assert tags == ["global_step2", "global_step4"], tags
    for tag in tags:
        _flip_a_byte(ckpts / tag)

    again = _train(tmp_path, "--resume", "auto")
    text = again.stdout + again.stderr
    assert again.returncode == 2, text[-3000:]
    assert (f"s2moe-train: error: --resume auto: no undamaged checkpoint (tried {ckpts}/global_step4, "
            f"{ckpts}/global_step2; see the warnings above)") in text, text[-3000:]
    assert f"WARNING: checkpoint {ckpts}/global_step4 is damaged" in text
    assert sorted(t for t in os.listdir(ckpts) if t.startswith("global_step")) == [
        "global_step2.damaged", "global_step4.damaged"]  # kept for inspection, not loaded
    assert "resumed from" not in text and "step 1/" not in text

    # the same command again (e.g. a resubmitted job): refused before any process group starts
    for extra in (("--resume", "auto"), ()):
        rerun = _train(tmp_path, *extra)
        text = rerun.stdout + rerun.stderr
        assert rerun.returncode == 2, text[-3000:]
        assert (f"s2moe-train: error: --output {tmp_path} holds only damaged checkpoints (global_step2.damaged, "
                f"global_step4.damaged in {ckpts}): starting from step 0 there would silently restart the run") in text
        assert "starting from step 0" not in text.replace("starting from step 0 there", "")
    assert sorted(t for t in os.listdir(ckpts) if t.startswith("global_step")) == [
        "global_step2.damaged", "global_step4.damaged"]
