"""Crash-safe checkpoints on top of ``engine.save_checkpoint``.

DeepSpeed writes a tag folder, then (rank 0) truncates and rewrites the ``latest`` file in
place: a crash at that moment leaves ``latest`` empty or pointing at a half-written tag. So we
call ``save_checkpoint(save_latest=False)``, and once every rank has written its files
(DeepSpeed's closing barrier), rank 0 writes a ``s2moe_complete.json`` marker into the tag and
only then replaces ``latest`` atomically (temp file + fsync + ``os.replace``). A tag without
the marker is never resumed from. ``latest`` keeps DeepSpeed's format (just the tag), so
``engine.load_checkpoint(dir)`` works on our folders too.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from typing import Any, Dict, List, Optional

import numpy as np
import torch

LATEST = "latest"
COMPLETE = "s2moe_complete.json"
_TAG = re.compile(r"^global_step(\d+)$")


def tag_for(step: int) -> str:
    return f"global_step{step}"


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def is_complete(ckpt_dir: str, tag: str) -> bool:
    return os.path.isfile(os.path.join(ckpt_dir, tag, COMPLETE))


def complete_tags(ckpt_dir: str) -> List[str]:
    """Complete tags, oldest first (by step)."""
    if not os.path.isdir(ckpt_dir):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(ckpt_dir)
             if (m := _TAG.match(name)) and is_complete(ckpt_dir, name)]
    return [name for _, name in sorted(found)]


def find_resume_tag(ckpt_dir: str) -> Optional[str]:
    """The tag ``latest`` names if it is complete, else the newest complete tag, else None."""
    path = os.path.join(ckpt_dir, LATEST)
    if os.path.isfile(path):
        with open(path) as f:
            tag = f.read().strip()
        if tag and is_complete(ckpt_dir, tag):
            return tag
    tags = complete_tags(ckpt_dir)
    return tags[-1] if tags else None


def rng_state() -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def read_marker(ckpt_dir: str, tag: str) -> Dict[str, Any]:
    with open(os.path.join(ckpt_dir, tag, COMPLETE)) as f:
        return json.load(f)


def save(engine, ckpt_dir: str, step: int, client_state: Dict[str, Any], keep: int, rank: int,
         marker: Optional[Dict[str, Any]] = None) -> str:
    """Collective: every rank calls it. Returns the tag written. ``marker``: extra fields for the
    completion marker (small, readable before any process group: world size, model config)."""
    import torch.distributed as dist

    tag = tag_for(step)
    tag_dir = os.path.join(ckpt_dir, tag)
    if rank == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
        if os.path.isdir(tag_dir):  # left over from a crashed attempt at this step: start clean
            shutil.rmtree(tag_dir)
    dist.barrier()
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state, save_latest=False)
    # save_checkpoint ends with a barrier: all ranks' files are on disk now
    if rank == 0:
        atomic_write(os.path.join(tag_dir, COMPLETE),
                     json.dumps({"step": step, "time": time.time(), "world_size": dist.get_world_size(),
                                 **(marker or {})}))
        atomic_write(os.path.join(ckpt_dir, LATEST), tag)
        prune(ckpt_dir, keep, current=tag)
    dist.barrier()
    return tag


def prune(ckpt_dir: str, keep: int, current: str) -> None:
    """Keep the ``keep`` newest complete tags (0: all); drop incomplete ones older than ``current``."""
    cur = int(_TAG.match(current).group(1))
    done = complete_tags(ckpt_dir)
    old = done[:-keep] if keep > 0 else []
    for name in os.listdir(ckpt_dir):
        m = _TAG.match(name)
        if not m or name == current:
            continue
        stale = not is_complete(ckpt_dir, name) and int(m.group(1)) < cur
        if name in old or stale:
            shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)
