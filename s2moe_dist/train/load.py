"""Load an ``s2moe-train`` checkpoint into a model on ONE process, whatever EP size / ZeRO stage /
world size wrote it: DeepSpeed's ``load_checkpoint(load_module_only=True)`` reads the dense
weights and one file per global expert, so a model built with ``ep_size=1`` takes all experts."""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Dict, Optional, Tuple

import torch

from ..checkpoint.keys import model_file
from . import checkpoint as ckpt
from .config import RunConfig, run_config_from_dict

MODEL_STATES = model_file(0)


def find_checkpoint(path: str) -> Tuple[str, str]:
    """(checkpoints folder, tag) from an output folder, its ``checkpoints`` folder or a tag folder."""
    path = os.path.abspath(path)
    for folder in (os.path.join(path, "checkpoints"), path):
        if os.path.isfile(os.path.join(folder, ckpt.LATEST)) or ckpt.complete_tags(folder):
            # checksums of the manifest checked: a damaged newest checkpoint falls back, with a warning
            tag = ckpt.find_resume_tag(folder, check="sha256",
                                       warn=lambda m: print(f"[s2moe-eval] {m}", file=sys.stderr, flush=True))
            if tag:
                return folder, tag
    if os.path.isfile(os.path.join(path, MODEL_STATES)):
        return os.path.dirname(path), os.path.basename(path)
    raise ValueError(f"--checkpoint {path!r}: no complete s2moe-train checkpoint there; pass a run's --output "
                     "folder, its checkpoints/ folder or a checkpoints/global_stepN folder")


def read_client_state(ckpt_dir: str, tag: str) -> Dict[str, Any]:
    path = os.path.join(ckpt_dir, tag, MODEL_STATES)
    if not os.path.isfile(path):
        raise ValueError(f"--checkpoint: {path} is missing (not a DeepSpeed checkpoint of s2moe-train)")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if "s2moe" not in state:
        raise ValueError(f"--checkpoint: {path} holds no s2moe-train state (written by another program?)")
    # the dtype each saved tensor trained in (bf16 under DeepSpeed bf16): the model is evaluated in it
    module = state.get("module") or {}
    dtypes = {n: t.dtype for n, t in module.items() if isinstance(t, torch.Tensor)}
    return {**state["s2moe"], "param_dtypes": dtypes}


def load_model(path: str, device="cpu", dtype: Optional[torch.dtype] = None):
    """-> (model in eval mode, RunConfig, client state). Starts a 1-process gloo group if none.

    The parameters get the dtype the checkpoint trained in (``dtype`` None; bf16 for a DeepSpeed
    bf16 run) or ``dtype``; buffers stay fp32 as under DeepSpeed's bf16 engine."""
    from .precision import cast_like_training, training_dtype

    import deepspeed
    import torch.distributed as dist

    from ..model import CharLM
    from .distributed import Launch, free_port, init_distributed

    ckpt_dir, tag = find_checkpoint(path)
    state = read_client_state(ckpt_dir, tag)
    saved = {k: dict(v) for k, v in state["config"].items()}
    saved["data"]["path"] = None  # the file may not exist here; s2moe-eval names its own
    run: RunConfig = run_config_from_dict(saved)
    run.data.path = state["config"]["data"].get("path")
    run.model.moe = dataclasses.replace(run.model.moe, ep_size=1, owner="model.moe")  # one process holds every expert
    tp_size, run.model.tp_size = run.model.tp_size, 1  # ... and whole dense layers (TP shards merged)
    if not dist.is_initialized():  # a 1-process group, whatever launcher variables are around
        init_distributed(Launch("single", 0, 1, 0, {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                                                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}),
                         backend="gloo" if str(device) == "cpu" else None)
    torch.manual_seed(0)
    from ..integrations.deepspeed import DeepSpeedS2MoE
    model = CharLM(run.model, moe_layer_cls=DeepSpeedS2MoE)  # DeepSpeed's engine loads the checkpoint
    if tp_size > 1:  # one model file per TP rank: merged here, not through DeepSpeed
        from .tp_checkpoint import merged_state_dict
        moe = run.model.moe
        model.load_state_dict(merged_state_dict(ckpt_dir, tag, model, tp_size, moe.activation,
                                                moe.enable_expert_tensor_parallelism))
        model = cast_like_training(model.float(), dtype or training_dtype(state["param_dtypes"]),
                                   None if dtype else state["param_dtypes"])
        return model.to(device).eval(), run, {**state, "checkpoint": os.path.join(ckpt_dir, tag)}
    cfg = {"train_batch_size": 1, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
           "steps_per_print": 10 ** 9}
    engine, _, _, _ = deepspeed.initialize(model=model, config=cfg)
    engine.load_checkpoint(ckpt_dir, tag=tag, load_module_only=True, load_optimizer_states=False,
                           load_lr_scheduler_states=False)
    model = cast_like_training(engine.module.float(), dtype or training_dtype(state["param_dtypes"]),
                               None if dtype else state["param_dtypes"])
    return model.to(device).eval(), run, {**state, "checkpoint": os.path.join(ckpt_dir, tag)}

