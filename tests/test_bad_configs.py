"""Bad input is refused before any process group starts, with a message naming the field and the
fix: one table of bad configs (model, MoE, parallel topology, DeepSpeed JSON, data, eval_k,
launcher environment, output / resume, reliability fields) through ``trainer.setup`` in-process
(what the CLI calls first), and a few through the real CLI (exit status 2, one line)."""
import json
import os
import subprocess
import sys

import pytest

from s2moe_dist.train import checkpoint as ckpt
from s2moe_dist.train.trainer import TrainArgs, setup

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "model", "tiny.yaml")
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
TWO = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}


def _ds(tmp, cfg):
    path = tmp / "ds.json"
    path.write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
    return str(path)


def _file_parent(tmp):
    (tmp / "afile").write_text("a regular file, not a folder")
    return str(tmp / "afile" / "run")  # mkdir below a file: ENOTDIR, even for root


def _with_checkpoint(tmp):
    tag = tmp / "out" / "checkpoints" / ckpt.tag_for(10)
    tag.mkdir(parents=True)
    (tag / ckpt.COMPLETE).write_text("{}")
    return str(tmp / "out")


# id, overrides, launcher env (None: a single process), extra TrainArgs (callables get tmp_path),
# fragments the message must hold (the field, the bad value, the fix)
CASES = [
    # model
    ("model-heads", ["model.d_model=130"], None, {}, ["model.n_heads=4 is invalid", "must divide d_model (130)"]),
    ("model-seq-len", ["model.seq_len=0"], None, {}, ["model.seq_len=0 is invalid", "must be an integer >= 1"]),
    ("model-pos", ["model.pos_encoding=alibi"], None, {},
     ["model.pos_encoding='alibi' is invalid", "must be one of ['learned', 'rotary']"]),
    ("model-dropout", ["model.dropout=1.5"], None, {}, ["model.dropout=1.5 is invalid", "must be in [0, 1)"]),
    ("model-unknown-field", ["model.d_modle=64"], None, {}, ["model: unknown field(s) ['d_modle']", "known fields"]),
    ("model-vocab", ["model.vocab_size=10"], None, {},
     ["model.vocab_size=10 is invalid", "has 27 symbols", "set model.vocab_size: null"]),
    ("model-seq-vs-data", ["model.seq_len=100000"], None, {},
     ["too short for seq_len=100000", "use a smaller seq_len or a longer file"]),
    # MoE
    ("moe-k", ["model.moe.k=9"], None, {}, ["model.moe.k=9 is invalid", "must be <= num_experts (8)"]),
    ("moe-experts-vs-ep", ["model.moe.num_experts=6", "model.moe.ep_size=4", "train.eval_k=[1]"], None, {},
     ["model.moe.num_experts=6 is invalid", "divisible by ep_size (4)", "pick ep_size among [1, 2, 3, 6]"]),
    ("moe-type", ["model.moe.moe_type=xmoe"], None, {},
     ["model.moe.moe_type='xmoe' is invalid", "must be one of ['s2moe', 'smoe']"]),
    ("moe-capacity", ["model.moe.capacity_factor=0"], None, {},
     ["model.moe.capacity_factor=0 is invalid", "must be a number > 0.0"]),
    ("moe-noisy-gate", ["model.moe.noisy_gate_policy=Jitter", "model.moe.router_type=xmoe"], None, {},
     ["model.moe.noisy_gate_policy='Jitter' is invalid", "set noisy_gate_policy=None"]),
    ("moe-hidden", ["model.moe.hidden_size=64"], None, {},
     ["model.moe.hidden_size=64 is invalid", "set by model.d_model; remove it from model.moe"]),
    # parallel topology (world from the launcher's variables)
    ("ep-vs-world", ["model.moe.ep_size=8", "train.batch_size=48"], {**TWO, "WORLD_SIZE": "3"}, {},
     ["model.moe.ep_size=8 is invalid", "must divide the world size (3 ranks)", "set model.moe.ep_size=1"]),
    ("batch-vs-world", [], {**TWO, "WORLD_SIZE": "3"}, {},
     ["train.batch_size=32 is invalid", "divisible by world_size (3)", "use a multiple of 3"]),
    ("batch-vs-accumulation", ["train.gradient_accumulation_steps=3"], TWO, {},
     ["train.batch_size=32 is invalid", "train.gradient_accumulation_steps (3)", "use a multiple of 6"]),
    ("tp-vs-d-model", ["model.tp_size=3"], {**TWO, "WORLD_SIZE": "3"}, {},
     ["model.d_model=128 is invalid", "divisible by model.tp_size (3)", "choose"]),
    # DeepSpeed JSON
    ("ds-zero3", [], None, {"deepspeed": lambda t: _ds(t, {"zero_optimization": {"stage": 3}})},
     ["zero_optimization.stage=3 is invalid with S2MoE layers", "Use zero_optimization.stage 1 or 2"]),
    ("ds-stage", [], None, {"deepspeed": lambda t: _ds(t, {"zero_optimization": {"stage": 5}})},
     ["ds_config.zero_optimization.stage=5 is invalid", "must be one of [0, 1, 2, 3]"]),
    ("ds-fp16-cpu", [], None, {"deepspeed": lambda t: _ds(t, {"fp16": {"enabled": True}})},
     ["ds_config.fp16.enabled=True is invalid", "use bf16 (bf16.enabled: true) or fp32 on CPU"]),
    ("ds-fp16-bf16", [], None, {"deepspeed": lambda t: _ds(t, {"fp16": {"enabled": True}, "bf16": {"enabled": True}})},
     ["ds_config.fp16.enabled=True is invalid", "fp16 and bf16 cannot both be enabled; pick one"]),
    ("ds-scheduler", [], None, {"deepspeed": lambda t: _ds(t, {"scheduler": {"type": "WarmupLR"}})},
     ["ds_config.scheduler", "is not used", "remove that section"]),
    ("ds-not-json", [], None, {"deepspeed": lambda t: _ds(t, "{zero: 1")}, ["--deepspeed", "not valid JSON"]),
    ("ds-offload-torch-opt", [], None, {"deepspeed": lambda t: _ds(t, {"zero_optimization": {
        "stage": 2, "offload_optimizer": {"device": "cpu"}}})},
     ["ds_config.zero_force_ds_cpu_optimizer=True is invalid", "\"zero_force_ds_cpu_optimizer\": false"]),
    ("ds-contiguous", [], None, {"deepspeed": lambda t: _ds(t, {"zero_optimization": {
        "stage": 2, "contiguous_gradients": False}})},
     ["ds_config.zero_optimization.contiguous_gradients=False is invalid", "with contiguous_gradients: true"]),
    ("ds-missing", [], None, {"deepspeed": lambda t: str(t / "zero9.json")},
     ["--deepspeed", "no such file", "configs/deepspeed/zero1_fp32.json"]),
    # data
    ("data-missing", [], None, {"data": lambda t: str(t / "text8.gz")}, ["data.path=", "no such file; pass --data"]),
    ("data-folder", [], None, {"data": lambda t: str(t)}, ["data.path=", "no such file; pass --data"]),
    ("data-split", ["data.split=[0.9, 0.1]"], None, {}, ["data.split=[0.9, 0.1] is invalid", "three numbers"]),
    ("data-kind", ["data.kind=wiki"], None, {}, ["data.kind='wiki' is invalid", "['auto', 'text8', 'enwik8']"]),
    # eval_k
    ("eval-k-zero", ["train.eval_k=[0, 2]"], None, {},
     ["train.eval_k=[0, 2] is invalid", "in [1, model.moe.num_experts=8]; drop [0]"]),
    ("eval-k-too-many", ["train.eval_k=[1, 9]"], None, {}, ["train.eval_k=[1, 9] is invalid", "drop [9]"]),
    ("eval-k-empty", ["train.eval_k=[]"], None, {}, ["train.eval_k=[] is invalid", "non-empty list of integers"]),
    # launcher environment
    ("env-world-no-rank", [], {"WORLD_SIZE": "2"}, {},
     ["WORLD_SIZE is set but RANK is not", "export RANK too, or unset WORLD_SIZE"]),
    ("env-rank-out-of-world", [], {**TWO, "RANK": "2"}, {}, ["RANK=2 is invalid", "must be in [0, WORLD_SIZE=2)"]),
    ("env-rank-not-int", [], {**TWO, "RANK": "one"}, {}, ["environment variable RANK='one' is not an integer"]),
    ("env-no-master", [], {"RANK": "0", "WORLD_SIZE": "2"}, {},
     ["RANK/WORLD_SIZE are set but ['MASTER_ADDR', 'MASTER_PORT'] are not", "torchrun"]),
    ("env-local-rank", [], {**TWO, "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2"}, {},
     ["LOCAL_RANK=2 is invalid", "must be < LOCAL_WORLD_SIZE=2"]),
    ("env-port", [], {**TWO, "MASTER_PORT": "99999"}, {}, ["MASTER_PORT='99999' is invalid", "[1, 65535]"]),
    ("env-slurm-rank", [], {"SLURM_PROCID": "3", "SLURM_NTASKS": "2", "SLURM_NODELIST": "n1"}, {},
     ["SLURM_PROCID=3 is invalid", "must be in [0, SLURM_NTASKS=2)"]),
    ("env-mpi-size", [], {"OMPI_COMM_WORLD_RANK": "0"}, {},
     ["OMPI_COMM_WORLD_RANK is set but OMPI_COMM_WORLD_SIZE is not"]),
    # output, resume, reliability fields
    ("output-under-file", [], None, {"output": _file_parent},
     ["checkpoints cannot be written to", "ENOTDIR", "choose a writable --output"]),
    ("output-has-checkpoints", [], None, {"output": _with_checkpoint},
     ["already holds checkpoints (global_step10)", "pass --resume auto"]),
    ("resume-nothing", [], None, {"resume": lambda t: str(t / "nothing")},
     ["--resume", "not a complete checkpoint", "use --resume auto"]),
    ("timeout", ["train.collective_timeout_s=0"], None, {},
     ["train.collective_timeout_s=0 is invalid", "must be a number > 0.0"]),
    ("timeout-inf", ["train.collective_timeout_s=.inf"], None, {},
     ["train.collective_timeout_s=inf is invalid", "finite number of seconds"]),
    ("nonfinite-limit", ["train.max_consecutive_nonfinite=0"], None, {},
     ["train.max_consecutive_nonfinite=0 is invalid", "must be an integer >= 1"]),
    ("train-lr", ["train.lr=-1"], None, {}, ["train.lr=-1 is invalid", "must be a number > 0.0"]),
    ("config-section", ["optim.lr=1"], None, {}, ["--set 'optim.lr=1' is invalid", "KEY must start with one of"]),
]


@pytest.fixture
def clean_env(monkeypatch):
    for var in list(os.environ):
        if var.startswith(("SLURM_", "OMPI_", "PMI_", "PMIX_")) or var in LAUNCH_VARS:
            monkeypatch.delenv(var)
    return monkeypatch


def test_at_least_25_distinct_bad_configs():
    assert len({c[0] for c in CASES}) == len(CASES) >= 25


@pytest.mark.parametrize("name,overrides,env,extra,fragments", CASES, ids=[c[0] for c in CASES])
def test_bad_config_is_refused_before_any_process_group(clean_env, tmp_path, name, overrides, env, extra, fragments):
    import torch.distributed as dist

    for k, v in (env or {}).items():
        clean_env.setenv(k, v)
    kwargs = {"output": str(tmp_path / "out")}
    kwargs.update({k: (v(tmp_path) if callable(v) else v) for k, v in extra.items()})
    with pytest.raises(ValueError) as e:
        setup(TrainArgs(config=TINY, overrides=overrides, **kwargs))
    msg = str(e.value)
    for frag in fragments:
        assert frag in msg, f"{name}: {frag!r} not in {msg!r}"
    assert not dist.is_initialized()


def test_local_rank_beyond_the_gpus_is_refused(clean_env, tmp_path):
    """On a GPU node rank i takes GPU i: LOCAL_RANK 3 of a 2-GPU node cannot start (the device
    count is the one thing faked here; this machine has no GPU)."""
    import torch

    for k, v in {**TWO, "RANK": "1", "LOCAL_RANK": "3"}.items():
        clean_env.setenv(k, v)
    clean_env.setattr(torch.cuda, "is_available", lambda: True)
    clean_env.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match=r"LOCAL_RANK=3 is invalid: this node has 2 visible GPU\(s\) and rank i "
                                         r"uses GPU i; start at most that many ranks per node"):
        setup(TrainArgs(config=TINY, output=str(tmp_path / "out")))


@pytest.mark.parametrize("env,args,message", [
    ({**TWO, "WORLD_SIZE": "3", "MASTER_PORT": "9"}, [],
     "s2moe-train: error: train.batch_size=32 is invalid: must be divisible by world_size (3)"),
    ({}, ["--output", "{file}/run"], "s2moe-train: error: --output {file}/run: checkpoints cannot be written to"),
], ids=["world-3", "output-under-file"])
def test_real_cli_exits_2_with_one_line(tmp_path, env, args, message):
    """Through the console entry (a new interpreter): status 2, the message on stderr, no
    traceback, and nothing listening (MASTER_PORT 9 is never contacted)."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("SLURM_", "OMPI_", "PMI_", "PMIX_")) and k not in LAUNCH_VARS}
    proc = subprocess.run([sys.executable, "-m", "s2moe_dist.cli", "train", "--config", TINY,
                           *[a.format(file=afile) for a in args]],
                          env={**clean, **env, "OMP_NUM_THREADS": "1"}, cwd=str(tmp_path), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message.format(file=afile) in proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("s2moe-train: error:")]
    assert len(lines) == 1
