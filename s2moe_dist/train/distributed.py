"""Rank / world from whichever launcher started us, and process-group start-up.

Launchers and what they set:
  deepspeed launcher, torchrun      RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT
  srun (Slurm)                      SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_(JOB_)NODELIST
  mpirun (Open MPI / MPICH / PMIx)  OMPI_COMM_WORLD_* / PMI_* / PMIX_RANK: DeepSpeed's MPI
                                    discovery (mpi4py) fills in the rest
  nothing                           a single process on a free local port
``resolve_launch`` only reads the environment (no process group), so configs that depend on
the world size are validated before anything starts.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
from dataclasses import dataclass
from typing import Dict, Mapping, Optional

DEFAULT_PORT = 29500


@dataclass
class Launch:
    launcher: str  # "env" (deepspeed / torchrun), "slurm", "mpi" or "single"
    rank: int
    world_size: int
    local_rank: int
    env: Dict[str, str]  # variables to export before the process group starts


def first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm node list: ``node[003-005,010],gpu7`` -> ``node003``.

    Uses ``scontrol show hostnames`` when available (handles every form), else parses the
    common ``prefix[a-b,c]`` / comma forms itself."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=10)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    first = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not first:
        raise ValueError(f"SLURM_NODELIST={nodelist!r}: cannot read the first host; set MASTER_ADDR")
    prefix, _, ranges = first.groups()
    if not ranges:
        return prefix
    lo = ranges.split(",")[0].split("-")[0]
    return prefix + lo


def slurm_node_addr(node: str) -> str:
    """The address other nodes reach Slurm node ``node`` at: its NodeAddr (``scontrol show node``),
    which a site may set where the NodeName itself does not resolve; the name when unknown."""
    try:
        out = subprocess.run(["scontrol", "show", "node", "-o", node], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return node
    m = re.search(r"(?:^|\s)NodeAddr=(\S+)", out.stdout) if out.returncode == 0 else None
    return m.group(1) if m and m.group(1) not in ("(null)", "") else node


def _int_env(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ValueError(f"environment variable {name}={env[name]!r} is not an integer") from None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_ranks(rank: int, world: int, local: int, names, env: Mapping[str, str]) -> None:
    """The launcher's numbers must make sense: a rank outside the world would wait at rendezvous."""
    rank_var, size_var, local_var = names
    if world < 1:
        raise ValueError(f"environment variable {size_var}={world} is invalid: must be >= 1 (the number of ranks)")
    if not 0 <= rank < world:
        raise ValueError(f"environment variable {rank_var}={rank} is invalid: must be in [0, {size_var}={world}); "
                         "check the launcher's rank numbering")
    if local < 0:
        raise ValueError(f"environment variable {local_var}={local} is invalid: must be >= 0")
    per_node = env.get("LOCAL_WORLD_SIZE")  # torchrun
    if per_node is not None and local >= _int_env(env, "LOCAL_WORLD_SIZE"):
        raise ValueError(f"environment variable {local_var}={local} is invalid: must be < LOCAL_WORLD_SIZE="
                         f"{per_node} (ranks on this node)")
    port = env.get("MASTER_PORT")
    if port is not None and (not port.isdigit() or not 1 <= int(port) <= 65535):
        raise ValueError(f"environment variable MASTER_PORT={port!r} is invalid: must be a TCP port in [1, 65535] "
                         "that every rank can reach on MASTER_ADDR")


def local_device_index(launch: "Launch", device_count: int) -> int:
    """The GPU this rank takes: LOCAL_RANK, or 0 where the launcher shows each rank a single device
    (``--gpus-per-task=1``, ``--gpu-bind=single:1``: one GPU per rank, always cuda:0)."""
    return 0 if device_count == 1 else launch.local_rank


def check_local_device(launch: "Launch", device_count: int) -> None:
    """On GPUs each rank of a node takes device LOCAL_RANK (or its only visible device): more ranks
    than devices cannot start."""
    if device_count > 1 and launch.local_rank >= device_count:
        raise ValueError(f"LOCAL_RANK={launch.local_rank} is invalid: this node has {device_count} visible GPU(s) "
                         "and rank i uses GPU i; start at most that many ranks per node (--nproc_per_node / "
                         "--num_gpus / --ntasks-per-node) or widen CUDA_VISIBLE_DEVICES")


def resolve_launch(environ: Optional[Mapping[str, str]] = None) -> Launch:
    env = dict(os.environ if environ is None else environ)
    if ("RANK" in env) != ("WORLD_SIZE" in env):
        have, lack = ("RANK", "WORLD_SIZE") if "RANK" in env else ("WORLD_SIZE", "RANK")
        raise ValueError(f"environment variable {have} is set but {lack} is not: a launcher sets both (torchrun, "
                         f"the deepspeed launcher); export {lack} too, or unset {have} for a single process")
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = _int_env(env, "RANK"), _int_env(env, "WORLD_SIZE")
        local = _int_env(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in env]
        if missing and world > 1:
            raise ValueError(f"RANK/WORLD_SIZE are set but {missing} are not: start through the deepspeed "
                             "launcher, torchrun, srun or mpirun, or export them")
        _check_ranks(rank, world, local, ("RANK", "WORLD_SIZE", "LOCAL_RANK"), env)
        out = {"LOCAL_RANK": str(local)}
        if world == 1:
            out.setdefault("MASTER_ADDR", env.get("MASTER_ADDR", "127.0.0.1"))
            out.setdefault("MASTER_PORT", env.get("MASTER_PORT", str(free_port())))
        return Launch("env", rank, world, local, out)
    for rank_var, size_var in (("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"), ("PMIX_RANK", "PMIX_SIZE"),
                               ("PMI_RANK", "PMI_SIZE")):
        if rank_var in env:
            size = _int_env(env, size_var) if size_var in env else None
            if size is None and rank_var == "PMIX_RANK":
                size = _int_env(env, "OMPI_COMM_WORLD_SIZE") if "OMPI_COMM_WORLD_SIZE" in env else None
            if size is None:
                raise ValueError(f"{rank_var} is set but {size_var} is not: cannot tell the MPI world size")
            local = env.get("OMPI_COMM_WORLD_LOCAL_RANK", env.get("MPI_LOCALRANKID", "0"))
            _check_ranks(_int_env(env, rank_var), size, int(local), (rank_var, size_var, "local rank"), env)
            # RANK etc. are filled in by deepspeed.init_distributed's MPI discovery (mpi4py)
            return Launch("mpi", _int_env(env, rank_var), size, int(local), {})
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world = _int_env(env, "SLURM_PROCID"), _int_env(env, "SLURM_NTASKS")
        local = _int_env(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        _check_ranks(rank, world, local, ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"), env)
        addr = env.get("MASTER_ADDR")
        if not addr:
            nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
            if not nodelist:
                raise ValueError("running under srun without SLURM_NODELIST: set MASTER_ADDR")
            addr = slurm_node_addr(first_slurm_host(nodelist))
        # every task must agree on the port without talking: derive it from the job id
        port = env.get("MASTER_PORT")
        if not port:
            port = str(20000 + _int_env(env, "SLURM_JOB_ID") % 20000 if "SLURM_JOB_ID" in env else DEFAULT_PORT)
        return Launch("slurm", rank, world, local,
                      {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local),
                       "MASTER_ADDR": addr, "MASTER_PORT": port})
    return Launch("single", 0, 1, 0, {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                                      "MASTER_ADDR": env.get("MASTER_ADDR", "127.0.0.1"),
                                      "MASTER_PORT": env.get("MASTER_PORT", str(free_port()))})


def visible_gpus() -> int:
    """NVIDIA GPUs this process could use, counted without torch (``nvidia-smi -L``); 0 when
    CUDA_VISIBLE_DEVICES hides them all on purpose or there is no nvidia-smi."""
    if os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(line.startswith("GPU ") for line in out.stdout.splitlines()) if out.returncode == 0 else 0


def check_cuda_usable(gpus: int, cuda_available: bool, torch_version: str, torch_cuda: Optional[str],
                      env: Mapping[str, str]) -> None:
    """GPUs are there but torch cannot use them: refuse rather than train on the CPU unnoticed.
    ``S2MOE_DEVICE=cpu`` (or CUDA_VISIBLE_DEVICES="") asks for the CPU on purpose."""
    if not gpus or cuda_available or env.get("S2MOE_DEVICE", "").lower() == "cpu":
        return
    why = (f"torch {torch_version} is a CPU-only build" if not torch_cuda else
           f"torch {torch_version} (CUDA {torch_cuda}) cannot use them: torch.cuda.is_available() is False "
           "(driver too old for this CUDA build, or no access to /dev/nvidia*)")
    raise ValueError(f"this node has {gpus} GPU(s) (nvidia-smi -L) but {why}. Install a CUDA build of torch "
                     "(e.g. pip install torch --index-url https://download.pytorch.org/whl/cu126, then "
                     "bash launch_scripts/setup_env.sh), or set S2MOE_DEVICE=cpu to train on the CPU on purpose")


def spans_hosts(launch: "Launch", env: Mapping[str, str]) -> bool:
    """Whether the ranks run on more than one host, from what the launcher says (ranks per node
    below the world size), else from MASTER_ADDR (not this host's loopback: another host)."""
    if launch.world_size <= 1:
        return False
    for var in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE"):  # torchrun, deepspeed, Open MPI
        if env.get(var, "").isdigit():
            return int(env[var]) < launch.world_size
    nodes = env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES")
    if launch.launcher == "slurm" and nodes and nodes.isdigit():
        return int(nodes) > 1
    addr = env.get("MASTER_ADDR", "127.0.0.1")
    return not (addr == "localhost" or addr.startswith("127.") or addr == "::1")


def _addresses(name: str):
    """``name``'s addresses in the resolver's order (gloo binds the first that works)."""
    seen = []
    for info in socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP):
        if info[4][0] not in seen:
            seen.append(info[4][0])
    return seen


def check_network(launch: "Launch", backend: str, env: Mapping[str, str], hostname: Optional[str] = None) -> None:
    """Before any process group: MASTER_ADDR must resolve here, and gloo across hosts must not
    advertise a loopback address (gloo takes its address from the hostname unless
    GLOO_SOCKET_IFNAME names an interface; Debian maps the hostname to 127.0.1.1)."""
    if launch.world_size <= 1:
        return
    addr = env.get("MASTER_ADDR")
    if addr:
        try:
            _addresses(addr)
        except (socket.gaierror, UnicodeError) as e:
            raise ValueError(f"MASTER_ADDR={addr!r} does not resolve on this host ({e}): every rank connects "
                             "to it. Set S2MOE_MASTER_ADDR (slurm/pretrain.sbatch) or MASTER_ADDR to an address of "
                             "the first node that every node reaches (its IP; under Slurm: the NodeAddr in "
                             "`scontrol show node`)") from None
    if backend != "gloo" or env.get("GLOO_SOCKET_IFNAME") or not spans_hosts(launch, env):
        return
    hostname = hostname or socket.gethostname()
    try:
        mine = _addresses(hostname)
    except (socket.gaierror, UnicodeError):
        mine = []
    if not mine or mine[0].startswith("127.") or mine[0] == "::1":
        seen = mine[0] if mine else "nothing"
        raise ValueError(f"this host's name {hostname!r} resolves to {seen} first, and gloo takes the address it "
                         "gives the other hosts from the hostname: they could not connect. Set "
                         "GLOO_SOCKET_IFNAME to the interface of the network between the nodes (`ip -br addr` "
                         "lists them, e.g. GLOO_SOCKET_IFNAME=eth0), or map the hostname to that interface's "
                         "address in /etc/hosts")


def default_backend() -> str:
    import torch
    return os.environ.get("S2MOE_DIST_BACKEND") or ("nccl" if torch.cuda.is_available() else "gloo")


def set_collective_timeout(seconds: float) -> None:
    """Every process group gets ``seconds``: the world group and those created later. torch gives
    ``new_group`` its own default (30 min gloo / 10 min NCCL), not the world group's timeout, and
    DeepSpeed's expert groups and Megatron's groups are created that way; so the defaults are
    replaced, and groups that exist already are updated."""
    from datetime import timedelta

    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    td = timedelta(seconds=seconds)
    c10d.default_pg_timeout = td
    c10d.default_pg_nccl_timeout = td
    if dist.is_initialized():
        for group in list(c10d._world.pg_names):
            try:
                c10d._set_pg_timeout(td, group)
            except (ValueError, RuntimeError, AssertionError):  # a group this rank is not in
                pass


def init_distributed(launch: Launch, backend: Optional[str] = None, timeout_s: Optional[float] = None) -> None:
    """Export the launcher's variables, pick the device, start DeepSpeed's process group.
    ``timeout_s``: collective timeout of every group (``set_collective_timeout``); a collective
    waiting longer (a rank hung or gone) raises instead of hanging. Under NCCL the watchdog then
    aborts the process (TORCH_NCCL_ASYNC_ERROR_HANDLING, on by default)."""
    import deepspeed
    import torch

    os.environ.update(launch.env)
    backend = backend or default_backend()
    check_network(launch, backend, os.environ)
    if backend == "nccl":
        torch.cuda.set_device(local_device_index(launch, torch.cuda.device_count()))
    port = int(os.environ.get("MASTER_PORT", DEFAULT_PORT))
    kwargs = {}
    if timeout_s is not None:
        from datetime import timedelta
        set_collective_timeout(timeout_s)
        kwargs["timeout"] = timedelta(seconds=timeout_s)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=launch.launcher == "mpi",
                               distributed_port=port, verbose=False, **kwargs)
    unlink_deepspeed_shm_buffer()


def remove_deepspeed_shm(addr: str, port, rank="*") -> None:
    """Unlink DeepSpeed's CPU all-reduce (shm comm op) buffers of the run on ``addr:port``:
    64 MiB /dev/shm files, one per rank (``rank="*"``: all of them), that DeepSpeed 0.19.8 never
    removes. Shared by the trainer, the test harness and the benchmarks."""
    import glob

    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"):
        try:
            os.unlink(path)
        except OSError:
            pass


def unlink_deepspeed_shm_buffer() -> None:
    """DeepSpeed's CPU all-reduce leaves a /dev/shm file per rank behind every run, killed or not.
    Every rank maps every rank's file inside init_distributed, so after one barrier each rank can
    unlink its own: the memory lives until the processes exit."""
    import torch.distributed as dist

    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not (dist.is_initialized() and addr and port):
        return
    dist.barrier()  # on every rank (a node may have no such file): every rank has mapped every buffer
    remove_deepspeed_shm(addr, port, dist.get_rank())


def device_for(launch: Launch):
    import torch
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_device_index(launch, torch.cuda.device_count()))


@dataclass
class ParallelLayout:
    """Where this rank sits in the world = TP x DP (Megatron's order: TP groups are contiguous)."""
    tp_size: int
    tp_rank: int
    dp_size: int
    dp_rank: int
    mpu: Optional[object]  # deepspeed.initialize(mpu=...): None without tensor parallelism


def init_model_parallel(tp_size: int) -> ParallelLayout:
    """After the process group: Megatron's parallel state for ``tp_size``, S2MoE layers and the
    model's dense layers on its TP group. ``tp_size`` 1 touches nothing (no Megatron import).
    The world/TP/EP layout is validated before (``train.config.check_parallel_layout``)."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    if tp_size == 1:
        return ParallelLayout(1, 0, world, rank, None)
    from megatron.core import parallel_state as ps

    from ..integrations.megatron import megatron_mpu, use_megatron_parallel_state
    from ..integrations.megatron_linear import MegatronLinearFactory
    from ..model import set_linear_factory

    import torch.distributed.distributed_c10d as c10d
    # Megatron gives its groups an explicit timeout (default 30 min): use the one set for ours
    minutes = c10d.default_pg_timeout.total_seconds() / 60
    ps.initialize_model_parallel(tensor_model_parallel_size=tp_size, distributed_timeout_minutes=minutes)
    use_megatron_parallel_state()  # S2MoE layers built from now on split tokens (and experts) over TP
    set_linear_factory(MegatronLinearFactory())
    return ParallelLayout(tp_size, ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_world_size(),
                          ps.get_data_parallel_rank(), megatron_mpu())


def destroy_process_group() -> None:
    """Destroy the default process group and, when DeepSpeed is loaded, its cached groups too
    (``deepspeed.comm`` releases them): a later group in the same process (a second
    ``s2moe-eval`` call from Python) would otherwise reuse DeepSpeed's groups of the dead one."""
    import sys

    import torch.distributed as dist

    if not dist.is_initialized():
        return
    ds_comm = sys.modules.get("deepspeed.comm.comm")
    if ds_comm is not None and getattr(ds_comm, "cdb", None) is not None:
        ds_comm.destroy_process_group()
    else:
        dist.destroy_process_group()
