"""Fast checks of the training plumbing: run-config errors, --set, launcher environments,
lr schedule, DeepSpeed JSON merging, checkpoint selection. No process group, no model."""
import json
import os

import pytest

from s2moe_dist.train import checkpoint as ckpt
from s2moe_dist.train.config import TrainConfig, load_run_config, parse_override
from s2moe_dist.train.distributed import first_slurm_host, resolve_launch
from s2moe_dist.train.ds_config import build_ds_config
from s2moe_dist.train.trainer import lr_at

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "model", "tiny.yaml")
PAPER = os.path.join(ROOT, "configs", "model", "paper-text8.yaml")


def test_shipped_configs_load():
    tiny = load_run_config(TINY)
    assert tiny.model.moe_config().num_experts == 8 and tiny.model.moe_config().k == 2
    paper = load_run_config(PAPER)
    m, moe, t = paper.model, paper.model.moe_config(), paper.train
    assert (m.n_layers, m.d_model, m.n_heads, m.seq_len) == (4, 256, 8, 512)
    assert (moe.num_experts, moe.k, moe.ffn_hidden_size, moe.balance_coef) == (16, 2, 512, 0.01)
    assert (t.lr, t.batch_size) == (3.5e-4, 44)


@pytest.mark.parametrize("override,message", [
    ("train.steps=0", "train.steps=0 is invalid: must be an integer >= 1"),
    ("train.lr_schedule=step", "train.lr_schedule='step' is invalid: must be one of ['cosine', 'linear', 'constant']"),
    ("train.eval_k=[1,9]",
     "train.eval_k=[1, 9] is invalid: each value must be in [1, model.moe.num_experts=8]; drop [9]"),
    ("train.stpes=3", "train: unknown field(s) ['stpes']"),
    ("model.moe.k=0", "model.moe.k=0 is invalid: must be an integer >= 1"),
    ("model.moe.moe_type=xmoe", "model.moe.moe_type='xmoe' is invalid"),
    ("model.d_model=130", "model.n_heads=4 is invalid: must divide d_model (130)"),
    ("data.kind=wiki", "data.kind='wiki' is invalid: must be one of ['auto', 'text8', 'enwik8']"),
    ("optim.lr=1", "--set 'optim.lr=1' is invalid: KEY must start with one of ['model', 'train', 'data']"),
    ("train.steps", "--set 'train.steps' is invalid: use KEY=VALUE"),
])
def test_config_errors_name_the_field(override, message):
    with pytest.raises(ValueError) as e:
        load_run_config(TINY, [override])
    assert message in str(e.value)


def test_missing_data_file_is_an_error_naming_the_flag(tmp_path):
    with pytest.raises(ValueError, match=r"data.path=.*no such file; pass --data"):
        load_run_config(TINY, data_path=str(tmp_path / "nope.txt"))


def test_overrides_parse_yaml_values():
    run = load_run_config(TINY, ["train.steps=7", "model.moe.moe_type=smoe", "train.eval_k=[1, 2, 4]",
                                 "model.pos_encoding=rotary", "train.lr=1e-3"])
    assert run.train.steps == 7 and run.train.eval_k == [1, 2, 4] and run.train.lr == 1e-3
    assert run.model.moe_config().moe_type == "smoe" and run.model.pos_encoding == "rotary"
    assert parse_override("model.moe.k=1") == (["model", "moe", "k"], 1)


def test_batch_size_must_divide_over_ranks():
    t = TrainConfig(batch_size=44, gradient_accumulation_steps=1)
    assert t.micro_batch_size(4) == 11
    with pytest.raises(ValueError, match=r"train.batch_size=44 is invalid: must be divisible by world_size \(8\)"):
        t.micro_batch_size(8)


def test_lr_schedule():
    t = TrainConfig(steps=110, lr=1.0, warmup_steps=10, min_lr_ratio=0.1, lr_schedule="cosine")
    assert lr_at(0, t) == pytest.approx(0.1) and lr_at(9, t) == pytest.approx(1.0)
    assert lr_at(10, t) == pytest.approx(1.0) and lr_at(60, t) == pytest.approx(0.55)
    assert lr_at(110, t) == pytest.approx(0.1)
    t.lr_schedule = "linear"
    assert lr_at(60, t) == pytest.approx(0.55) and lr_at(35, t) == pytest.approx(1 - 0.9 * 0.25)
    t.lr_schedule = "constant"
    assert lr_at(100, t) == 1.0


# ---- launchers -------------------------------------------------------------------------------
def test_launch_from_torchrun_or_deepspeed_env():
    la = resolve_launch({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"})
    assert (la.launcher, la.rank, la.world_size, la.local_rank) == ("env", 3, 4, 1)


def test_launch_from_srun_env():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "1234",
           "SLURM_NODELIST": "gpu[017-018]"}
    la = resolve_launch(env)
    assert (la.launcher, la.rank, la.world_size, la.local_rank) == ("slurm", 5, 8, 1)
    assert la.env["RANK"] == "5" and la.env["WORLD_SIZE"] == "8" and la.env["LOCAL_RANK"] == "1"
    assert la.env["MASTER_ADDR"] == "gpu017" and la.env["MASTER_PORT"] == str(20000 + 1234)
    la = resolve_launch({**env, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "4000"})
    assert la.env["MASTER_ADDR"] == "10.0.0.1" and la.env["MASTER_PORT"] == "4000"
    # a launcher inside an allocation (torchrun per node under srun) wins over SLURM_*
    la = resolve_launch({**env, "RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"})
    assert la.launcher == "env" and la.world_size == 2


@pytest.mark.parametrize("nodelist,first", [("node1", "node1"), ("node[3-5,9]", "node3"),
                                            ("a[07,09],b1", "a07"), ("c1,c2", "c1")])
def test_first_slurm_host(nodelist, first):
    assert first_slurm_host(nodelist) == first


def test_launch_from_mpirun_env():
    la = resolve_launch({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2",
                         "OMPI_COMM_WORLD_LOCAL_RANK": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"})
    assert (la.launcher, la.rank, la.world_size, la.local_rank) == ("mpi", 1, 2, 1)
    assert resolve_launch({"PMI_RANK": "0", "PMI_SIZE": "3"}).world_size == 3


def test_launch_single_process():
    la = resolve_launch({})
    assert (la.launcher, la.rank, la.world_size) == ("single", 0, 1) and int(la.env["MASTER_PORT"]) > 0


# ---- DeepSpeed JSON --------------------------------------------------------------------------
def test_ds_config_takes_batch_and_clipping_from_run_config(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 1}, "train_batch_size": "auto"}))
    run = load_run_config(TINY, ["train.batch_size=16"])
    cfg = build_ds_config(str(path), run.train, world_size=2, device="cpu")
    assert cfg["train_batch_size"] == 16 and cfg["train_micro_batch_size_per_gpu"] == 8
    assert cfg["gradient_accumulation_steps"] == 1 and cfg["gradient_clipping"] == 1.0
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "gradient_clipping": 0.5}))
    notes = []
    cfg = build_ds_config(str(path), run.train, world_size=4, device="cpu", notes=notes)
    assert cfg["train_micro_batch_size_per_gpu"] == 4 and cfg["gradient_clipping"] == 1.0
    assert notes == [f"ds_config.gradient_clipping=0.5 from {path} replaced by 1.0 (train.grad_clip)"]
    cfg = build_ds_config(str(path), run.train, world_size=1, device="cpu", notes=notes)
    assert cfg["train_micro_batch_size_per_gpu"] == 16 and "ds_config.train_micro_batch_size_per_gpu=4" in notes[1]
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(ValueError, match="zero_optimization.stage=3 is invalid with S2MoE"):
        build_ds_config(str(path), run.train, world_size=2, device="cpu")
    with pytest.raises(ValueError, match="no such file"):
        build_ds_config(str(tmp_path / "none.json"), run.train, world_size=2, device="cpu")


def test_shipped_deepspeed_configs_are_accepted():
    folder = os.path.join(ROOT, "configs", "deepspeed")
    if not os.path.isdir(folder):
        pytest.skip("configs/deepspeed/ not there yet")
    run = load_run_config(TINY)
    names = sorted(n for n in os.listdir(folder) if n.endswith(".json"))
    assert "zero1_fp32.json" in names
    for name in names:
        path = os.path.join(folder, name)
        if "unsupported" in name:
            with pytest.raises(ValueError, match="is invalid"):
                build_ds_config(path, run.train, world_size=2, device="cpu")
        else:
            build_ds_config(path, run.train, world_size=2, device="cpu")


# ---- checkpoint selection --------------------------------------------------------------------
def _tag(folder, step, complete=True):
    os.makedirs(folder / ckpt.tag_for(step))
    if complete:
        (folder / ckpt.tag_for(step) / ckpt.COMPLETE).write_text("{}")


def test_resume_picks_the_last_complete_checkpoint(tmp_path):
    assert ckpt.find_resume_tag(str(tmp_path)) is None
    _tag(tmp_path, 10)
    _tag(tmp_path, 20)
    _tag(tmp_path, 30, complete=False)  # a crash mid-write: no marker
    (tmp_path / ckpt.LATEST).write_text("global_step20")
    assert ckpt.find_resume_tag(str(tmp_path)) == "global_step20"
    (tmp_path / ckpt.LATEST).write_text("global_step30")  # never written before completion, but be safe
    assert ckpt.find_resume_tag(str(tmp_path)) == "global_step20"
    (tmp_path / ckpt.LATEST).write_text("")  # DeepSpeed's own truncate-then-write, interrupted
    assert ckpt.find_resume_tag(str(tmp_path)) == "global_step20"
    ckpt.prune(str(tmp_path), keep=1, current="global_step40")
    assert sorted(os.listdir(tmp_path)) == ["global_step20", ckpt.LATEST]


def test_atomic_write_replaces_whole_file(tmp_path):
    path = tmp_path / "latest"
    ckpt.atomic_write(str(path), "global_step1")
    ckpt.atomic_write(str(path), "global_step22")
    assert path.read_text() == "global_step22" and os.listdir(tmp_path) == ["latest"]


# ---- BPC ---------------------------------------------------------------------------------------
def test_bpc_per_eval_k_matches_plain_cross_entropy_and_restores_the_layers():
    import math

    import torch

    from s2moe_dist.model import CharLM, ModelConfig
    from s2moe_dist.moe.layer import S2MoELayer
    from s2moe_dist.train.evaluate import bpc

    torch.manual_seed(0)
    model = CharLM(ModelConfig(vocab_size=27, seq_len=16, n_layers=2, d_model=32, n_heads=4,
                               moe={"num_experts": 4, "k": 2, "ffn_hidden_size": 32}))
    model.train()
    batches = [(torch.randint(0, 27, (3, 16)), torch.randint(0, 27, (3, 16))) for _ in range(2)]
    got = bpc(model, batches, [1, 2, 4], torch.device("cpu"))
    assert model.training and all(m.config.eval_k == 2 for m in model.modules() if isinstance(m, S2MoELayer))
    for k, value in got.items():
        model.eval()
        for m in model.modules():
            if isinstance(m, S2MoELayer):
                m.config.eval_k = k
        with torch.no_grad():
            nll = sum(torch.nn.functional.cross_entropy(model(x).reshape(-1, 27), y.reshape(-1), reduction="sum")
                      for x, y in batches)
        assert value == pytest.approx(nll.item() / (2 * 3 * 16) / math.log(2), rel=1e-6)
    assert len(set(got.values())) == 3  # eval_k changes the routing
