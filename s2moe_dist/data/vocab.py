"""The two character vocabularies: text8 (27 symbols) and enwik8 (raw bytes).

text8 ids: space -> 0, 'a' -> 1, ..., 'z' -> 26. enwik8 ids are the byte values 0..255.
"""
from __future__ import annotations

from typing import Iterable, Optional

import numpy as np

TEXT8_ALPHABET = " abcdefghijklmnopqrstuvwxyz"
KINDS = ("text8", "enwik8")
INVALID = 255  # marks a byte outside the text8 alphabet in TEXT8_BYTE_TO_ID

# byte value -> text8 id (INVALID for any other byte); id -> byte value
TEXT8_BYTE_TO_ID = np.full(256, INVALID, dtype=np.uint8)
TEXT8_BYTE_TO_ID[np.frombuffer(TEXT8_ALPHABET.encode("ascii"), dtype=np.uint8)] = np.arange(27)
TEXT8_ID_TO_BYTE = np.frombuffer(TEXT8_ALPHABET.encode("ascii"), dtype=np.uint8).copy()


def vocab_size(kind: str) -> int:
    return 27 if kind == "text8" else 256


def describe_byte(b: int) -> str:
    """'byte 0x41 ('A')' for printable ASCII, 'byte 0xc3' otherwise."""
    if 32 <= b < 127:
        return f"byte 0x{b:02x} ({chr(b)!r})"
    if b == 10:
        return "byte 0x0a (newline)"
    return f"byte 0x{b:02x}"


def first_invalid_text8(raw: np.ndarray) -> Optional[int]:
    """Index of the first byte of ``raw`` (uint8) outside the text8 alphabet, or None."""
    bad = TEXT8_BYTE_TO_ID[raw] == INVALID
    if not bad.any():
        return None
    return int(np.argmax(bad))


def text8_error(source: str, byte: int, offset: int) -> ValueError:
    return ValueError(
        f"{source}: {describe_byte(byte)} at offset {offset} is not a text8 symbol; text8 allows "
        f"exactly the 27 symbols a-z and space (no upper case, digits, punctuation or newlines). "
        f"For a raw-byte corpus pass kind='enwik8'.")


def encode(text: str, kind: str) -> np.ndarray:
    """``text`` -> uint8 token ids. text8 rejects any other character with a ValueError."""
    if kind == "text8":
        try:
            raw = np.frombuffer(text.encode("ascii"), dtype=np.uint8)
        except UnicodeEncodeError as e:
            raise ValueError(f"encode: character {text[e.start]!r} at offset {e.start} is not a "
                             f"text8 symbol (a-z and space)") from None
        bad = first_invalid_text8(raw)
        if bad is not None:
            raise ValueError(f"encode: character {text[bad]!r} at offset {bad} is not a text8 "
                             f"symbol (a-z and space)")
        return TEXT8_BYTE_TO_ID[raw]
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()


def decode(ids: Iterable[int], kind: str) -> str:
    """Token ids (list, numpy array or torch tensor) -> text. enwik8 bytes decode as UTF-8
    with invalid sequences replaced (a window may cut a multi-byte character)."""
    if hasattr(ids, "detach"):  # torch tensor, without importing torch here
        ids = ids.detach().cpu().numpy()
    arr = np.asarray(ids, dtype=np.int64).reshape(-1)
    limit = vocab_size(kind)
    if arr.size and (arr.min() < 0 or arr.max() >= limit):
        raise ValueError(f"decode: token ids must be in [0, {limit}) for {kind}, "
                         f"got min {arr.min()} max {arr.max()}")
    if kind == "text8":
        return TEXT8_ID_TO_BYTE[arr].tobytes().decode("ascii")
    return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is invalid: must be one of {list(KINDS)} (or 'auto' "
                         f"to pick from the file name)")
