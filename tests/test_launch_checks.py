"""Start-up checks on the launch environment, before any process group: the rendezvous address
resolves, a failed rendezvous is named as such, GPUs that torch cannot use are refused (not trained
around on the CPU), one GPU per task binds cuda:0; and the launchers hand the ranks their
environment (deepspeed.sh's DS_ENV_FILE / DS_LAUNCHER_ARGS).

The GPU refusal runs end to end with an ``nvidia-smi`` stub on PATH that lists two GPUs: it
exercises only the refusal message path (this machine has no GPU and a CPU torch), not a GPU.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from s2moe_dist.cli import collective_failed
from s2moe_dist.train.distributed import (Launch, check_cuda_usable, check_local_device, check_network,
                                          local_device_index, spans_hosts)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from dist_utils import single_process_env  # noqa: E402

TINY = os.path.join(ROOT, "configs", "model", "tiny.yaml")
ZERO1 = os.path.join(ROOT, "configs", "deepspeed", "zero1_fp32.json")
MICRO = ["model.seq_len=32", "model.d_model=32", "model.n_heads=2", "model.moe.ffn_hidden_size=64",
         "train.batch_size=8", "train.eval_every=0", "train.ckpt_every=0", "train.progress=false",
         "train.collective_timeout_s=10"]


def launch(world=2, rank=1):
    return Launch("env", rank, world, 0, {})


def test_spans_hosts_from_the_launchers_variables():
    assert spans_hosts(launch(), {"LOCAL_WORLD_SIZE": "1"})  # torchrun, one rank per node
    assert not spans_hosts(launch(), {"LOCAL_WORLD_SIZE": "2"})
    assert spans_hosts(launch(4), {"LOCAL_SIZE": "2"})  # deepspeed launcher
    assert not spans_hosts(launch(2), {"OMPI_COMM_WORLD_LOCAL_SIZE": "2"})
    assert spans_hosts(Launch("slurm", 0, 2, 0, {}), {"SLURM_JOB_NUM_NODES": "2"})
    assert not spans_hosts(launch(), {"MASTER_ADDR": "127.0.0.1"})
    assert spans_hosts(launch(), {"MASTER_ADDR": "10.1.2.3"})
    assert not spans_hosts(launch(1), {"MASTER_ADDR": "10.1.2.3"})


def test_gloo_across_hosts_refuses_a_hostname_that_resolves_to_loopback_first():
    env = {"MASTER_ADDR": "127.0.0.1", "LOCAL_WORLD_SIZE": "1"}
    with pytest.raises(ValueError, match=r"'localhost' resolves to 127\.0\.0\.1 first.*GLOO_SOCKET_IFNAME"):
        check_network(launch(), "gloo", env, hostname="localhost")
    check_network(launch(), "gloo", {**env, "GLOO_SOCKET_IFNAME": "eth0"}, hostname="localhost")  # the fix
    check_network(launch(), "nccl", env, hostname="localhost")  # NCCL picks its interface itself
    check_network(launch(), "gloo", {**env, "LOCAL_WORLD_SIZE": "2"}, hostname="localhost")  # one host


def test_local_device_one_gpu_per_task_is_cuda0():
    # --gpus-per-task=1 / --gpu-bind=single:1: each rank sees one device, whatever its LOCAL_RANK
    assert local_device_index(Launch("slurm", 3, 4, 3, {}), 1) == 0
    check_local_device(Launch("slurm", 3, 4, 3, {}), 1)
    assert local_device_index(Launch("slurm", 3, 4, 3, {}), 4) == 3
    with pytest.raises(ValueError, match="LOCAL_RANK=2 is invalid: this node has 2 visible GPU"):
        check_local_device(Launch("env", 2, 4, 2, {}), 2)


def test_cuda_refusal_names_the_fix():
    with pytest.raises(ValueError, match=r"2 GPU\(s\) \(nvidia-smi -L\) but torch 2\.9\.0 is a CPU-only build.*"
                                         r"CUDA build of torch.*S2MOE_DEVICE=cpu"):
        check_cuda_usable(2, False, "2.9.0", None, {})
    with pytest.raises(ValueError, match=r"\(CUDA 12\.6\) cannot use them: torch\.cuda\.is_available\(\) is False"):
        check_cuda_usable(8, False, "2.9.0", "12.6", {})
    check_cuda_usable(2, False, "2.9.0", None, {"S2MOE_DEVICE": "cpu"})  # CPU on purpose
    check_cuda_usable(0, False, "2.9.0", None, {})  # no GPU: CPU
    check_cuda_usable(2, True, "2.9.0", "12.6", {})


def test_collective_failed_recognises_rendezvous_and_timeout_errors():
    from torch.distributed import DistNetworkError
    assert collective_failed(DistNetworkError("The client socket has timed out after 10000ms while trying to "
                                              "connect to (nosuch, 29500)"))
    assert collective_failed(RuntimeError("[../gloo/transport/tcp/pair.cc:152] timed out connecting"))
    assert collective_failed(RuntimeError("Timed out waiting 30000ms for send operation to complete"))
    assert not collective_failed(RuntimeError("CUDA out of memory"))


def _train(env_extra, tmp_path, name):
    env = single_process_env()
    env.update(OMP_NUM_THREADS="1", **env_extra)
    log = open(tmp_path / f"{name}.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "s2moe_dist.cli", "train", "--config", TINY, "--deepspeed", ZERO1,
                             "--output", str(tmp_path / name), "--set", *MICRO, "train.steps=2"],
                            env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    return proc, log


def _text(log):
    log.flush()
    log.seek(0)
    return log.read()


def test_bad_rendezvous_and_gpus_without_cuda_fail_at_start_up_naming_the_fix(tmp_path):
    """Three s2moe-train processes at once (rank 1 of 2 each, so nothing listens for them)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]  # closed again: nothing listens there
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 (UUID: GPU-0)'\n"
                                     "echo 'GPU 1: NVIDIA H100 (UUID: GPU-1)'\n")
    (stub / "nvidia-smi").chmod(0o755)
    rank1 = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    runs = {
        "unresolved": _train({**rank1, "MASTER_ADDR": "nosuchnode-s2moe.invalid", "MASTER_PORT": str(dead_port)},
                             tmp_path, "unresolved"),
        "unreachable": _train({**rank1, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(dead_port)},
                              tmp_path, "unreachable"),
        "gpus": _train({"PATH": f"{stub}{os.pathsep}{os.environ['PATH']}"}, tmp_path, "gpus"),
    }
    t0 = time.monotonic()
    try:
        codes = {k: p.wait(240) for k, (p, _) in runs.items()}
    finally:
        for p, _ in runs.values():
            if p.poll() is None:
                p.kill()
    took = time.monotonic() - t0
    text = {k: _text(log) for k, (_, log) in runs.items()}
    assert codes["unresolved"] == 2, text["unresolved"][-3000:]
    assert "MASTER_ADDR='nosuchnode-s2moe.invalid' does not resolve on this host" in text["unresolved"]
    assert "S2MOE_MASTER_ADDR" in text["unresolved"] and "NodeAddr" in text["unresolved"]
    # nothing listens at MASTER_ADDR:MASTER_PORT: the client gives up after the timeout and says why
    assert codes["unreachable"] != 0
    assert "s2moe-train: error: a collective failed" in text["unreachable"], text["unreachable"][-3000:]
    assert f"rendezvous at MASTER_ADDR:MASTER_PORT=127.0.0.1:{dead_port} is unreachable" in text["unreachable"]
    if torch.cuda.is_available():
        pytest.skip("torch has CUDA here: the GPU refusal path does not apply")
    assert codes["gpus"] == 2, text["gpus"][-3000:]
    assert "this node has 2 GPU(s) (nvidia-smi -L) but torch" in text["gpus"]
    assert "S2MOE_DEVICE=cpu" in text["gpus"] and "step 1" not in text["gpus"]
    assert took < 200, took
