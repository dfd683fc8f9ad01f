"""Batches of (input, target) windows for training and evaluation, sharded over ranks.

Training (``ShardedBatches``): each epoch cuts the split into non-overlapping windows of
``seq_len + 1`` tokens at a random offset, shuffles them with a generator seeded by
``(seed, epoch)`` (the same permutation on every rank), and deals global batch ``g`` of
``batch_size * world_size`` windows out so that rank ``r`` gets the ``r``-th block of
``batch_size``. Ranks therefore never share a window within an epoch, every rank runs the same
number of steps, and the position is just ``(epoch, step)``: ``state_dict()`` saved with a
checkpoint makes a resumed run continue with exactly the same batches.

Evaluation (``EvalBatches``): contiguous non-overlapping windows from the start of the split,
every target token scored once; windows are split over ranks in contiguous blocks, each rank
gets the same number of windows (and so of batches: an expert-parallel forward needs every
rank) and the few tail windows that do not divide evenly are left out.
"""
from __future__ import annotations

from typing import Dict, Iterator, Optional, Tuple

import numpy as np
import torch

from ..config import check_int

Batch = Tuple[torch.Tensor, torch.Tensor]


def _check_rank(owner: str, rank: int, world_size: int) -> None:
    check_int(owner, "world_size", world_size, 1)
    check_int(owner, "rank", rank, 0)
    if rank >= world_size:
        raise ValueError(f"{owner}.rank={rank} is invalid: must be < world_size={world_size}")


def _too_short(owner: str, n: int, needed: int, why: str) -> ValueError:
    return ValueError(f"{owner}: the data split has {n} tokens, too short for {why} (needs at "
                      f"least {needed}); use a smaller seq_len/batch_size or a longer file")


def _gather(tokens: np.ndarray, starts: np.ndarray, seq_len: int, pin_memory: bool = False) -> Batch:
    """Rows ``tokens[s : s + seq_len + 1]`` -> (x, y) int64 [B, T], y shifted by one; in pinned
    (page-locked) memory with ``pin_memory``, so that ``.to(cuda, non_blocking=True)`` does not
    wait for the GPU."""
    idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
    rows = torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64))
    x, y = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
    return (x.pin_memory(), y.pin_memory()) if pin_memory else (x, y)


class ShardedBatches:
    """Endless iterator of training batches ``(x, y)``, int64 ``[batch_size, seq_len]``,
    this rank's shard of random windows of ``tokens`` (e.g. ``corpus.train``).

    Deterministic from ``(seed, epoch, step, rank, world_size)``. ``state_dict()`` /
    ``load_state_dict()`` carry the position for checkpoints. ``pin_memory`` (CUDA runs): batches
    in pinned memory.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, pin_memory: bool = False):
        owner = "ShardedBatches"
        check_int(owner, "seq_len", seq_len, 1)
        check_int(owner, "batch_size", batch_size, 1)
        check_int(owner, "seed", seed, 0)
        _check_rank(owner, rank, world_size)
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.global_batch = batch_size * world_size
        # the epoch with the largest offset (seq_len - 1) must still give every rank one batch
        needed = self.global_batch * (seq_len + 1) + seq_len - 1
        if len(tokens) < needed:
            raise _too_short(owner, len(tokens), needed,
                             f"one batch of {batch_size} windows of seq_len+1={seq_len + 1} tokens "
                             f"on each of {world_size} rank(s)")
        self.pin_memory = bool(pin_memory)
        self.epoch, self.step = 0, 0
        self._epoch_cache: Optional[Tuple[int, np.ndarray]] = None

    def _epoch_windows(self, epoch: int) -> np.ndarray:
        """All window starts of ``epoch``, in that epoch's shuffled order (same on all ranks)."""
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
            span = self.seq_len + 1
            offset = int(rng.integers(0, self.seq_len))
            count = (len(self.tokens) - offset) // span
            starts = offset + span * rng.permutation(count)
            self._epoch_cache = (epoch, starts)
        return self._epoch_cache[1]

    @property
    def steps_in_epoch(self) -> int:
        """Steps in the current epoch (it varies by at most one with the epoch's offset)."""
        return len(self._epoch_windows(self.epoch)) // self.global_batch

    def window_starts(self, epoch: int, step: int) -> np.ndarray:
        """Start offsets (into ``tokens``) of this rank's windows at ``(epoch, step)``."""
        first = step * self.global_batch + self.rank * self.batch_size
        return self._epoch_windows(epoch)[first:first + self.batch_size]

    def __iter__(self) -> "ShardedBatches":
        return self

    def __next__(self) -> Batch:
        if self.step >= self.steps_in_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        starts = self.window_starts(self.epoch, self.step)
        self.step += 1
        return _gather(self.tokens, starts, self.seq_len, self.pin_memory)

    def _settings(self) -> Dict[str, int]:
        return {"seed": self.seed, "world_size": self.world_size, "batch_size": self.batch_size,
                "seq_len": self.seq_len, "num_tokens": len(self.tokens)}

    def state_dict(self) -> Dict[str, int]:
        """Position and the settings it is valid for (plain ints: JSON/torch.save friendly)."""
        return {"epoch": self.epoch, "step": self.step, "rank": self.rank, **self._settings()}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        """Continue from ``state``; refuses a state saved with other data or settings (a
        different world size or batch size would give a different data order)."""
        for key, mine in self._settings().items():
            if key in state and int(state[key]) != mine:
                raise ValueError(
                    f"ShardedBatches.load_state_dict: saved {key}={state[key]} differs from this "
                    f"loader's {key}={mine}; resume with the same data, seed, world size, "
                    f"batch size and seq_len")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])


class EvalBatches:
    """Re-iterable batches ``(x, y)`` over ``tokens`` (e.g. ``corpus.valid``) in contiguous
    non-overlapping windows, for BPC. Every rank gets ``len(self)`` batches (equal on all
    ranks); the last batch may hold fewer than ``batch_size`` rows.

    ``max_batches`` caps the batches per rank (a quick estimate during training).
    ``num_targets`` is the number of target tokens this rank scores.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, rank: int = 0,
                 world_size: int = 1, max_batches: Optional[int] = None):
        owner = "EvalBatches"
        check_int(owner, "seq_len", seq_len, 1)
        check_int(owner, "batch_size", batch_size, 1)
        _check_rank(owner, rank, world_size)
        if max_batches is not None:
            check_int(owner, "max_batches", max_batches, 1)
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.rank, self.world_size = rank, world_size
        total = max(len(tokens) - 1, 0) // seq_len  # windows of seq_len+1 tokens, stride seq_len
        share = total // world_size
        if share == 0:
            raise _too_short(owner, len(tokens), world_size * seq_len + 1,
                             f"one window of seq_len+1={seq_len + 1} tokens on each of "
                             f"{world_size} rank(s)")
        count = share if max_batches is None else min(share, max_batches * batch_size)
        # rank r scores the contiguous block of windows [r * share, r * share + count)
        self.starts = (rank * share + np.arange(count)) * seq_len

    def __len__(self) -> int:
        return -(-len(self.starts) // self.batch_size)

    @property
    def num_targets(self) -> int:
        return len(self.starts) * self.seq_len

    def __iter__(self) -> Iterator[Batch]:
        for i in range(0, len(self.starts), self.batch_size):
            yield _gather(self.tokens, self.starts[i:i + self.batch_size], self.seq_len)
