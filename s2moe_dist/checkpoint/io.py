"""Reading a checkpoint tag folder: torch files, DeepSpeed's file lists, the ``latest`` tag."""
from __future__ import annotations

import os
from typing import Callable, List, Optional, Tuple

import torch


def load_pt(path: str):
    """A checkpoint file on the CPU (DeepSpeed's files hold more than tensors: ``weights_only=False``)."""
    return torch.load(path, map_location="cpu", weights_only=False)


def rank_files(ckpt_dir: str, parse: Callable[[str], Optional[int]]) -> List[Tuple[int, str]]:
    """[(rank, path)] of the files of ``ckpt_dir`` that ``parse`` (a ``keys.parse_*_file``) numbers, by rank."""
    found = []
    for name in os.listdir(ckpt_dir):
        rank = parse(name)
        if rank is not None:
            found.append((rank, os.path.join(ckpt_dir, name)))
    return sorted(found)


def resolve_tag(load_dir: str, tag: Optional[str] = None) -> str:
    """``tag``, or the one DeepSpeed's ``latest`` file in ``load_dir`` names."""
    if tag is not None:
        return str(tag)
    latest = os.path.join(load_dir, "latest")
    if not os.path.isfile(latest):
        raise ValueError(f"no tag given and no 'latest' file in {load_dir!r}: pass tag=")
    with open(latest) as f:
        return f.read().strip()
