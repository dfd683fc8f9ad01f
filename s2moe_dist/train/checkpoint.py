"""Crash-safe checkpoints on top of ``engine.save_checkpoint``: the collective ``save``.

Every rank probes the folder (write + fsync + delete) and all agree, so an unwritable folder is one
clear error on every rank; a write that fails inside DeepSpeed (disk full) is reported as
``CheckpointError`` naming the file system's free space. Either way the previous checkpoint is
untouched: nothing is pruned or pointed at before the new one is complete. The tag folder format
(completion marker, manifest, verification, resume candidates, pruning) is
``s2moe_dist.checkpoint.tags``; its names are re-exported here for the trainer and for users of
this module.
"""
from __future__ import annotations

import errno
import json
import os
import random
import shutil
import socket
import time
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from ..checkpoint.tags import (COMPLETE, DAMAGED, LATEST, MANIFEST, atomic_write, check_files,  # noqa: F401
                               complete_tags, damaged_tags, damaged_warning, describe_files, find_resume_tag,
                               is_complete, list_files, mark_damaged, prune, read_marker, resume_candidates,
                               sha256_file, tag_for, verify)


class CheckpointError(RuntimeError):
    """A checkpoint could not be written. The previous complete one is untouched."""


# ---- writability ------------------------------------------------------------------------------
def probe_write(folder: str) -> Optional[str]:
    """Create ``folder`` if needed, write + fsync + delete a small file in it: None if that
    worked, else the reason. Real failures even as root: ENOTDIR, EROFS, ENOSPC, EDQUOT."""
    probe = os.path.join(folder, f".s2moe_write_probe.{socket.gethostname()}.{os.getpid()}")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        os.remove(probe)
    except OSError as e:
        return f"{e.strerror or e} ({errno.errorcode.get(e.errno, e.errno)}): {e.filename or folder}"
    return None


def free_space(folder: str) -> str:
    path = folder
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    try:
        return f"{shutil.disk_usage(path or '/').free / 2 ** 20:.0f} MiB free on its file system"
    except OSError:
        return "free space unknown"


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


def save(engine, ckpt_dir: str, step: int, client_state: Dict[str, Any], keep: int, rank: int,
         marker: Optional[Dict[str, Any]] = None) -> str:
    """Collective: every rank calls it. Returns the tag written. ``marker``: extra fields for the
    completion marker (small, readable before any process group: world size, model config).
    Raises ``CheckpointError`` (the previous checkpoint untouched) when the files cannot be written."""
    import torch.distributed as dist

    world = dist.get_world_size()
    tag = tag_for(step)
    tag_dir = os.path.join(ckpt_dir, tag)
    previous = find_resume_tag(ckpt_dir, check=None)
    kept = (f"the previous checkpoint {os.path.join(ckpt_dir, previous)} is untouched (--resume auto "
            "continues from it)" if previous else "there is no earlier checkpoint")
    fix = "fix the cause (a full disk: free space; a lost rank: see its log), then resume with --resume auto"
    # every rank must be able to write there; agreeing first makes a bad folder one clear error on all
    problem = None
    if rank == 0:
        try:
            os.makedirs(ckpt_dir, exist_ok=True)
            if os.path.isdir(tag_dir):  # left over from a crashed attempt at this step: start clean
                shutil.rmtree(tag_dir)
        except OSError as e:
            problem = f"{e.strerror or e}: {e.filename or ckpt_dir}"
    problem = problem or probe_write(ckpt_dir)
    problems: List[Optional[str]] = [None] * world
    dist.all_gather_object(problems, problem)
    bad = [(r, p) for r, p in enumerate(problems) if p]
    if bad:
        err = CheckpointError(f"checkpoint {tag_dir} cannot be written (rank {bad[0][0]}: {bad[0][1]}; "
                              f"{free_space(ckpt_dir)}); {kept}; make the folder writable (--output) or free "
                              "space, then resume with --resume auto")
        err.agreed = True  # every rank raises it here
        raise err
    try:
        engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state, save_latest=False)
    except Exception as e:  # disk full inside torch.save reads "RuntimeError: ... unexpected pos"
        raise CheckpointError(f"rank {rank}: writing checkpoint {tag_dir} failed ({type(e).__name__}: "
                              f"{str(e).strip()}; {free_space(ckpt_dir)}); {kept}; {fix}") from e
    # save_checkpoint ends with a barrier: all ranks' files are on disk. Manifest: each rank hashes a share
    names = [list_files(tag_dir) if rank == 0 else None]
    dist.broadcast_object_list(names, src=0)
    shares: List[Dict[str, Any]] = [{}] * world
    dist.all_gather_object(shares, describe_files(tag_dir, names[0][rank::world]))
    if rank == 0:
        files = {name: entry for share in shares for name, entry in share.items()}
        try:
            atomic_write(os.path.join(tag_dir, COMPLETE),
                         json.dumps({"step": step, "time": time.time(), "world_size": world, **(marker or {}),
                                     MANIFEST: files}))
            atomic_write(os.path.join(ckpt_dir, LATEST), tag)
        except OSError as e:
            raise CheckpointError(f"rank 0: completing checkpoint {tag_dir} failed ({e}; {free_space(ckpt_dir)}); "
                                  f"{kept}; {fix}") from e
        prune(ckpt_dir, keep, current=tag)
    dist.barrier()
    return tag
