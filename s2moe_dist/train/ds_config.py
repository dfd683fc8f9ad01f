"""The DeepSpeed config of a run: the ``--deepspeed`` JSON (ZeRO stage, precision, offload) with
the batch sizes and gradient clipping set from the run's ``train:`` section, checked before any
process group. The JSON presets carry example batch values; the run config decides them, and a
differing value is replaced with a note (printed by rank 0), never silently."""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional

from .config import TrainConfig

# DeepSpeed keys the run config owns
_OWNED = {"train_batch_size": "train.batch_size",
          "train_micro_batch_size_per_gpu": "train.batch_size / (world size x gradient_accumulation_steps)",
          "gradient_accumulation_steps": "train.gradient_accumulation_steps",
          "gradient_clipping": "train.grad_clip"}


def load_json(path: Optional[str]) -> Dict[str, Any]:
    if path is None:
        return {}
    if not os.path.isfile(path):
        raise ValueError(f"--deepspeed {path!r}: no such file; pass a DeepSpeed JSON such as "
                         "configs/deepspeed/zero1_fp32.json")
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"--deepspeed {path!r}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"--deepspeed {path!r}: must be a JSON object")
    return data


def build_ds_config(path: Optional[str], train: TrainConfig, world_size: int,
                    device: Optional[str] = None, notes: Optional[List[str]] = None) -> Dict[str, Any]:
    """-> the DeepSpeed config dict; ``notes`` (if given) collects the replaced JSON values."""
    cfg = load_json(path)
    ours = {"train_batch_size": train.batch_size,
            "train_micro_batch_size_per_gpu": train.micro_batch_size(world_size),
            "gradient_accumulation_steps": train.gradient_accumulation_steps,
            "gradient_clipping": float(train.grad_clip)}
    for key, value in ours.items():
        theirs = cfg.get(key, "auto")
        if theirs != "auto" and theirs != value and notes is not None:
            notes.append(f"ds_config.{key}={theirs!r} from {path} replaced by {value!r} ({_OWNED[key]})")
        cfg[key] = value
    if "scheduler" in cfg:
        raise ValueError(f"ds_config.scheduler (from {path}) is not used: s2moe-train sets the lr itself "
                         "every step (train.lr, train.warmup_steps, train.lr_schedule); remove that section")
    cfg.setdefault("steps_per_print", 10 ** 9)  # our own logging
    cfg.setdefault("wall_clock_breakdown", False)
    from ..integrations.deepspeed import validate_deepspeed_config
    # an "optimizer" section (e.g. DeepSpeedCPUAdam for offload) replaces our torch AdamW
    validate_deepspeed_config(cfg, model_has_moe=True, client_optimizer="optimizer" not in cfg, device=device)
    return cfg
