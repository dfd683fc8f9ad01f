"""Run a function on N gloo ranks of this machine: the harness of the multi-process tests and the
benchmarks (one copy for both).

    def body(rank, world_size, arg):        # top-level function (spawn pickles it by name)
        ...                                 # torch.distributed (gloo) is initialised here
        return {"out": tensor}              # any torch.save-able object

    results = run_on_local_ranks(body, 2, args=(arg,))   # one result per rank

Spawned processes on a free port (never a fixed one: other jobs share the machine). A failing rank
stops every rank at once with its traceback (the others would wait in a collective forever); a
hang ends after ``timeout`` seconds; DeepSpeed's CPU shared-memory buffers are removed afterwards.
"""
from __future__ import annotations

import os
import tempfile
import time
import traceback
from typing import Any, Callable, List

import torch
import torch.multiprocessing as mp

from ..train.distributed import free_port, remove_deepspeed_shm


def local_rank_env(rank: int, world_size: int, port: int) -> dict:
    """The variables torchrun / the deepspeed launcher would set for ``rank`` on this machine."""
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
            "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_SIZE": str(world_size)}


def _worker(rank, fn, world_size, port, outdir, args, use_deepspeed, threads):
    os.environ.update(local_rank_env(rank, world_size, port))
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    try:
        if use_deepspeed:  # DeepSpeed's MoE and engine need deepspeed.comm initialised
            import deepspeed
            deepspeed.init_distributed(dist_backend="gloo", verbose=False)
        else:
            torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
        result = {"ok": fn(rank, world_size, *args)}
    except BaseException:  # noqa: BLE001 - report any failure to the parent
        result = {"error": traceback.format_exc()}
    finally:
        path = os.path.join(outdir, f"rank{rank}.pt")
        torch.save(result, path + ".tmp")
        os.replace(path + ".tmp", path)  # atomic: the parent never reads half a file
        if torch.distributed.is_initialized():
            try:
                torch.distributed.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass


def _read(outdir: str, rank: int):
    path = os.path.join(outdir, f"rank{rank}.pt")
    if not os.path.exists(path):
        return None
    return torch.load(path, weights_only=False)


def _first_error(outdir: str, world_size: int):
    for rank in range(world_size):
        r = _read(outdir, rank)
        if r and "error" in r:
            return f"rank {rank} failed:\n{r['error']}"
    return None


def run_on_local_ranks(fn: Callable[..., Any], world_size: int = 2, args: tuple = (), timeout: float = 300.0,
                       use_deepspeed: bool = False, threads: int = 1) -> List[Any]:
    """``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; the per-rank results.

    Raises with the failing rank's traceback; kills every rank after ``timeout`` s (no hang)."""
    port = free_port()
    with tempfile.TemporaryDirectory() as outdir:
        ctx = mp.start_processes(_worker, args=(fn, world_size, port, outdir, args, use_deepspeed, threads),
                                 nprocs=world_size, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=1.0):
                failed = _first_error(outdir, world_size)
                if failed or time.monotonic() > deadline:
                    for p in ctx.processes:
                        if p.is_alive():
                            p.kill()
                    if failed:
                        raise RuntimeError(failed)
                    raise TimeoutError(f"{world_size} local ranks did not finish in {timeout:.0f}s (hang?)")
        finally:
            remove_deepspeed_shm("127.0.0.1", port)
        results = []
        for rank in range(world_size):
            r = _read(outdir, rank)
            if r is None:
                raise RuntimeError(f"rank {rank} wrote no result (crashed?)")
            if "error" in r:
                raise RuntimeError(f"rank {rank} failed:\n{r['error']}")
            results.append(r["ok"])
        return results
