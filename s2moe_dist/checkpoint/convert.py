"""Offline conversion of a DeepSpeed checkpoint of an S2MoE model to another EP size (``s2moe-ckpt reshard``).

Model and expert files are copied (they are EP-independent: one file per GLOBAL expert). ZeRO-0
optimizer files are rewritten for the new EP size (plain DeepSpeed loads them); ZeRO-1/2 state is
written EP- and DP-independent to ``s2moe_optim_states.pt`` (its layout is fixed only when an
engine exists) and restored by ``live.load_checkpoint``. Runs on one process (no torch.distributed).
"""
from __future__ import annotations

import os
import shutil
from typing import List, Optional, Tuple

import torch

from . import keys
from .io import load_pt, rank_files, resolve_tag
from .optim_formats import (MODEL_FILE, merge_zero0_banks, read_zero0, read_zero12, saved_layout, zero0_files,
                            zero0_pack, zero12_files)
from .optim_state import PORTABLE_FILE, OptimizerFormat


def _reshard_zero0_files(dst: str, files: List[Tuple[int, str]], new_ep: int) -> None:
    """Rewrite ZeRO-0 optimizer files (one per EP rank) for ``new_ep`` ranks: expert entries are
    concatenated over the saved EP ranks and split again; dense entries copied."""
    first = load_pt(files[0][1])
    merged = merge_zero0_banks(read_zero0(files))
    for e in range(new_ep):
        ckpt = {**first, "optimizer": zero0_pack(first["optimizer"], merged, e, new_ep)}
        torch.save(ckpt, os.path.join(dst, keys.zero0_optim_file(e)))


def _holds_module_experts(src: str) -> bool:
    """Expert files of TP rank 0 holding user expert modules (not the built-in bank)."""
    def rank0_expert(name):
        parsed = keys.parse_expert_file(name)
        return parsed.expert if parsed is not None and parsed.tp_rank == 0 else None

    for _, path in rank_files(src, rank0_expert):
        for key in load_pt(path):
            parsed = keys.parse_expert_key(key)
            if parsed is not None and parsed.layout is keys.Layout.DEEPSPEED and not parsed.is_bank_param:
                return True
    return False


def reshard_checkpoint(src_dir: str, dst_dir: str, new_ep_size: int, tag: Optional[str] = None) -> str:
    """Write a copy of checkpoint ``src_dir``/``tag`` into ``dst_dir`` for ``new_ep_size``; returns
    the tag. Model and expert files are copied (they are EP-independent); optimizer state: see the
    module docstring. Run on one process (no torch.distributed needed)."""
    from ..config import check_int
    check_int("reshard", "new_ep_size", new_ep_size, 1)
    tag = resolve_tag(src_dir, tag)
    src, dst = os.path.join(src_dir, tag), os.path.join(dst_dir, tag)
    if os.path.abspath(src) == os.path.abspath(dst):
        raise ValueError("reshard_checkpoint: dst_dir must differ from src_dir")
    if os.path.isfile(os.path.join(src, keys.model_file(1))):
        raise ValueError(f"reshard: {src} is tensor-parallel (one model file per TP rank); changing the EP size "
                         "of a TP checkpoint is not supported: resume it with the ep_size it was saved with")
    layout = saved_layout(src)
    for n in layout.num_experts or []:
        if n % new_ep_size:
            raise ValueError(f"reshard: new_ep_size={new_ep_size} must divide every layer's num_experts ({n})")
    os.makedirs(dst, exist_ok=True)
    optimizer_files = {path for _, path in zero0_files(src) + zero12_files(src)}
    for name in os.listdir(src):
        path = os.path.join(src, name)
        if path not in optimizer_files and os.path.isfile(path):
            shutil.copy2(path, os.path.join(dst, name))
    if layout.format is OptimizerFormat.ZERO0:
        if _holds_module_experts(src):
            raise ValueError("reshard_checkpoint: the ZeRO-0 optimizer state of user expert modules "
                             "(S2MoE(hidden, expert_module, ...)) names no parameters and cannot be converted "
                             "offline; load the checkpoint on the new layout instead (engine.load_checkpoint "
                             "reshards on load)")
        _reshard_zero0_files(dst, zero0_files(src), new_ep_size)
        model = load_pt(os.path.join(src, MODEL_FILE))
        if model.get("optimizer") is not None:  # DeepSpeed also keeps rank 0's optimizer state here
            model["optimizer"] = load_pt(os.path.join(dst, keys.zero0_optim_file(0)))["optimizer"]
            torch.save(model, os.path.join(dst, MODEL_FILE))
    elif layout.format is OptimizerFormat.ZERO12:
        torch.save(read_zero12(src, zero12_files(src)).to_portable(), os.path.join(dst, PORTABLE_FILE))
    with open(os.path.join(dst_dir, "latest"), "w") as f:
        f.write(tag)
    return tag
