"""Two simulated hosts on this machine, for multi-node tests: Linux network namespaces joined by one
veth pair, each with its own hostname (UTS namespace) and its own hosts file bind-mounted over
/etc/hosts inside a private mount namespace. The real /etc/hosts and the real interfaces are never
touched; the only addresses are a private /30 on the veth inside the namespaces made here.

    hosts = TwoHosts.create(tmpdir)          # raises Unavailable(reason) when it cannot
    p = hosts[0].popen(["python", "-c", ...], env=..., stdout=...)
    hosts.link_down()                        # cut the link (both ends)
    hosts.destroy()                          # kills every process started here by PID, deletes the namespaces

A host is entered with ``nsenter --net=/run/netns/X unshare --uts --mount``, not ``ip netns exec``:
the latter remounts /sys, and slurmd then dies with "No filesystem mounted on /sys/fs/cgroup".
Every process started here is a session leader; ``destroy`` kills each process group by its PID
(also from ``atexit``, when a test dies before its finalizer).
"""
from __future__ import annotations

import atexit
import os
import random
import shlex
import shutil
import signal
import subprocess
import time
from typing import List, Optional, Sequence


class Unavailable(RuntimeError):
    """Network namespaces cannot be made here (not root, no ``ip netns``...): the reason."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and out.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} exited {out.returncode}: {out.stderr.strip()}")
    return out


# the script run inside the new UTS + mount namespaces: own hostname, own /etc/hosts, the extra
# bind mounts ($3: "src dst;src dst"), with $4=1 a fresh /run (sshd's /run/sshd), then the command
_ENTER = ('hostname "$1" && mount --bind "$2" /etc/hosts && '
          'IFS=";"; for m in $3; do IFS=" "; mount --bind $m || exit 1; done; unset IFS; '
          'if [ "$4" = 1 ]; then mount -t tmpfs -o mode=755 tmpfs /run && mkdir -m 755 /run/sshd || exit 1; fi; '
          'shift 4 && exec "$@"')


class Host:
    def __init__(self, cluster: "TwoHosts", index: int, ns: str, veth: str, addr: str, hostname: str,
                 hosts_file: str):
        self.cluster, self.index = cluster, index
        self.ns, self.veth, self.addr, self.hostname, self.hosts_file = ns, veth, addr, hostname, hosts_file

    def command(self, cmd: Sequence[str], fresh_run: bool = False) -> List[str]:
        """``cmd`` as run on this host (with the cluster's bind mounts: e.g. the ssh client config)."""
        mounts = ";".join(f"{src} {dst}" for src, dst in self.cluster.mounts)
        return ["nsenter", f"--net=/run/netns/{self.ns}", "unshare", "--uts", "--mount", "--propagation",
                "private", "sh", "-c", _ENTER, "enter", self.hostname, self.hosts_file, mounts,
                "1" if fresh_run else "0", *cmd]

    def popen(self, cmd: Sequence[str], fresh_run: bool = False, **kwargs) -> subprocess.Popen:
        """Start ``cmd`` on this host in its own session; ``destroy`` kills it by PID."""
        proc = subprocess.Popen(self.command(cmd, fresh_run), start_new_session=True, **kwargs)
        self.cluster.procs.append(proc)
        return proc

    def run(self, cmd: Sequence[str], timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
        proc = self.popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raise
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")

    def set_hosts(self, text: str) -> None:
        """Rewrite this host's /etc/hosts (seen by processes started afterwards and, through the
        bind mount of the same file, by running ones)."""
        with open(self.hosts_file, "w") as f:
            f.write(text)


def _kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)  # the process is its session's (and group's) leader
        except ProcessLookupError:
            pass
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            pass


def ensure_packages(tools=("sshd", "ssh", "pdsh"), packages=("openssh-server", "openssh-client", "pdsh"),
                    timeout: float = 600) -> Optional[str]:
    """Install Debian's packages for ``tools`` when one is missing (a fresh CI machine). Returns
    None when ready, else why not."""
    def missing():
        return [t for t in tools if shutil.which(t) is None and not os.path.exists(f"/usr/sbin/{t}")]
    if not missing():
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return f"{missing()} missing and no root apt-get to install {list(packages)}"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *packages]):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"{' '.join(cmd)} failed: {e}"
        if out.returncode != 0:
            return f"{' '.join(cmd)} failed (exit {out.returncode}): {out.stderr.strip()[-500:]}"
    return f"still missing after apt-get install: {missing()}" if missing() else None


def why_unavailable() -> Optional[str]:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        ensure_packages(("ip",), ("iproute2",))
    missing = [t for t in ("ip", "nsenter", "unshare", "mount") if shutil.which(t) is None]
    if missing:
        return f"missing tools: {missing} (Debian: iproute2, util-linux)"
    return None


class TwoHosts:
    """``hosts[0]`` and ``hosts[1]``, linked by one veth pair."""

    def __init__(self, root: str, suffix: str):
        self.root, self.suffix = root, suffix
        self.hosts: List[Host] = []
        self.procs: List[subprocess.Popen] = []
        self.namespaces: List[str] = []
        self.mounts: List[tuple] = []  # (file, where) bind-mounted on every host, for processes started after
        self.sshd: List[subprocess.Popen] = []

    @classmethod
    def create(cls, root: str, names: Sequence[str] = ("hosta", "hostb"), loopback_hostname: bool = False
               ) -> "TwoHosts":
        """Make the two hosts under ``root`` (their hosts files). ``loopback_hostname``: each hosts
        file maps its own hostname to 127.0.1.1 first, as Debian's installer writes it."""
        why = why_unavailable()
        if why:
            raise Unavailable(why)
        suffix = "%06x" % random.getrandbits(24)
        self = cls(root, suffix)
        atexit.register(self.destroy)
        net = f"10.{random.randint(16, 250)}.{random.randint(0, 255)}.{4 * random.randint(0, 63)}"
        base = net.rsplit(".", 1)
        addrs = [f"{base[0]}.{int(base[1]) + 1}", f"{base[0]}.{int(base[1]) + 2}"]  # a /30
        hostnames = [f"{n}{suffix}" for n in names]
        try:
            for i in range(2):
                ns = f"s2moe-{names[i]}-{suffix}"
                r = _ip("netns", "add", ns, check=False)
                if r.returncode != 0:
                    raise Unavailable(f"ip netns add failed: {r.stderr.strip()}")
                self.namespaces.append(ns)
            veths = [f"s2a{suffix}", f"s2b{suffix}"]  # <= 15 characters (IFNAMSIZ)
            # created inside the first namespace: the veth never appears among the real interfaces
            _ip("-n", self.namespaces[0], "link", "add", veths[0], "type", "veth", "peer", "name", veths[1],
                "netns", self.namespaces[1])
            os.makedirs(root, exist_ok=True)
            for i in range(2):
                ns = self.namespaces[i]
                _ip("-n", ns, "link", "set", "lo", "up")
                _ip("-n", ns, "addr", "add", f"{addrs[i]}/30", "dev", veths[i])
                _ip("-n", ns, "link", "set", veths[i], "up")
                hosts_file = os.path.join(root, f"hosts.{hostnames[i]}")
                host = Host(self, i, ns, veths[i], addrs[i], hostnames[i], hosts_file)
                self.hosts.append(host)
            for h in self.hosts:
                lines = ["127.0.0.1 localhost"]
                if loopback_hostname:
                    lines.append(f"127.0.1.1 {h.hostname}")
                lines += [f"{o.addr} {o.hostname}" for o in self.hosts]
                h.set_hosts("\n".join(lines) + "\n")
        except Exception:
            self.destroy()
            raise
        return self

    def start_sshd(self, timeout: float = 30) -> str:
        """An sshd on each host (port 22 of its address), root key login, every file under
        ``root/ssh``; the ssh client config (key, no host-key prompts) is bind-mounted over
        /etc/ssh/ssh_config inside the hosts only. Returns why not (None when up)."""
        why = ensure_packages()
        if why:
            return why
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        d = os.path.join(self.root, "ssh")
        os.makedirs(d, exist_ok=True)
        for key in ("host_key", "id_ed25519"):
            if not os.path.exists(os.path.join(d, key)):
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", os.path.join(d, key)],
                               check=True, capture_output=True, timeout=30)
        shutil.copy(os.path.join(d, "id_ed25519.pub"), os.path.join(d, "authorized_keys"))
        client = os.path.join(d, "ssh_config")
        with open(client, "w") as f:
            f.write(f"Host *\n  IdentityFile {d}/id_ed25519\n  StrictHostKeyChecking no\n"
                    "  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n  BatchMode yes\n")
        self.mounts.append((client, "/etc/ssh/ssh_config"))
        for h in self.hosts:
            conf = os.path.join(d, f"sshd_config.{h.hostname}")
            with open(conf, "w") as f:
                f.write(f"ListenAddress {h.addr}\nPort 22\nHostKey {d}/host_key\n"
                        f"AuthorizedKeysFile {d}/authorized_keys\nPermitRootLogin prohibit-password\n"
                        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
                        f"StrictModes no\nPidFile {d}/sshd.{h.hostname}.pid\n")
            log = open(os.path.join(d, f"sshd.{h.hostname}.log"), "ab")
            self.sshd.append(h.popen([sshd, "-D", "-e", "-f", conf], fresh_run=True, stdout=log,
                                     stderr=subprocess.STDOUT))
            log.close()
        end = time.monotonic() + timeout
        for h in self.hosts:
            while True:
                r = self.hosts[0].run(["ssh", h.hostname, "hostname"], timeout=30)
                if r.returncode == 0 and r.stdout.strip() == h.hostname:
                    break
                if time.monotonic() > end or any(p.poll() is not None for p in self.sshd):
                    return f"ssh {h.hostname} hostname failed: {r.stdout.strip()}"
                time.sleep(0.5)
        return None

    def __getitem__(self, i: int) -> Host:
        return self.hosts[i]

    def link(self, up: bool) -> None:
        for h in self.hosts:
            _ip("-n", h.ns, "link", "set", h.veth, "up" if up else "down")

    def link_down(self) -> None:
        self.link(False)

    def link_up(self) -> None:
        self.link(True)

    def kill_all(self) -> None:
        """Kill what was started on the hosts, daemons (sshd) excepted."""
        for p in self.procs:
            if p not in self.sshd:
                _kill_group(p)
        self.procs = [p for p in self.procs if p.poll() is None]

    def destroy(self) -> None:
        """Kill every process started on the hosts (by PID), delete the namespaces (and so the veth)."""
        self.kill_all()
        for p in self.sshd:
            _kill_group(p)
        self.sshd = []
        for ns in self.namespaces:
            for _ in range(20):  # a namespace still held by a dying process is removed once it is gone
                if _ip("netns", "del", ns, check=False).returncode == 0:
                    break
                time.sleep(0.25)
        self.namespaces = []


if __name__ == "__main__":  # a quick look: make the hosts, ping across, show each host's view
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        hs = TwoHosts.create(d)
        try:
            for h in hs.hosts:
                other = hs[1 - h.index]
                print(h.run(["sh", "-c", f"hostname; getent hosts {other.hostname}; ping -c1 -W2 {other.addr}"
                             f" | tail -2; ip -br addr"]).stdout)
            print(shlex.join(hs[0].command(["bash"])))
        finally:
            hs.destroy()
