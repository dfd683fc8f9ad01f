"""Multi-process test harness: real gloo process groups on CPU, free ports, bounded waits.
The implementation is the package's (``s2moe_dist.parallel.local_ranks``), shared with the
benchmarks; the tests keep these names.

    results = run_distributed(_body, world_size=2, args=(arg,))   # list, one per rank
"""
from __future__ import annotations

from s2moe_dist.parallel.local_ranks import local_rank_env as dist_env  # noqa: F401
from s2moe_dist.parallel.local_ranks import run_on_local_ranks
from s2moe_dist.train.distributed import free_port  # noqa: F401


def run_distributed(fn, world_size: int = 2, args: tuple = (), timeout: float = 300.0,
                    use_deepspeed: bool = False):
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks (1 thread each)."""
    return run_on_local_ranks(fn, world_size, args, timeout=timeout, use_deepspeed=use_deepspeed)
