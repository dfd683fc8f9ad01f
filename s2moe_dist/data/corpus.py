"""``CharCorpus``: a character corpus split into train / valid / test id arrays."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple

import numpy as np

from . import vocab
from .cache import decode_to_cache, open_cached

DEFAULT_SPLIT = (0.9, 0.05, 0.05)
SPLIT_NAMES = ("train", "valid", "test")


def detect_kind(path: str) -> str:
    """'enwik8' when the file name contains 'enwik' (any case), else 'text8'."""
    return "enwik8" if "enwik" in os.path.basename(path).lower() else "text8"


def split_sizes(n: int, split: Sequence[float], source: str = "corpus") -> Tuple[int, int, int]:
    """Token counts of (train, valid, test) for ``n`` tokens.

    ``split`` is three fractions summing to 1 (``(0.9, 0.05, 0.05)``: 90M/5M/5M of the full
    text8, 11.25M/625k/625k of a 12.5M head; test takes what rounding leaves) or three integer
    counts with sum <= n (``(11_000_000, 750_000, 750_000)``; the tail beyond is unused).
    """
    split = tuple(split)
    if len(split) != 3:
        raise ValueError(f"split={split!r} is invalid: give three numbers (train, valid, test)")
    for v in split:
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or v < 0:
            raise ValueError(f"split={split!r} is invalid: each entry must be a number >= 0")
    if all(isinstance(v, (int, np.integer)) for v in split) and sum(split) > 1:
        sizes = tuple(int(v) for v in split)
        if sum(sizes) > n:
            raise ValueError(f"split={split!r} asks for {sum(sizes)} tokens but {source} holds "
                             f"only {n}; use smaller counts or fractions such as (0.9, 0.05, 0.05)")
    else:
        if abs(sum(split) - 1.0) > 1e-6:
            raise ValueError(f"split={split!r} is invalid: fractions must sum to 1 "
                             f"(they sum to {sum(split):g}), e.g. (0.9, 0.05, 0.05)")
        train = int(round(n * split[0]))
        valid = int(round(n * split[1]))
        sizes = (train, valid, n - train - valid)
    for name, frac, size in zip(SPLIT_NAMES, split, sizes):
        if frac > 0 and size == 0:
            raise ValueError(f"{source} has only {n} tokens: too short for split={split!r} "
                             f"(the {name} split would be empty)")
    return sizes


@dataclass
class CharCorpus:
    """A character-level corpus.

    Attributes:
        name: file name, or 'builtin'.
        kind: 'text8' (ids 0..26: space, a..z) or 'enwik8' (ids = byte values 0..255).
        vocab_size: 27 or 256.
        tokens: all token ids (uint8; a read-only ``np.memmap`` for a file).
        train, valid, test: consecutive slices of ``tokens`` (views, no copy).
        path: source file (None for the built-in corpus); cache_file: the memmap's file.
        from_cache: True when this load reused a cache file decoded earlier.
    """

    name: str
    kind: str
    tokens: np.ndarray
    split: Tuple[float, float, float] = DEFAULT_SPLIT
    path: Optional[str] = None
    cache_file: Optional[str] = None
    from_cache: bool = False
    train: np.ndarray = field(init=False, repr=False)
    valid: np.ndarray = field(init=False, repr=False)
    test: np.ndarray = field(init=False, repr=False)

    def __post_init__(self):
        vocab.check_kind(self.kind)
        n_train, n_valid, n_test = split_sizes(len(self.tokens), self.split, self.source)
        self.train = self.tokens[:n_train]
        self.valid = self.tokens[n_train:n_train + n_valid]
        self.test = self.tokens[n_train + n_valid:n_train + n_valid + n_test]

    @property
    def source(self) -> str:
        return f"data file {self.path!r}" if self.path else f"corpus {self.name!r}"

    @property
    def vocab_size(self) -> int:
        return vocab.vocab_size(self.kind)

    def get_split(self, name: str) -> np.ndarray:
        """``'train'``, ``'valid'`` or ``'test'`` -> its id array."""
        if name not in SPLIT_NAMES:
            raise ValueError(f"split name {name!r} is invalid: must be one of {list(SPLIT_NAMES)}")
        return getattr(self, name)

    def encode(self, text: str) -> np.ndarray:
        """Text -> uint8 ids (text8 raises ValueError on a character outside a-z and space)."""
        return vocab.encode(text, self.kind)

    def decode(self, ids) -> str:
        """Ids (list, numpy array or torch tensor) -> text."""
        return vocab.decode(ids, self.kind)

    def check_seq_len(self, seq_len: int, splits: Sequence[str] = SPLIT_NAMES) -> None:
        """Raise ValueError if a non-empty split is too short for one window of ``seq_len``
        inputs plus its shifted target (``seq_len + 1`` tokens). Call before training."""
        for name in splits:
            arr = self.get_split(name)
            if len(arr) and len(arr) < seq_len + 1:
                raise ValueError(
                    f"{self.source}: the {name} split has {len(arr)} tokens, too short for "
                    f"seq_len={seq_len} (needs at least {seq_len + 1}); use a smaller seq_len "
                    f"or a longer file")

    def __repr__(self) -> str:
        sizes = "/".join(str(len(a)) for a in (self.train, self.valid, self.test))
        return (f"CharCorpus(name={self.name!r}, kind={self.kind!r}, vocab_size={self.vocab_size}, "
                f"train/valid/test={sizes}, cache_file={self.cache_file!r})")


def load_corpus(path: Optional[str] = None, kind: str = "auto",
                split: Sequence[float] = DEFAULT_SPLIT, cache_dir: Optional[str] = None,
                builtin_chars: Optional[int] = None) -> CharCorpus:
    """Load a character corpus.

    Args:
        path: text8 / enwik8 file, plain, ``.gz`` or ``.zip`` (the single member inside).
            None: the project's built-in generated corpus (text8 alphabet, no file needed).
        kind: 'text8', 'enwik8' or 'auto' (file name contains 'enwik' -> enwik8, else text8).
        split: (train, valid, test) fractions summing to 1, or integer token counts.
        cache_dir: where decoded ids are cached (default ``$S2MOE_CACHE_DIR`` or
            ``~/.cache/s2moe``). The first load decodes once; later loads, on every rank,
            only memory-map the cache file.
        builtin_chars: size of the built-in corpus (default ``builtin.DEFAULT_CHARS``).

    Raises ValueError, naming the file, for a missing or empty file, a truncated or corrupt
    archive, a byte outside the text8 alphabet (with its offset), or a bad ``split``.
    """
    if path is None:
        from .builtin import DEFAULT_CHARS, builtin_tokens

        if kind not in ("auto", "text8"):
            raise ValueError(f"kind={kind!r} is invalid for the built-in corpus: it is text8 "
                             f"(27 symbols); pass a path for an {kind} corpus")
        return CharCorpus("builtin", "text8", builtin_tokens(builtin_chars or DEFAULT_CHARS), split)
    path = os.fspath(path)
    if kind == "auto":
        kind = detect_kind(path)
    vocab.check_kind(kind)
    cache_file, decoded = decode_to_cache(path, kind, cache_dir)
    return CharCorpus(os.path.basename(path), kind, open_cached(cache_file), split,
                      path=path, cache_file=cache_file, from_cache=not decoded)
