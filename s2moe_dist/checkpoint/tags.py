"""Tag folders of ``s2moe-train`` checkpoints: names, the completion marker and its manifest,
verification, resume candidates, pruning. Plain files, no process group (the collective ``save``
that writes a tag is ``s2moe_dist.train.checkpoint.save``).

DeepSpeed writes a tag folder, then (rank 0) truncates and rewrites the ``latest`` file in place:
a crash at that moment leaves ``latest`` empty or pointing at a half-written tag. So the tag is
written with ``save_latest=False``; once every rank has written its files, rank 0 writes a
``s2moe_complete.json`` marker into the tag and only then replaces ``latest`` atomically
(``atomic_write``: temp file + fsync + ``os.replace``). A tag without the marker is never resumed
from. ``latest`` keeps DeepSpeed's format (just the tag), so ``engine.load_checkpoint(dir)`` works.

The marker also holds a manifest: size and sha256 of every file of the tag. ``verify`` checks it
(sizes, optionally checksums, a share of the files per rank); ``find_resume_tag`` falls back to the
previous complete tag when a file is missing, truncated or changed; ``mark_damaged`` renames a
damaged tag ``global_stepN.damaged``.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from typing import Any, Callable, Dict, List, Optional

LATEST = "latest"
COMPLETE = "s2moe_complete.json"
MANIFEST = "files"  # marker key: {relative path: {"size": bytes, "sha256": hex}}
DAMAGED = ".damaged"  # suffix of a tag folder whose files failed the manifest check
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


def read_marker(ckpt_dir: str, tag: str) -> Dict[str, Any]:
    with open(os.path.join(ckpt_dir, tag, COMPLETE)) as f:
        return json.load(f)


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
