"""s2moe-train / s2moe-eval refuse bad input before any process group starts: exit status 2 and
one line naming the field and the fix. (A world size of 3 with no other ranks would hang in
rendezvous if the check came after the process group.)"""
import os

import pytest

from dist_utils import LAUNCHER_PREFIXES, RANK_VARS

from s2moe_dist.cli import eval_main, train_main
from s2moe_dist.train import checkpoint as ckpt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "model", "tiny.yaml")


@pytest.fixture
def single_process_env(monkeypatch):
    for var in list(os.environ):
        if var.startswith(LAUNCHER_PREFIXES) or var in RANK_VARS:
            monkeypatch.delenv(var)


def _train(capsys, *args):
    code = train_main(["--config", TINY, *args])
    return code, capsys.readouterr().err


def test_bad_field_exits_2_naming_it(capsys, single_process_env, tmp_path):
    code, err = _train(capsys, "--output", str(tmp_path), "--set", "train.lr=-1")
    assert code == 2 and "s2moe-train: error: train.lr=-1 is invalid: must be a number > 0.0" in err


def test_world_size_checks_come_before_the_process_group(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")  # never reached: nothing may try to connect
    code, err = _train(capsys, "--output", str(tmp_path))
    assert code == 2 and "train.batch_size=32 is invalid: must be divisible by world_size (3)" in err
    code, err = _train(capsys, "--output", str(tmp_path), "--set", "train.batch_size=48", "model.moe.ep_size=2")
    assert code == 2 and "model.moe.ep_size=2 is invalid: must divide the world size (3 ranks)" in err
    import torch.distributed as dist
    assert not dist.is_initialized()


def test_missing_files_exit_2(capsys, single_process_env, tmp_path):
    code, err = _train(capsys, "--output", str(tmp_path), "--data", str(tmp_path / "text8.gz"))
    assert code == 2 and "data.path=" in err and "no such file; pass --data" in err
    code, err = _train(capsys, "--output", str(tmp_path), "--deepspeed", str(tmp_path / "zero9.json"))
    assert code == 2 and "--deepspeed" in err and "no such file" in err
    code = train_main(["--config", str(tmp_path / "none.yaml")])
    assert code == 2 and "--config" in capsys.readouterr().err


def test_malformed_data_file_exits_2(capsys, single_process_env, tmp_path):
    bad = tmp_path / "text8"
    bad.write_bytes(b"hello world THIS is not text8\n" * 100)
    code, err = _train(capsys, "--output", str(tmp_path / "out"), "--data", str(bad), "--set",
                       f"data.cache_dir={tmp_path / 'cache'}")
    assert code == 2 and str(bad) in err


def test_existing_checkpoints_need_resume(capsys, single_process_env, tmp_path):
    tag = tmp_path / "checkpoints" / ckpt.tag_for(100)
    tag.mkdir(parents=True)
    (tag / ckpt.COMPLETE).write_text("{}")
    code, err = _train(capsys, "--output", str(tmp_path))
    assert code == 2 and "already holds checkpoints (global_step100): pass --resume auto" in err
    code, err = _train(capsys, "--output", str(tmp_path / "other"), "--resume", str(tmp_path / "nothing"))
    assert code == 2 and "not a complete checkpoint" in err


def test_eval_refuses_a_folder_without_checkpoint(capsys, tmp_path):
    code = eval_main(["--checkpoint", str(tmp_path)])
    assert code == 2 and "no complete s2moe-train checkpoint there" in capsys.readouterr().err


def test_ckpt_needs_a_known_command(capsys):
    from s2moe_dist.cli import ckpt_main
    assert ckpt_main([]) == 2 and "usage: s2moe-ckpt reshard SRC DST --ep-size N" in capsys.readouterr().out
    assert ckpt_main(["shard"]) == 2 and "unknown command 'shard'" in capsys.readouterr().err


def test_resume_refuses_another_model_or_world_size(capsys, single_process_env, tmp_path):
    import json

    from s2moe_dist.train.config import load_run_config

    model = load_run_config(TINY).model.to_dict()
    tag = tmp_path / "checkpoints" / ckpt.tag_for(50)
    tag.mkdir(parents=True)
    (tag / ckpt.COMPLETE).write_text(json.dumps({"step": 50, "world_size": 1, "model": {
        **model, "pos_encoding": "learned", "moe": {**model["moe"], "num_experts": 16, "ep_size": 4}}}))
    code, err = _train(capsys, "--output", str(tmp_path), "--resume", "auto")
    assert code == 2 and "holds another model (model.moe.num_experts: checkpoint 16, this run 8; " \
                         "model.pos_encoding: checkpoint 'learned', this run 'rotary')" in err
    (tag / ckpt.COMPLETE).write_text(json.dumps({"step": 50, "world_size": 2, "model": model}))
    code, err = _train(capsys, "--output", str(tmp_path), "--resume", "auto")
    assert code == 2 and "global_step50 was written by 2 ranks, this run has 1" in err
