"""Multi-process test harness: real gloo process groups on CPU, free ports, bounded waits.

    def _body(rank, world_size, arg):      # top-level function (spawn pickles it by name)
        ...                                 # torch.distributed is initialised (gloo) here
        return {"out": tensor}             # any torch.save-able object

    results = run_distributed(_body, world_size=2, args=(arg,))   # list, one per rank
"""
from __future__ import annotations

import os
import socket
import tempfile
import time
import traceback

import torch
import torch.multiprocessing as mp

from s2moe_dist.train.distributed import remove_deepspeed_shm


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dist_env(rank: int, world_size: int, port: int) -> dict:
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
            "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_SIZE": str(world_size)}


def _worker(rank, fn, world_size, port, outdir, args, use_deepspeed):
    os.environ.update(dist_env(rank, world_size, port))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    result = None
    try:
        if use_deepspeed:
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


def _first_error(outdir: str, world_size: int):
    for rank in range(world_size):
        path = os.path.join(outdir, f"rank{rank}.pt")
        if os.path.exists(path):
            try:
                r = torch.load(path, weights_only=False)
            except Exception:  # noqa: BLE001 - still being written
                continue
            if r and "error" in r:
                return f"rank {rank} failed:\n{r['error']}"
    return None


def run_distributed(fn, world_size: int = 2, args: tuple = (), timeout: float = 300.0,
                    use_deepspeed: bool = False):
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return per-rank results.

    Raises with the failing rank's traceback; kills every rank after ``timeout`` s (no hang)."""
    port = free_port()
    with tempfile.TemporaryDirectory() as outdir:
        ctx = mp.start_processes(_worker, args=(fn, world_size, port, outdir, args, use_deepspeed),
                                 nprocs=world_size, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=1.0):
                failed = _first_error(outdir, world_size)
                if failed or time.monotonic() > deadline:
                    # a failed rank leaves the others blocked in a collective: stop them all now
                    for p in ctx.processes:
                        if p.is_alive():
                            p.kill()
                    if failed:
                        raise RuntimeError(failed)
                    raise TimeoutError(f"distributed test did not finish in {timeout:.0f}s (hang?)")
        finally:
            remove_deepspeed_shm("127.0.0.1", port)
        results = []
        for rank in range(world_size):
            path = os.path.join(outdir, f"rank{rank}.pt")
            if not os.path.exists(path):
                raise RuntimeError(f"rank {rank} wrote no result (crashed?)")
            r = torch.load(path, weights_only=False)
            if "error" in r:
                raise RuntimeError(f"rank {rank} failed:\n{r['error']}")
            results.append(r["ok"])
        return results
