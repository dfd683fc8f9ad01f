"""Data: corpus files (plain/gz/zip), their errors, splits, the memmap cache, the built-in
corpus and the sharded train / eval loaders."""
import gzip
import hashlib
import math
import os
import threading
import zipfile

import numpy as np
import pytest
import torch

from s2moe_dist.data import (EvalBatches, ShardedBatches, load_corpus, split_sizes,
                             generate_text, BUILTIN_CHARS)
from s2moe_dist.data import reader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_HEAD = os.path.join(ROOT, "..", "shared", "data", "text8-head-12.5M.gz")
HEAD_SHA256 = "0e535fcbf0064c2dda5c5b611de12ba3fb0d928fe2e9b9d7528e2934097b3cb7"
ALPHABET = " abcdefghijklmnopqrstuvwxyz"


def _text(n, seed=0):
    """Random text8 text of n characters."""
    rng = np.random.default_rng(seed)
    return "".join(ALPHABET[i] for i in rng.integers(0, 27, n))


def _write(path, data: bytes, fmt="plain"):
    if fmt == "gzip":
        with gzip.open(path, "wb") as f:
            f.write(data)
    elif fmt == "zip":
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("text8", data)
    else:
        with open(path, "wb") as f:
            f.write(data)
    return str(path)


def _ids(text):  # independent reference mapping: space=0, a..z=1..26
    return np.array([ALPHABET.index(c) for c in text], dtype=np.uint8)


# ----------------------------------------------------------------------------- files and errors

@pytest.mark.parametrize("fmt,name", [("plain", "text8"), ("gzip", "text8.gz"), ("zip", "text8.zip")])
def test_formats_decode_to_text8_ids(tmp_path, fmt, name):
    text = _text(5000)
    path = _write(tmp_path / name, text.encode(), fmt)
    c = load_corpus(path, cache_dir=tmp_path / "cache")
    assert c.kind == "text8" and c.vocab_size == 27
    np.testing.assert_array_equal(np.asarray(c.tokens), _ids(text))
    assert c.decode(c.tokens) == text
    np.testing.assert_array_equal(c.encode(text[:50]), _ids(text[:50]))


def test_archive_detected_by_magic_without_extension(tmp_path):
    text = _text(300)
    path = _write(tmp_path / "corpus_data", text.encode(), "gzip")
    c = load_corpus(path, cache_dir=tmp_path / "cache")
    assert c.decode(c.tokens) == text and c.decode([]) == ""


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.gz")
    with pytest.raises(ValueError, match=r"data file '.*nope\.gz' does not exist"):
        load_corpus(path, cache_dir=tmp_path)


def test_directory_is_not_a_file(tmp_path):
    with pytest.raises(ValueError, match="is not a regular file"):
        load_corpus(str(tmp_path), cache_dir=tmp_path / "c")


def test_empty_plain_file(tmp_path):
    path = _write(tmp_path / "text8", b"")
    with pytest.raises(ValueError, match=r"text8' is empty \(0 bytes\)"):
        load_corpus(path, cache_dir=tmp_path)


@pytest.mark.parametrize("fmt,name", [("gzip", "e.gz"), ("zip", "e.zip")])
def test_empty_archive(tmp_path, fmt, name):
    path = _write(tmp_path / name, b"", fmt)
    with pytest.raises(ValueError, match=rf"{name}' is empty: its {fmt} archive holds 0 bytes"):
        load_corpus(path, cache_dir=tmp_path / "cache")
    assert not os.listdir(tmp_path / "cache")  # nothing cached, no temp file left


def test_truncated_gzip(tmp_path):
    full = _write(tmp_path / "full.gz", _text(20000).encode(), "gzip")
    data = open(full, "rb").read()
    path = _write(tmp_path / "cut.gz", data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.gz' is a truncated or corrupt gzip archive .*EOFError"):
        load_corpus(path, cache_dir=tmp_path / "cache")
    assert not os.listdir(tmp_path / "cache")


def test_corrupt_gzip(tmp_path):
    full = _write(tmp_path / "full.gz", _text(20000).encode(), "gzip")
    data = bytearray(open(full, "rb").read())
    for i in range(100, 140):  # scramble deflate data in the middle of the stream
        data[i] ^= 0x5A
    path = _write(tmp_path / "bad.gz", bytes(data))
    with pytest.raises(ValueError, match=r"bad\.gz' is a truncated or corrupt gzip archive"):
        load_corpus(path, cache_dir=tmp_path / "cache")


def test_truncated_zip(tmp_path):
    full = _write(tmp_path / "full.zip", _text(20000).encode(), "zip")
    data = open(full, "rb").read()
    path = _write(tmp_path / "cut.zip", data[: len(data) - 30])  # central directory cut off
    with pytest.raises(ValueError, match=r"cut\.zip' is a truncated or corrupt zip archive .*BadZipFile"):
        load_corpus(path, cache_dir=tmp_path / "cache")


def test_zip_with_two_members(tmp_path):
    path = tmp_path / "two.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("a", "abc")
        z.writestr("b", "def")
    with pytest.raises(ValueError, match=r"must hold exactly one file \(the corpus\), found 2: \['a', 'b'\]"):
        load_corpus(str(path), cache_dir=tmp_path / "cache")


def test_text8_rejects_other_symbols_naming_byte_and_offset(tmp_path):
    path = _write(tmp_path / "text8.gz", b"hello World", "gzip")
    with pytest.raises(ValueError, match=r"text8\.gz': byte 0x57 \('W'\) at offset 6 is not a "
                                         r"text8 symbol; text8 allows exactly the 27 symbols"):
        load_corpus(path, cache_dir=tmp_path / "cache")
    assert not os.listdir(tmp_path / "cache")  # a failed decode leaves nothing behind


def test_text8_error_offset_counts_across_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(reader, "CHUNK", 1000)
    data = bytearray(_text(5000).encode())
    data[3456] = 0xC3  # a non-ASCII byte in the fourth chunk
    path = _write(tmp_path / "t8", bytes(data))
    with pytest.raises(ValueError, match=r"byte 0xc3 at offset 3456 "):
        load_corpus(path, cache_dir=tmp_path / "cache")
    data[3456] = ord("a")
    data[4999] = ord("\n")  # a trailing newline is not text8 either
    _write(tmp_path / "t8", bytes(data))
    with pytest.raises(ValueError, match=r"byte 0x0a \(newline\) at offset 4999 "):
        load_corpus(path, cache_dir=tmp_path / "cache")


def test_enwik8_raw_bytes_auto_detected_and_override(tmp_path):
    raw = bytes(range(256)) * 20
    path = _write(tmp_path / "enwik8.zip", raw, "zip")
    c = load_corpus(path, cache_dir=tmp_path / "cache")
    assert c.kind == "enwik8" and c.vocab_size == 256
    np.testing.assert_array_equal(np.asarray(c.tokens), np.frombuffer(raw, dtype=np.uint8))
    with pytest.raises(ValueError, match=r"byte 0x00 at offset 0 is not a text8 symbol"):
        load_corpus(path, kind="text8", cache_dir=tmp_path / "cache")
    # a text8-named file read as bytes: ids are the byte values
    t = _write(tmp_path / "text8", b"ab c")
    t8 = load_corpus(t, kind="enwik8", split=(1.0, 0.0, 0.0), cache_dir=tmp_path / "cache")
    assert list(t8.tokens) == [97, 98, 32, 99] and len(t8.valid) == 0
    with pytest.raises(ValueError, match=r"kind='wiki' is invalid: must be one of \['text8', 'enwik8'\]"):
        load_corpus(t, kind="wiki", cache_dir=tmp_path / "cache")


def test_text8_encode_rejects_other_characters():
    c = load_corpus(builtin_chars=2000)
    with pytest.raises(ValueError, match=r"character 'B' at offset 1 is not a text8 symbol"):
        c.encode("aB")
    with pytest.raises(ValueError, match=r"character 'é' at offset 2 is not a text8 symbol"):
        c.encode("caé")


def test_too_short_for_seq_len(tmp_path):
    path = _write(tmp_path / "text8", _text(1000).encode())
    c = load_corpus(path, cache_dir=tmp_path)  # 900 / 50 / 50
    c.check_seq_len(49)
    with pytest.raises(ValueError, match=r"text8': the valid split has 50 tokens, too short for "
                                         r"seq_len=50 \(needs at least 51\)"):
        c.check_seq_len(50)
    with pytest.raises(ValueError, match=r"ShardedBatches: the data split has 900 tokens, too short "
                                         r"for one batch of 8 windows of seq_len\+1=101 tokens on "
                                         r"each of 2 rank\(s\) \(needs at least 1715\)"):
        ShardedBatches(c.train, 100, 8, rank=0, world_size=2)
    with pytest.raises(ValueError, match=r"EvalBatches: the data split has 50 tokens, too short"):
        EvalBatches(c.valid, 50, 4)


# ----------------------------------------------------------------------------- splits

def test_split_sizes():
    assert split_sizes(100_000_000, (0.9, 0.05, 0.05)) == (90_000_000, 5_000_000, 5_000_000)
    assert split_sizes(12_500_000, (0.9, 0.05, 0.05)) == (11_250_000, 625_000, 625_000)
    assert split_sizes(12_500_000, (11_000_000, 750_000, 750_000)) == (11_000_000, 750_000, 750_000)
    assert split_sizes(1001, (0.9, 0.05, 0.05)) == (901, 50, 50)  # test takes the rounding rest
    with pytest.raises(ValueError, match=r"fractions must sum to 1 \(they sum to 0.9\)"):
        split_sizes(100, (0.8, 0.05, 0.05))
    with pytest.raises(ValueError, match=r"asks for 1500 tokens but corpus holds only 1000"):
        split_sizes(1000, (1000, 250, 250))
    with pytest.raises(ValueError, match=r"10 tokens: too short for split=\(0.9, 0.05, 0.05\) "
                                         r"\(the valid split would be empty\)"):
        split_sizes(10, (0.9, 0.05, 0.05))


def test_corpus_splits_are_consecutive(tmp_path):
    text = _text(2000)
    c = load_corpus(_write(tmp_path / "text8", text.encode()), split=(0.8, 0.15, 0.05),
                    cache_dir=tmp_path)
    assert (len(c.train), len(c.valid), len(c.test)) == (1600, 300, 100)
    assert c.decode(c.train) + c.decode(c.valid) + c.decode(c.test) == text
    assert c.get_split("valid") is c.valid
    with pytest.raises(ValueError, match=r"split name 'val' is invalid"):
        c.get_split("val")


# ----------------------------------------------------------------------------- memmap cache

def test_cache_decodes_once_and_is_memory_mapped(tmp_path):
    path = _write(tmp_path / "text8.gz", _text(3000).encode(), "gzip")
    cache = tmp_path / "cache"
    first = load_corpus(path, cache_dir=cache)
    assert not first.from_cache and os.path.dirname(first.cache_file) == str(cache)
    mtime = os.stat(first.cache_file).st_mtime_ns
    second = load_corpus(path, cache_dir=cache)
    assert second.from_cache and second.cache_file == first.cache_file
    assert os.stat(second.cache_file).st_mtime_ns == mtime  # not rewritten
    assert isinstance(second.tokens, np.memmap) and not second.tokens.flags.writeable
    np.testing.assert_array_equal(np.asarray(second.tokens), np.asarray(first.tokens))
    assert os.listdir(cache) == [os.path.basename(first.cache_file)]
    # a changed source file (new size / mtime) is decoded again into a new cache file
    _write(tmp_path / "text8.gz", _text(3100).encode(), "gzip")
    third = load_corpus(path, cache_dir=cache)
    assert not third.from_cache and third.cache_file != first.cache_file and len(third.tokens) == 3100


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("S2MOE_CACHE_DIR", str(tmp_path / "envcache"))
    c = load_corpus(_write(tmp_path / "text8", _text(100).encode()))
    assert os.path.dirname(c.cache_file) == str(tmp_path / "envcache")


def test_concurrent_loads_race_safely(tmp_path):
    path = _write(tmp_path / "text8.gz", _text(200_000).encode(), "gzip")
    cache = tmp_path / "cache"
    results, errors = [], []

    def load():
        try:
            results.append(np.asarray(load_corpus(path, cache_dir=cache).tokens).copy())
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])
    assert len(os.listdir(cache)) == 1  # one cache file, no temp files left


# ----------------------------------------------------------------------------- built-in corpus

def _bigram_context_bpc(train, valid, order=2, vocab=27, alpha=0.1):
    """Reference: add-alpha character n-gram model (context of `order` chars), BPC on valid."""
    from collections import Counter
    tr, va = [int(t) for t in train], [int(t) for t in valid]
    joint = Counter(tuple(tr[i:i + order + 1]) for i in range(len(tr) - order))
    ctx = Counter(tuple(tr[i:i + order]) for i in range(len(tr) - order))
    bits = 0.0
    for i in range(len(va) - order):
        c = tuple(va[i:i + order])
        p = (joint[c + (va[i + order],)] + alpha) / (ctx[c] + alpha * vocab)
        bits -= math.log2(p)
    return bits / (len(va) - order)


def test_builtin_corpus_alphabet_size_determinism_learnability():
    c = load_corpus()
    assert c.name == "builtin" and c.kind == "text8" and c.vocab_size == 27
    assert 1_000_000 <= len(c.tokens) == BUILTIN_CHARS <= 2_000_000
    text = c.decode(c.tokens)
    assert set(text) == set(ALPHABET)  # exactly the text8 alphabet, every symbol used
    assert "  " not in text
    assert generate_text(20_000) == text[:20_000]  # deterministic, prefix-stable
    assert generate_text(20_000, seed=7) != text[:20_000]
    # structure to learn: unigram entropy is ~4.1 bits, a 2-char-context model far below it
    unigram = np.bincount(np.asarray(c.train), minlength=27) / len(c.train)
    h0 = -(unigram[unigram > 0] * np.log2(unigram[unigram > 0])).sum()
    assert h0 > 3.8
    assert _bigram_context_bpc(c.train[:300_000], c.valid[:20_000]) < 2.5
    with pytest.raises(ValueError, match=r"kind='enwik8' is invalid for the built-in corpus"):
        load_corpus(kind="enwik8")


# ----------------------------------------------------------------------------- training loader

def _random_tokens(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, n).astype(np.uint8)


def _locate(tokens, row):
    """Reference: the offset where `row` occurs in `tokens` (unique for random data)."""
    windows = np.lib.stride_tricks.sliding_window_view(tokens, len(row))
    hits = np.nonzero((windows == row).all(axis=1))[0]
    assert len(hits) == 1
    return int(hits[0])


def test_batches_are_windows_shifted_by_one():
    tokens = _random_tokens(20_000)
    it = ShardedBatches(tokens, seq_len=32, batch_size=4, rank=0, world_size=1, seed=3)
    for _ in range(3):
        x, y = next(it)
        assert x.shape == y.shape == (4, 32) and x.dtype == y.dtype == torch.int64
        for xr, yr in zip(x.numpy(), y.numpy()):
            s = _locate(tokens, xr.astype(np.uint8))
            np.testing.assert_array_equal(yr, tokens[s + 1:s + 33])


def test_loader_deterministic_and_seeded():
    tokens = _random_tokens(50_000)
    a = ShardedBatches(tokens, 16, 8, rank=1, world_size=2, seed=5)
    b = ShardedBatches(tokens, 16, 8, rank=1, world_size=2, seed=5)
    c = ShardedBatches(tokens, 16, 8, rank=1, world_size=2, seed=6)
    for _ in range(5):
        xa, ya = next(a)
        xb, yb = next(b)
        xc, _ = next(c)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(xa, xc)


def test_ranks_disjoint_within_epoch_and_equal_steps():
    tokens = _random_tokens(30_000)
    T, B, W = 20, 5, 3
    loaders = [ShardedBatches(tokens, T, B, rank=r, world_size=W, seed=1) for r in range(W)]
    steps = loaders[0].steps_in_epoch
    assert all(loader.steps_in_epoch == steps for loader in loaders) and steps >= 50
    spans = []
    for loader in loaders:
        rows = [next(loader)[0] for _ in range(steps)]
        starts = [_locate(tokens, r.numpy().astype(np.uint8)) for b in rows for r in b]
        spans.append(set(starts))
        assert loader.epoch == 0 and loader.step == steps
    for i in range(W):
        for j in range(i + 1, W):
            assert not spans[i] & spans[j]
    # windows of the whole epoch never overlap (each covers seq_len + 1 tokens)
    all_starts = np.sort(np.array(sorted(set().union(*spans))))
    assert len(all_starts) == W * steps * B
    assert (np.diff(all_starts) >= T + 1).all()
    # the next batch belongs to epoch 1, a reshuffled order
    next(loaders[0])
    assert (loaders[0].epoch, loaders[0].step) == (1, 1)


def test_state_dict_resume_gives_same_batches_across_epochs():
    tokens = _random_tokens(4_000)
    make = lambda: ShardedBatches(tokens, 30, 4, rank=1, world_size=2, seed=11)  # noqa: E731
    ref = make()
    per_epoch = ref.steps_in_epoch
    for _ in range(per_epoch - 2):  # stop two steps before the epoch boundary
        next(ref)
    state = ref.state_dict()
    assert state == {"epoch": 0, "step": per_epoch - 2, "rank": 1, "seed": 11, "world_size": 2,
                     "batch_size": 4, "seq_len": 30, "num_tokens": 4000}
    expected = [next(ref) for _ in range(6)]  # crosses into epoch 1
    resumed = make()
    resumed.load_state_dict(dict(state))
    for xe, ye in expected:
        x, y = next(resumed)
        assert torch.equal(x, xe) and torch.equal(y, ye)
    assert resumed.state_dict() == ref.state_dict()
    other = ShardedBatches(tokens, 30, 4, rank=0, world_size=1, seed=11)
    with pytest.raises(ValueError, match=r"saved world_size=2 differs from this loader's "
                                         r"world_size=1; resume with the same data"):
        other.load_state_dict(state)


def test_loader_argument_errors():
    tokens = _random_tokens(1000)
    with pytest.raises(ValueError, match=r"ShardedBatches.rank=2 is invalid: must be < world_size=2"):
        ShardedBatches(tokens, 8, 2, rank=2, world_size=2)
    with pytest.raises(ValueError, match=r"ShardedBatches.seq_len=0 is invalid: must be an integer >= 1"):
        ShardedBatches(tokens, 0, 2)
    with pytest.raises(ValueError, match=r"EvalBatches.max_batches=0 is invalid"):
        EvalBatches(tokens, 8, 2, max_batches=0)


# ----------------------------------------------------------------------------- eval loader

def test_eval_batches_contiguous_and_sharded():
    tokens = _random_tokens(1_000)
    T = 16
    full = EvalBatches(tokens, T, batch_size=5)
    n_windows = (len(tokens) - 1) // T  # 62
    assert len(full) == math.ceil(n_windows / 5) and full.num_targets == n_windows * T
    xs, ys = zip(*list(full))
    x, y = torch.cat(xs), torch.cat(ys)
    # every target token after the first scored exactly once, in order
    np.testing.assert_array_equal(y.reshape(-1).numpy(), tokens[1:1 + n_windows * T])
    np.testing.assert_array_equal(x.reshape(-1).numpy(), tokens[:n_windows * T])
    assert list(full)[0][0].shape == (5, T)  # re-iterable
    # 3 ranks: equal batch counts, disjoint contiguous blocks of the same windows
    shards = [EvalBatches(tokens, T, 5, rank=r, world_size=3) for r in range(3)]
    assert len({len(s) for s in shards}) == 1 and len({s.num_targets for s in shards}) == 1
    per = n_windows // 3
    for r, s in enumerate(shards):
        ys_r = torch.cat([b[1] for b in s])
        assert torch.equal(ys_r, y[r * per:(r + 1) * per])
    capped = EvalBatches(tokens, T, 5, rank=1, world_size=3, max_batches=2)
    assert len(capped) == 2 and capped.num_targets == 10 * T
    assert torch.equal(torch.cat([b[1] for b in capped]), y[per:per + 10])


# ----------------------------------------------------------------------------- the shared text8 head

def test_shared_text8_head_sha_and_split(tmp_path):
    if not os.path.exists(SHARED_HEAD):
        pytest.skip(f"{os.path.normpath(SHARED_HEAD)} not present (the shared data folder "
                    f"../shared/data is not next to this checkout)")
    c = load_corpus(SHARED_HEAD, cache_dir=tmp_path)
    assert c.kind == "text8" and len(c.tokens) == 12_500_000
    raw = np.frombuffer(ALPHABET.encode(), dtype=np.uint8)[np.asarray(c.tokens)]
    assert hashlib.sha256(raw.tobytes()).hexdigest() == HEAD_SHA256
    assert (len(c.train), len(c.valid), len(c.test)) == (11_250_000, 625_000, 625_000)
    readme = load_corpus(SHARED_HEAD, split=(11_000_000, 750_000, 750_000), cache_dir=tmp_path)
    assert readme.from_cache
    assert (len(readme.train), len(readme.valid), len(readme.test)) == (11_000_000, 750_000, 750_000)
    assert c.decode(c.train[:10]) == " anarchism"
