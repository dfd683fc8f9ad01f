"""Numeric precision of a run on its device: TF32 for fp32 GPU runs, and the dtype a checkpoint was
trained in (so that ``s2moe-eval`` scores the model as it trained, bf16-trained in bf16).

TF32: fp32 matmuls and convolutions on Ampere and newer GPUs use TensorFloat-32 tensor cores
(10-bit mantissa inputs, fp32 accumulation), several times faster than full fp32 GEMMs. PyTorch
leaves it off for matmuls by default; ``train.allow_tf32`` (default true) turns it on for CUDA
runs. It has no effect on CPU or on bf16 GEMMs.
"""
from __future__ import annotations

from collections import Counter
from typing import Mapping, Optional

import torch


def apply_tf32(device: torch.device, enabled: bool) -> bool:
    """Set TF32 for matmuls and cuDNN on a CUDA ``device``; returns whether TF32 is now on.
    On CPU nothing is changed (returns False)."""
    if torch.device(device).type != "cuda":
        return False
    torch.backends.cuda.matmul.allow_tf32 = bool(enabled)
    torch.backends.cudnn.allow_tf32 = bool(enabled)
    return bool(enabled)


def training_dtype(param_dtypes: Mapping[str, torch.dtype]) -> torch.dtype:
    """The dtype most saved floating parameters have (bf16 under DeepSpeed bf16; fp32 otherwise)."""
    floating = Counter(d for d in param_dtypes.values() if d.is_floating_point)
    return floating.most_common(1)[0][0] if floating else torch.float32


def cast_like_training(model: torch.nn.Module, dtype: torch.dtype,
                       saved: Optional[Mapping[str, torch.dtype]] = None) -> torch.nn.Module:
    """Parameters to ``dtype`` (buffers stay as they are, as DeepSpeed's bf16 engine leaves them);
    a parameter saved in another floating dtype (e.g. an fp32 router under bf16) keeps that one."""
    saved = saved or {}
    for name, p in model.named_parameters():
        if not p.is_floating_point():
            continue
        want = saved.get(name, dtype)
        want = want if want.is_floating_point else dtype
        if p.dtype != want:
            p.data = p.data.to(want)
    return model
