"""Decode a corpus file once into a cache file of uint8 token ids, then memory-map it.

The cache file is keyed by the absolute path, size and mtime of the source and the corpus kind,
so an edited or replaced file is decoded again. It is written to a temporary file and moved
into place with ``os.replace`` (atomic): ranks racing to decode the same file are safe, and a
crash mid-write never leaves a partial cache behind.
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
from typing import Optional, Tuple

import numpy as np

from .reader import check_file, iter_chunks
from .vocab import TEXT8_BYTE_TO_ID, first_invalid_text8, text8_error

CACHE_VERSION = 1  # bump when the cache layout or the id mapping changes


def default_cache_dir() -> str:
    """``$S2MOE_CACHE_DIR`` if set, else ``~/.cache/s2moe``."""
    return os.environ.get("S2MOE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "s2moe")


def cache_path(path: str, kind: str, cache_dir: Optional[str] = None) -> str:
    """Where the decoded ids of ``path`` live: ``<cache_dir>/<name>-<kind>-<key>.u8``."""
    path = os.path.abspath(path)
    st = check_file(path)
    key = f"v{CACHE_VERSION}|{path}|{st.st_size}|{st.st_mtime_ns}|{kind}"
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:20]
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.basename(path))[:64]
    return os.path.join(cache_dir or default_cache_dir(), f"{stem}-{kind}-{digest}.u8")


def _decode_into(path: str, kind: str, out) -> int:
    """Stream ``path`` through the kind's id mapping into the open file ``out``; returns the
    number of tokens. text8 stops at the first byte outside its alphabet."""
    offset = 0
    for chunk in iter_chunks(path):
        raw = np.frombuffer(chunk, dtype=np.uint8)
        if kind == "text8":
            bad = first_invalid_text8(raw)
            if bad is not None:
                raise text8_error(f"data file {path!r}", int(raw[bad]), offset + bad)
            out.write(TEXT8_BYTE_TO_ID[raw].tobytes())
        else:
            out.write(chunk)
        offset += len(chunk)
    return offset


def decode_to_cache(path: str, kind: str, cache_dir: Optional[str] = None) -> Tuple[str, bool]:
    """Make sure the cache file of ``path`` exists; returns ``(cache_file, decoded_now)``."""
    target = cache_path(path, kind, cache_dir)
    if os.path.exists(target):
        return target, False
    folder = os.path.dirname(target)
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".decoding-", suffix=".tmp", dir=folder)
    except OSError as e:
        raise ValueError(f"cannot write the data cache in {folder!r} ({e}); pass cache_dir= "
                         f"(or set S2MOE_CACHE_DIR) to a writable folder") from e
    try:
        with os.fdopen(fd, "wb") as out:
            _decode_into(path, kind, out)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)  # atomic: a racing rank replaces it with identical bytes
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target, True


def open_cached(cache_file: str) -> np.ndarray:
    """Read-only memory map of a cache file (the OS shares its pages between ranks)."""
    return np.memmap(cache_file, dtype=np.uint8, mode="r")
