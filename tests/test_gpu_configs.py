"""The paper recipe for GPU clusters: configs/model/paper-text8-gpu.yaml splits its global batch over 8
and 16 ranks (the paper's 44 does not) at the paper's token budget; train.allow_tf32 is a checked
switch; TF32 is only touched on CUDA."""
import os

import pytest
import torch

from s2moe_dist.train.config import check_parallel_layout, load_run_config
from s2moe_dist.train.precision import apply_tf32, cast_like_training, training_dtype

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU = os.path.join(ROOT, "configs", "model", "paper-text8-gpu.yaml")
PAPER = os.path.join(ROOT, "configs", "model", "paper-text8.yaml")


@pytest.mark.parametrize("world", [8, 16])
def test_gpu_paper_config_validates_on_8_and_16_ranks(world):
    run = load_run_config(GPU)
    check_parallel_layout(run, world)
    assert run.train.micro_batch_size(world) * world == run.train.batch_size
    with pytest.raises(ValueError, match="train.batch_size=44 is invalid: must be divisible by world_size"):
        check_parallel_layout(load_run_config(PAPER), world)  # why the GPU config exists


def test_gpu_paper_config_keeps_the_paper_model_and_token_budget():
    gpu, paper = load_run_config(GPU), load_run_config(PAPER)
    assert gpu.model.to_dict() == paper.model.to_dict()
    tokens = lambda r: r.train.steps * r.train.batch_size * r.model.seq_len  # noqa: E731
    assert abs(tokens(gpu) / tokens(paper) - 1) < 1e-4
    assert gpu.train.lr == paper.train.lr and gpu.train.allow_tf32 is True


def test_allow_tf32_must_be_a_boolean():
    with pytest.raises(ValueError, match="train.allow_tf32"):
        load_run_config(GPU, ["train.allow_tf32=sometimes"])


def test_tf32_is_left_alone_on_cpu():
    before = torch.backends.cuda.matmul.allow_tf32
    assert apply_tf32(torch.device("cpu"), True) is False
    assert torch.backends.cuda.matmul.allow_tf32 == before


def test_cast_like_training_follows_the_saved_dtypes():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    model.register_buffer("table", torch.ones(3))
    saved = {"0.weight": torch.bfloat16, "0.bias": torch.bfloat16, "1.weight": torch.float32,
             "1.bias": torch.bfloat16}
    assert training_dtype(saved) == torch.bfloat16
    cast_like_training(model, torch.bfloat16, saved)
    assert [p.dtype for p in model.parameters()] == [torch.bfloat16, torch.bfloat16, torch.float32, torch.bfloat16]
    assert model.table.dtype == torch.float32  # buffers stay, as under DeepSpeed's bf16 engine
    assert training_dtype({}) == torch.float32
