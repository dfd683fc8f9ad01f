"""A throw-away single-node Slurm on this machine (munged + slurmctld + slurmd), for tests.

Everything lives under one temp folder (config, munge key/socket, state, spool, logs); clients
find it through ``SLURM_CONF`` (``cluster.env``). Daemons run in the foreground as our children
and are stopped by PID (PID 1 here reaps nothing, so nothing may be left to daemonise).

    python tests/slurm_cluster.py DIR   # start one by hand: prints the SLURM_CONF to export;
                                        # Ctrl-C or SIGTERM stops it
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Dict, List, Optional

# the node is named after this host so its name resolves (jobs use it as MASTER_ADDR)
NODE = socket.gethostname().split(".")[0]
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "srun")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def missing_tools() -> List[str]:
    return [t for t in DAEMONS if shutil.which(t) is None and not os.path.exists(f"/usr/sbin/{t}")]


def ensure_installed(timeout: float = 600) -> Optional[str]:
    """Install Debian's slurm-wlm + munge when missing. Returns None when ready, else why not."""
    if not missing_tools():
        return None
    if os.geteuid() != 0:
        return f"Slurm is not installed ({missing_tools()} missing) and installing it needs root"
    if shutil.which("apt-get") is None:
        return f"Slurm is not installed ({missing_tools()} missing) and there is no apt-get"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge"]):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"{' '.join(cmd)} failed: {e}"
        if out.returncode != 0:
            return f"{' '.join(cmd)} failed (exit {out.returncode}): {out.stderr.strip()[-500:]}"
    return None if not missing_tools() else f"still missing after apt-get install: {missing_tools()}"


def _sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class SlurmCluster:
    def __init__(self, root: str, cpus: int = 2):
        self.root = os.path.abspath(root)
        self.cpus = cpus
        self.procs: Dict[str, subprocess.Popen] = {}
        self.conf = os.path.join(self.root, "slurm.conf")
        self.env = dict(os.environ, SLURM_CONF=self.conf)

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
        host = socket.gethostname().split(".")[0]
        self.socket = os.path.join(r, "munge", "munge.socket")
        conf = f"""\
ClusterName=s2moetest
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.socket}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
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
KillWait=30
NodeName={NODE} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN
PartitionName=debug Nodes={NODE} Default=YES MaxTime=INFINITE State=UP
"""
        with open(self.conf, "w") as f:
            f.write(conf)

    # ---- daemons ------------------------------------------------------------------------------
    def _spawn(self, name: str, cmd: List[str]) -> None:
        log = open(os.path.join(self.root, "log", f"{name}.stdout"), "ab")
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True)
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
        self._spawn("slurmctld", [_sbin("slurmctld"), "-D", "-i", "-f", self.conf])
        self._wait("slurmctld", lambda: self.run(["scontrol", "ping"], check=False).returncode == 0
                   and "UP" in self.run(["scontrol", "ping"], check=False).stdout, timeout)
        self._spawn("slurmd", [_sbin("slurmd"), "-D", "-N", NODE, "-f", self.conf])
        self._wait(f"node {NODE} idle", self._node_ready, timeout)
        return self

    def _node_ready(self) -> bool:
        out = self.run(["scontrol", "show", "node", NODE, "-o"], check=False).stdout
        return "State=IDLE" in out

    def stop(self) -> None:
        """SIGTERM each daemon (slurmd first), SIGKILL what is left after 10 s; reap all."""
        for name in ("slurmd", "slurmctld", "munged"):
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

    # ---- clients ------------------------------------------------------------------------------
    def run(self, cmd: List[str], check: bool = True, timeout: float = 30,
            env: Optional[Dict[str, str]] = None, cwd: Optional[str] = None) -> subprocess.CompletedProcess:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd,
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
        for name in ("slurmctld.log", "slurmd.log", "munged.log"):
            path = os.path.join(self.root, "log", name)
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    parts.append(f"--- {name} (tail) ---\n" + f.read()[-tail:])
        return "\n".join(parts)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/slurm_cluster.py DIR")
    why = ensure_installed()
    if why:
        sys.exit(why)
    c = SlurmCluster(sys.argv[1]).start()
    print(f"export SLURM_CONF={c.conf}   # Ctrl-C or SIGTERM (pid {os.getpid()}) stops the daemons", flush=True)
    for sig in (signal.SIGINT, signal.SIGTERM):  # a backgrounded shell job ignores SIGINT: catch both
        signal.signal(sig, lambda *_: None)
    try:
        signal.pause()
    finally:
        c.stop()
