"""Character-level corpora (text8, enwik8, a built-in generated one) and their batch loaders.

    from s2moe_dist.data import load_corpus, ShardedBatches, EvalBatches

    corpus = load_corpus(path)              # None -> built-in corpus; .gz / .zip / plain file
    corpus.check_seq_len(seq_len)           # clear ValueError before training if too short
    train = ShardedBatches(corpus.train, seq_len, batch_size, rank, world_size, seed)
    train.load_state_dict(ckpt["data"])     # on resume; save train.state_dict() in checkpoints
    x, y = next(train)                      # int64 [batch_size, seq_len], y = x shifted by one
    for x, y in EvalBatches(corpus.valid, seq_len, batch_size, rank, world_size, max_batches=20):
        ...                                 # sum cross-entropy (nats) / num_targets / ln 2 = BPC

``load_corpus(path=None, kind="auto", split=(0.9, 0.05, 0.05), cache_dir=None) -> CharCorpus``
    ``kind``: 'text8' (27 symbols, ids: space=0, a..z=1..26), 'enwik8' (raw bytes, 256) or
    'auto' (file name contains 'enwik' -> enwik8, else text8). The file is decoded once into a
    uint8 cache file (``cache_dir``, default ``$S2MOE_CACHE_DIR`` or ``~/.cache/s2moe``), which
    every later load and every rank memory-maps. Missing / empty / truncated or corrupt
    archives and non-text8 bytes raise ValueError naming the file.
``CharCorpus``: ``.vocab_size``, ``.kind``, ``.tokens``, ``.train`` / ``.valid`` / ``.test``
    (uint8 arrays), ``.get_split(name)``, ``.encode(str) -> np.ndarray``, ``.decode(ids) -> str``,
    ``.check_seq_len(seq_len)``.
"""
from .builtin import DEFAULT_CHARS as BUILTIN_CHARS
from .builtin import generate_text
from .cache import default_cache_dir
from .corpus import DEFAULT_SPLIT, CharCorpus, detect_kind, load_corpus, split_sizes
from .loader import EvalBatches, ShardedBatches
from .vocab import TEXT8_ALPHABET

__all__ = ["load_corpus", "CharCorpus", "ShardedBatches", "EvalBatches", "DEFAULT_SPLIT",
           "TEXT8_ALPHABET", "BUILTIN_CHARS", "generate_text", "default_cache_dir",
           "detect_kind", "split_sizes"]
