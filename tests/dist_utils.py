"""Multi-process test harness: real gloo process groups on CPU, free ports, bounded waits.
The implementation is the package's (``s2moe_dist.testing.local_ranks``), shared with the
benchmarks; the tests keep these names.

    results = run_distributed(_body, world_size=2, args=(arg,))   # list, one per rank
"""
from __future__ import annotations

import os

from s2moe_dist.testing.local_ranks import local_rank_env as dist_env  # noqa: F401
from s2moe_dist.testing.local_ranks import run_on_local_ranks
from s2moe_dist.train.distributed import free_port  # noqa: F401


def run_distributed(fn, world_size: int = 2, args: tuple = (), timeout: float = 300.0,
                    use_deepspeed: bool = False):
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks (1 thread each)."""
    return run_on_local_ranks(fn, world_size, args, timeout=timeout, use_deepspeed=use_deepspeed)


LAUNCHER_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "PMIX_")
RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def single_process_env() -> dict:
    """This environment without launcher variables (Slurm, Open MPI, PMI, torchrun ranks): a child
    ``s2moe-train`` runs as one process; the project's extensions cache is kept."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_PREFIXES) and k not in RANK_VARS}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(root, ".torch_extensions"))
    return env
