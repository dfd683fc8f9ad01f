"""Crash-safe checkpoints on top of ``engine.save_checkpoint``.

DeepSpeed writes a tag folder, then (rank 0) truncates and rewrites the ``latest`` file in
place: a crash at that moment leaves ``latest`` empty or pointing at a half-written tag. So we
call ``save_checkpoint(save_latest=False)``, and once every rank has written its files
(DeepSpeed's closing barrier), rank 0 writes a ``s2moe_complete.json`` marker into the tag and
only then replaces ``latest`` atomically (temp file + fsync + ``os.replace``). A tag without
the marker is never resumed from. ``latest`` keeps DeepSpeed's format (just the tag), so
``engine.load_checkpoint(dir)`` works on our folders too.

The marker also holds a manifest: size and sha256 of every file of the tag (each rank hashes a
share). A resume checks it (sizes before any process group, checksums after, each rank a share)
and falls back to the previous complete tag, with a warning, when a file is missing, truncated
or changed; the damaged tag is renamed ``global_stepN.damaged``. Before writing, every rank
probes the folder (write + fsync + delete) and all agree, so an unwritable folder is one clear
error on every rank; a write that fails inside DeepSpeed (disk full) is reported as
``CheckpointError`` naming the file system's free space. Either way the previous checkpoint is
untouched: nothing is pruned or pointed at before the new one is complete.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import socket
import time
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

LATEST = "latest"
COMPLETE = "s2moe_complete.json"
MANIFEST = "files"  # marker key: {relative path: {"size": bytes, "sha256": hex}}
DAMAGED = ".damaged"  # suffix of a tag folder whose files failed the manifest check
_TAG = re.compile(r"^global_step(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written. The previous complete one is untouched."""


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


def damaged_tags(ckpt_dir: str) -> List[str]:
    """Tag folders renamed by ``mark_damaged``, by name."""
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(n for n in os.listdir(ckpt_dir) if n.endswith(DAMAGED) and _TAG.match(n[:-len(DAMAGED)]))


def complete_tags(ckpt_dir: str) -> List[str]:
    """Complete tags, oldest first (by step)."""
    if not os.path.isdir(ckpt_dir):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(ckpt_dir)
             if (m := _TAG.match(name)) and is_complete(ckpt_dir, name)]
    return [name for _, name in sorted(found)]


def resume_candidates(ckpt_dir: str) -> List[str]:
    """Complete tags to resume from, best first: the one ``latest`` names, then newest first."""
    first = []
    path = os.path.join(ckpt_dir, LATEST)
    if os.path.isfile(path):
        with open(path) as f:
            tag = f.read().strip()
        if tag and is_complete(ckpt_dir, tag):
            first = [tag]
    return first + [t for t in reversed(complete_tags(ckpt_dir)) if t not in first]


def find_resume_tag(ckpt_dir: str, check: Optional[str] = "size",
                    warn: Optional[Callable[[str], None]] = None) -> Optional[str]:
    """The first of ``resume_candidates`` whose files pass the manifest ``check`` ("size": every
    file there with its size; "sha256": and its checksum; None: the marker only), else None.
    Skipped tags are reported through ``warn``."""
    for tag in resume_candidates(ckpt_dir):
        problem = verify(ckpt_dir, tag, checksums=check == "sha256") if check else None
        if problem is None:
            return tag
        if warn is not None:
            warn(damaged_warning(ckpt_dir, tag, problem))
    return None


def damaged_warning(ckpt_dir: str, tag: str, problem: str) -> str:
    return (f"WARNING: checkpoint {os.path.join(ckpt_dir, tag)} is damaged ({problem}); not loading it, "
            "falling back to the previous complete checkpoint")


# ---- manifest --------------------------------------------------------------------------------
def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                return h.hexdigest()
            h.update(block)


def list_files(tag_dir: str) -> List[str]:
    """Every file of a tag folder (relative paths, sorted), the marker excluded."""
    out = []
    for root, _, files in os.walk(tag_dir):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), tag_dir)
            if rel != COMPLETE and ".tmp." not in name:
                out.append(rel)
    return sorted(out)


def describe_files(tag_dir: str, names: List[str]) -> Dict[str, Dict[str, Any]]:
    return {n: {"size": os.path.getsize(os.path.join(tag_dir, n)), "sha256": sha256_file(os.path.join(tag_dir, n))}
            for n in names}


def check_files(tag_dir: str, manifest: Dict[str, Dict[str, Any]], names: List[str], checksums: bool) -> List[str]:
    """Problems of ``names`` against the manifest: missing, wrong size, wrong checksum."""
    problems = []
    for n in names:
        path, want = os.path.join(tag_dir, n), manifest[n]
        if not os.path.isfile(path):
            problems.append(f"{n} is missing")
        elif os.path.getsize(path) != want["size"]:
            problems.append(f"{n} has {os.path.getsize(path)} bytes, the manifest says {want['size']}")
        elif checksums and sha256_file(path) != want["sha256"]:
            problems.append(f"{n} does not match its sha256 checksum")
    return problems


def verify(ckpt_dir: str, tag: str, checksums: bool = True, share=(0, 1)) -> Optional[str]:
    """None if the tag's files (this rank's ``share`` = (rank, world) of them) match the manifest
    in its marker (or the marker has none: written before manifests), else what is wrong."""
    try:
        manifest = read_marker(ckpt_dir, tag).get(MANIFEST)
    except (OSError, ValueError) as e:
        return f"unreadable {COMPLETE}: {e}"
    if manifest is None:
        return None
    rank, world = share
    problems = check_files(os.path.join(ckpt_dir, tag), manifest, sorted(manifest)[rank::world], checksums)
    return "; ".join(problems[:3]) + (f" (+{len(problems) - 3} more)" if len(problems) > 3 else "") or None


def mark_damaged(ckpt_dir: str, tag: str) -> str:
    """Rename a damaged tag out of the way (kept for inspection, never resumed or pruned)."""
    src, dst = os.path.join(ckpt_dir, tag), os.path.join(ckpt_dir, tag + DAMAGED)
    if os.path.isdir(dst):
        shutil.rmtree(dst, ignore_errors=True)
    os.replace(src, dst)
    return dst


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


def read_marker(ckpt_dir: str, tag: str) -> Dict[str, Any]:
    with open(os.path.join(ckpt_dir, tag, COMPLETE)) as f:
        return json.load(f)


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
