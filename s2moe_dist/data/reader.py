"""Stream the bytes of a corpus file: plain, ``.gz`` or ``.zip`` (the single member inside).

Every failure a user can cause (missing, empty, truncated or corrupt archive) becomes a
``ValueError`` that names the file, raised before any training starts.
"""
from __future__ import annotations

import contextlib
import gzip
import os
import zipfile
import zlib
from typing import Iterator, Optional

CHUNK = 8 << 20  # 8 MiB: bounded memory whatever the corpus size

_GZIP_MAGIC = b"\x1f\x8b"
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
# what the stdlib raises on a damaged archive
_ARCHIVE_ERRORS = (EOFError, zlib.error, zipfile.BadZipFile, gzip.BadGzipFile)


def archive_format(path: str) -> str:
    """'gzip', 'zip' or 'plain', from the extension, else from the first bytes."""
    lower = path.lower()
    if lower.endswith(".gz"):
        return "gzip"
    if lower.endswith(".zip"):
        return "zip"
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(_GZIP_MAGIC):
        return "gzip"
    if head in _ZIP_MAGICS:
        return "zip"
    return "plain"


def check_file(path: str) -> os.stat_result:
    """The file's stat, or a ValueError if it is missing, not a file, or empty."""
    if not os.path.exists(path):
        raise ValueError(f"data file {path!r} does not exist; pass the path of a text8/enwik8 file "
                         f"(plain, .gz or .zip), or no path for the built-in corpus")
    if not os.path.isfile(path):
        raise ValueError(f"data file {path!r} is not a regular file")
    st = os.stat(path)
    if st.st_size == 0:
        raise ValueError(f"data file {path!r} is empty (0 bytes)")
    return st


def _zip_member(zf: zipfile.ZipFile, path: str) -> zipfile.ZipInfo:
    members = [m for m in zf.infolist() if not m.is_dir()]
    if len(members) != 1:
        names = [m.filename for m in members]
        raise ValueError(f"zip archive {path!r} must hold exactly one file (the corpus), "
                         f"found {len(members)}: {names[:10]}")
    return members[0]


@contextlib.contextmanager
def _open_stream(path: str, fmt: str):
    if fmt == "plain":
        with open(path, "rb") as f:
            yield f
    elif fmt == "gzip":
        with gzip.open(path, "rb") as f:
            yield f
    else:
        with zipfile.ZipFile(path) as zf:
            with zf.open(_zip_member(zf, path)) as f:
                yield f


def iter_chunks(path: str, chunk_size: Optional[int] = None) -> Iterator[bytes]:
    """Yield the decompressed bytes of ``path`` in chunks. A damaged archive raises ValueError
    ('truncated or corrupt'); an archive that decompresses to nothing raises 'is empty'."""
    check_file(path)
    chunk_size = chunk_size or CHUNK
    fmt = archive_format(path)
    total = 0
    try:
        with _open_stream(path, fmt) as f:
            while True:
                chunk = f.read(chunk_size)
                if not chunk:
                    break
                total += len(chunk)
                yield chunk
    except _ARCHIVE_ERRORS as e:
        raise ValueError(f"data file {path!r} is a truncated or corrupt {fmt} archive "
                         f"(failed after {total} decompressed bytes: {type(e).__name__}: {e}); "
                         f"download it again") from e
    if total == 0:
        raise ValueError(f"data file {path!r} is empty: its {fmt} archive holds 0 bytes")
