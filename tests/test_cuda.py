"""CUDA tests (marker ``cuda``): the layer and a trainer step on the GPU. Skipped, with the reason,
where torch sees no GPU; ``python -m pytest -m cuda`` runs only these on a GPU machine."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import gpu_parity as gp  # noqa: E402

pytestmark = pytest.mark.cuda
MODES = [m for m in gp.all_modes() if m.k == 2 or not m.drop_tokens]


@pytest.fixture(autouse=True)
def no_tf32():
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 on the GPU compared with fp32 on CPU
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name)
def test_layer_forward_backward_on_cuda_matches_cpu(mode):
    res = gp.compare_layer(mode, "cuda")
    assert res["ok"], res["problems"]


def test_one_trainer_step_on_cuda(monkeypatch, tmp_path):
    import torch.distributed as dist

    from dist_utils import LAUNCHER_PREFIXES, RANK_VARS
    from s2moe_dist.train.trainer import Trainer, TrainArgs, setup
    for var in list(os.environ):
        if var.startswith(LAUNCHER_PREFIXES) or var in RANK_VARS:
            monkeypatch.delenv(var)
    args = TrainArgs(config=os.path.join(ROOT, "configs", "model", "tiny.yaml"),
                     deepspeed=os.path.join(ROOT, "configs", "deepspeed", "zero1_fp32.json"),
                     overrides=["train.steps=1", "train.progress=false", "train.batch_size=8"],
                     output=str(tmp_path / "run"))
    trainer = Trainer(setup(args))
    saved = dict(os.environ)  # the process group exports RANK, MASTER_PORT, ...
    try:
        trainer.start()
        assert trainer.device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32  # train.allow_tf32
        before = [p.detach().clone() for p in trainer.model.parameters()]
        out = trainer._train_step(record=True)
        assert out["nonfinite"] is None and torch.isfinite(out["loss"]).all()
        assert all(p.device.type == "cuda" for p in trainer.model.parameters())
        assert out["loss"].device.type == "cuda"
        assert any(not torch.equal(a, p.detach()) for a, p in zip(before, trainer.model.parameters()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(saved)


def test_training_batches_are_pinned_for_non_blocking_copies():
    import numpy as np

    from s2moe_dist.data import ShardedBatches
    tokens = np.arange(4000, dtype=np.int64) % 27
    x, y = next(ShardedBatches(tokens, 16, 4, pin_memory=True))
    assert x.is_pinned() and y.is_pinned()
    plain = next(ShardedBatches(tokens, 16, 4))
    assert torch.equal(plain[0], x) and torch.equal(plain[1], y)  # same batch, other memory
