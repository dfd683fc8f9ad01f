"""A throw-away single-node Slurm on this machine (munged + slurmctld + slurmd), for tests.

Everything lives under one temp folder (config, munge key/socket, state, spool, logs); clients
find it through ``SLURM_CONF``. The daemons run in the foreground under a small supervisor
process (this file run as a script) that is a child subreaper: slurmd double-forks a slurmstepd
per job, and PID 1 here reaps nothing, so the supervisor adopts and reaps those, and at the end
cancels the jobs and stops the daemons by PID.

    python tests/slurm_cluster.py DIR   # start one by hand: prints SLURM_CONF=... to export;
                                        # Ctrl-C or SIGTERM stops it
    LocalSlurm.launch(DIR)              # the same from a test; .stop() at teardown
"""
from __future__ import annotations

import ctypes
import glob
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Dict, List, Optional

# a node name that resolves nowhere, as on clusters whose NodeName is not a host name: jobs must take
# the node's NodeAddr (127.0.0.1) as MASTER_ADDR. NodeHostname is this host (slurmd -N picks the node).
NODE = "s2moenode%04x" % (os.getpid() % 0x10000)
TOOLS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "squeue", "srun")
READY = "SLURM_CONF="
# SIGTERM -> SIGKILL grace of a cancelled job: the ranks checkpoint in it, which on a loaded machine
# took longer than Slurm's 30 s default (a real cluster needs KillWait above its checkpoint time too)
KILL_WAIT = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def missing_tools() -> List[str]:
    return [t for t in TOOLS if shutil.which(t) is None and not os.path.exists(f"/usr/sbin/{t}")]


def ensure_installed(timeout: float = 600) -> Optional[str]:
    """Install Debian's slurm-wlm + munge when missing. Returns None when ready, else why not."""
    from netns_hosts import ensure_packages  # the one apt-get helper of the test clusters
    return ensure_packages(TOOLS, ("slurm-wlm", "munge"), timeout=timeout)


def _sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class SlurmClient:
    """Commands against the cluster whose files are under ``root``. ``prefix``: what runs a command
    where slurmctld is reachable (the first simulated host of a multi-node cluster), else nothing."""

    def __init__(self, root: str, prefix: Optional[List[str]] = None):
        self.root = os.path.abspath(root)
        self.conf = os.path.join(self.root, "slurm.conf")
        self.env = dict(os.environ, SLURM_CONF=self.conf)
        self.prefix = list(prefix or [])

    def run(self, cmd: List[str], check: bool = True, timeout: float = 30,
            env: Optional[Dict[str, str]] = None, cwd: Optional[str] = None) -> subprocess.CompletedProcess:
        out = subprocess.run(self.prefix + cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                             env={**self.env, **(env or {})})
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {out.returncode}: {out.stderr.strip()}")
        return out

    def job(self, job_id: str) -> Dict[str, str]:
        """``scontrol show job -o`` as a dict ({} once the job has left slurmctld's memory)."""
        out = self.run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
        if out.returncode != 0:
            return {}
        fields = {}
        for item in out.stdout.split():
            if "=" in item:
                k, v = item.split("=", 1)
                fields.setdefault(k, v)
        return fields

    def logs(self, tail: int = 3000) -> str:
        parts = []
        for path in sorted(glob.glob(os.path.join(self.root, "log", "*.log"))):
            name = os.path.basename(path)
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    parts.append(f"--- {name} (tail) ---\n" + f.read()[-tail:])
        return "\n".join(parts)


class SlurmCluster(SlurmClient):
    """The daemons, as children of this process (the supervisor)."""

    def __init__(self, root: str, cpus: int = 2, nodes: Optional[List[dict]] = None):
        """``nodes``: several nodes, one per simulated host, each a dict of ``name`` (NodeName),
        ``addr`` (NodeAddr), ``hostname`` (NodeHostname) and ``prefix`` (the command that runs a
        program on that host); slurmctld and the clients run on the first. None: this host."""
        self.nodes = nodes or [{"name": NODE, "addr": "127.0.0.1", "hostname": socket.gethostname().split(".")[0],
                                "prefix": []}]
        super().__init__(root, self.nodes[0]["prefix"])
        self.cpus = cpus
        self.procs: Dict[str, subprocess.Popen] = {}

    # ---- files --------------------------------------------------------------------------------
    def _write_files(self) -> None:
        r = self.root
        for d in ("state", "spool", "log", "munge"):
            os.makedirs(os.path.join(r, d), exist_ok=True)
        # munged refuses a group/world-writable socket folder, and clients must be able to enter it
        os.chmod(os.path.join(r, "munge"), 0o755)
        os.chmod(r, 0o755)
        key = os.path.join(r, "munge", "munge.key")
        with open(key, "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(key, 0o400)
        head = self.nodes[0]
        many = len(self.nodes) > 1
        spool, pid, log = ((f"{r}/spool/%n", f"{r}/slurmd.%n.pid", f"{r}/log/slurmd.%n.log") if many else
                           (f"{r}/spool", f"{r}/slurmd.pid", f"{r}/log/slurmd.log"))
        for n in self.nodes:
            os.makedirs(os.path.join(r, "spool", n["name"]), exist_ok=True)
        node_lines = "\n".join(f"NodeName={n['name']} NodeAddr={n['addr']} NodeHostname={n['hostname']} "
                               f"CPUs={self.cpus} State=UNKNOWN" for n in self.nodes)
        names = ",".join(n["name"] for n in self.nodes)
        self.socket = os.path.join(r, "munge", "munge.socket")
        conf = f"""\
ClusterName=s2moetest
SlurmctldHost={head["hostname"]}({head["addr"]})
SlurmUser=root
SlurmdUser=root
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.socket}
StateSaveLocation={r}/state
SlurmdSpoolDir={spool}
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={pid}
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={log}
SlurmdTimeout=30
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
MpiDefault=none
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
KillWait={KILL_WAIT}
{node_lines}
PartitionName=debug Nodes={names} Default=YES MaxTime=INFINITE State=UP
"""
        with open(self.conf, "w") as f:
            f.write(conf)

    # ---- daemons ------------------------------------------------------------------------------
    def _spawn(self, name: str, cmd: List[str], prefix: Optional[List[str]] = None) -> None:
        log = open(os.path.join(self.root, "log", f"{name}.stdout"), "ab")
        self.procs[name] = subprocess.Popen(list(prefix or []) + cmd, stdout=log, stderr=subprocess.STDOUT,
                                            env=self.env, start_new_session=True)
        log.close()

    def _wait(self, what: str, ok, timeout: float) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with {p.returncode} while waiting for {what}\n"
                                       + self.logs())
            if ok():
                return
            time.sleep(0.3)
        raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}\n" + self.logs())

    def start(self, timeout: float = 60) -> "SlurmCluster":
        self._write_files()
        r = self.root
        self._spawn("munged", [_sbin("munged"), "-F", "--force", f"--socket={self.socket}",
                               f"--key-file={r}/munge/munge.key", f"--pid-file={r}/munge/munged.pid",
                               f"--log-file={r}/log/munged.log", f"--seed-file={r}/munge/munged.seed"])
        self._wait("munged's socket", lambda: os.path.exists(self.socket), timeout)
        self._spawn("slurmctld", [_sbin("slurmctld"), "-D", "-i", "-f", self.conf], self.prefix)
        self._wait("slurmctld", lambda: self.run(["scontrol", "ping"], check=False).returncode == 0
                   and "UP" in self.run(["scontrol", "ping"], check=False).stdout, timeout)
        for n in self.nodes:
            self._spawn(f"slurmd.{n['name']}", [_sbin("slurmd"), "-D", "-N", n["name"], "-f", self.conf], n["prefix"])
        self._wait("every node idle", self._node_ready, timeout)
        return self

    def respawn_slurmds(self) -> List[str]:
        """Start again every slurmd that has exited (a test killed it); returns their names."""
        again = []
        for n in self.nodes:
            name = f"slurmd.{n['name']}"
            if self.procs[name].poll() is not None:
                self._spawn(name, [_sbin("slurmd"), "-D", "-N", n["name"], "-f", self.conf], n["prefix"])
                again.append(name)
        return again

    def write_pids(self) -> None:
        """``daemons.json``: {daemon name: PID}, for tests that kill one (a node failure)."""
        path = os.path.join(self.root, "daemons.json")
        with open(path + ".tmp", "w") as f:
            json.dump({k: p.pid for k, p in self.procs.items() if p.poll() is None}, f)
        os.replace(path + ".tmp", path)

    def _node_ready(self) -> bool:
        out = self.run(["scontrol", "show", "node", "-o"], check=False).stdout
        return out.count("State=IDLE") == len(self.nodes)

    def cancel_all(self, timeout: float = 30) -> None:
        """SIGKILL every job of this cluster and wait until slurmd has cleaned them up, so no
        slurmstepd or task outlives the daemons."""
        if self.procs.get("slurmctld") is None or self.procs["slurmctld"].poll() is not None:
            return
        ids = self.run(["squeue", "-h", "-o", "%i"], check=False).stdout.split()
        for job_id in ids:
            self.run(["scancel", "--signal=KILL", "--full", job_id], check=False)
            self.run(["scancel", job_id], check=False)
        end = time.monotonic() + timeout
        while ids and time.monotonic() < end:
            states = self.run(["squeue", "-h", "-o", "%T"], check=False).stdout.split()
            if not [s for s in states if s not in ("PENDING",)]:
                break
            time.sleep(0.5)

    def stop(self) -> None:
        """Cancel the jobs, SIGTERM each daemon (slurmd first), SIGKILL what is left after 10 s; reap all."""
        self.cancel_all()
        order = [k for k in self.procs if k.startswith("slurmd")] + ["slurmctld", "munged"]
        for name in order:
            p = self.procs.get(name)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        self.procs.clear()

def _children() -> Dict[int, str]:
    """{pid: state letter} of this process's children, from /proc."""
    me, out = os.getpid(), {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        if int(fields[1]) == me:
            out[int(entry)] = fields[0]
    return out


def _reap_orphans(keep) -> None:
    """Reap zombie children that are not our own Popen daemons (adopted slurmstepd and tasks)."""
    for pid, state in _children().items():
        if state == "Z" and pid not in keep:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass


def supervise(root: str, cpus: int, nodes: Optional[List[dict]] = None) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphaned slurmstepds become our children
    stop, respawn = [], []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.append(1))
    signal.signal(signal.SIGHUP, lambda *_: respawn.append(1))  # start the slurmds that died again
    cluster = SlurmCluster(root, cpus, nodes)
    try:
        cluster.start()
    except Exception as e:  # noqa: BLE001 - reported to the parent, then the daemons are stopped
        print("ERROR: " + str(e).replace("\n", "\n  "), flush=True)
        cluster.stop()
        return 1
    cluster.write_pids()
    print(READY + cluster.conf, flush=True)
    try:
        while not stop:
            if respawn:
                respawn.clear()
                cluster.respawn_slurmds()
                cluster.write_pids()
            _reap_orphans({p.pid for p in cluster.procs.values()})
            time.sleep(0.5)
    finally:
        cluster.stop()
        end = time.monotonic() + 15
        while _children() and time.monotonic() < end:  # the last slurmstepds end after slurmd
            _reap_orphans(set())
            time.sleep(0.2)
    return 0


class LocalSlurm(SlurmClient):
    """A supervised cluster started from a test: ``LocalSlurm.launch(root)``, ``.stop()``."""

    def __init__(self, root: str, proc: subprocess.Popen, prefix: Optional[List[str]] = None):
        super().__init__(root, prefix)
        self.proc = proc

    @classmethod
    def launch(cls, root: str, cpus: int = 2, timeout: float = 90, nodes: Optional[List[dict]] = None
               ) -> "LocalSlurm":
        """Raises RuntimeError (with the daemons' logs) when the cluster does not come up.
        ``nodes``: see SlurmCluster (one node per simulated host)."""
        os.makedirs(root, exist_ok=True)
        extra = []
        if nodes:
            path = os.path.join(root, "nodes.json")
            with open(path, "w") as f:
                json.dump(nodes, f)
            extra = ["--nodes", path]
        prefix = nodes[0]["prefix"] if nodes else None
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--cpus", str(cpus), *extra, root],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        seen, end = [], time.monotonic() + timeout
        while time.monotonic() < end:
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            line = proc.stdout.readline() if ready else ""
            if line.startswith(READY):
                return cls(root, proc, prefix)
            if line:
                seen.append(line)
            elif ready or proc.poll() is not None:  # EOF: the supervisor is gone
                break
        cluster = cls(root, proc, prefix)
        cluster.stop()
        raise RuntimeError("local Slurm did not start: " + "".join(seen).strip() + "\n" + cluster.logs())

    def daemon_pids(self) -> Dict[str, int]:
        with open(os.path.join(self.root, "daemons.json")) as f:
            return json.load(f)

    def kill_slurmd(self, node: str) -> int:
        """SIGKILL node ``node``'s slurmd (its job steps live on, as when a node's daemon dies); its PID."""
        pid = self.daemon_pids()[f"slurmd.{node}"]
        os.kill(pid, signal.SIGKILL)
        return pid

    def restart_slurmds(self, timeout: float = 30) -> None:
        """Start again (under the supervisor) every slurmd that died."""
        before = self.daemon_pids()
        self.proc.send_signal(signal.SIGHUP)
        end = time.monotonic() + timeout
        while self.daemon_pids() == before:
            if time.monotonic() > end:
                raise RuntimeError("the supervisor did not restart the slurmds\n" + self.logs())
            time.sleep(0.2)

    def stop(self, timeout: float = 90) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc.stdout:
            self.proc.stdout.close()


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="Run a single-node Slurm under DIR until SIGTERM / Ctrl-C.")
    ap.add_argument("root", metavar="DIR")
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--nodes", help="JSON list of nodes (SlurmCluster): one per simulated host")
    a = ap.parse_args()
    why = ensure_installed()
    if why:
        print("ERROR: " + why, flush=True)
        sys.exit(1)
    nodes = None
    if a.nodes:
        with open(a.nodes) as f:
            nodes = json.load(f)
    sys.exit(supervise(a.root, a.cpus, nodes))
