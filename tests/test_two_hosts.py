"""s2moe-train across two simulated hosts (tests/netns_hosts.py: network namespaces joined by one
veth link, own hostnames and hosts files), tiny model, EP=2: the expert all-to-all crosses the link.

- launch_scripts/torchrun.sh on both hosts, one rank each: the losses of every step equal a one-host
  2-rank run; one host's rank SIGKILLed in step 15: both sides end (time measured); ``--resume
  auto`` on both continues from step 10 with the same losses to the end.
- the link cut (``ip link set down``) with train.collective_timeout_s=30: both sides end within
  the timeout + a few seconds (time measured).
- launch_scripts/deepspeed.sh with a hostfile (pdsh over ssh, an sshd per host): the ranks get the
  forwarded environment (DS_ENV_FILE), equal losses, a SIGKILLed rank ends the runner, resume.
- SIGTERM to launch_scripts/deepspeed.sh (hostfile, pdsh): the ranks checkpoint and exit 0, then
  the script (before: DeepSpeed's runner exited 1 within seconds, not waiting for them).
- launch_scripts/mpirun.sh with a hostfile (Open MPI over ssh): equal losses.
- slurm/pretrain.sbatch on a two-node Slurm (one slurmd per host, node names that resolve nowhere):
  trains across both with node 0's NodeAddr as MASTER_ADDR, equal losses; and one job with
  2 tasks per node, EP=4, through USR1 (checkpoint), batch USR1 (checkpoint, requeue), resume, a
  node failure (link down + slurmd SIGKILLed: Slurm requeues it), the node back, resume: every loss
  equals a one-host 4-rank run (times of the node failure measured).
- start-up checks, before any process group: a hostname resolving to 127.0.1.1 (Debian's default)
  with gloo across hosts exits 2 naming GLOO_SOCKET_IFNAME (before the fix: "Connection refused"
  on the peer and a hang until the timeout); GLOO_SOCKET_IFNAME set makes the same run train.
Figures go to stdout as ``[figures] ...`` (pytest -s).
"""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from netns_hosts import TwoHosts, Unavailable, _kill_group  # noqa: E402

TORCHRUN_SH = os.path.join(ROOT, "launch_scripts", "torchrun.sh")
TINY = os.path.join(ROOT, "configs", "model", "tiny.yaml")
ZERO1 = os.path.join(ROOT, "configs", "deepspeed", "zero1_fp32.json")
STEPS = 20
SETTINGS = ["model.seq_len=32", "model.d_model=32", "model.n_heads=2", "model.moe.ffn_hidden_size=64",
            "model.moe.ep_size=2", "train.batch_size=8", "train.warmup_steps=4", "train.eval_windows=8",
            "train.progress=false", "train.log_every=1", "train.eval_every=0", "train.ckpt_every=10",
            f"train.steps={STEPS}"]
TIMEOUT = 300

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    try:
        h = TwoHosts.create(str(tmp_path_factory.mktemp("hosts")))
    except Unavailable as e:
        pytest.skip(f"no simulated hosts here: {e}")
    yield h
    h.destroy()


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMI_", "PMIX_", "GLOO_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                         "S2MOE_FAULTS")}
    env.update(OMP_NUM_THREADS="1", S2MOE_VENV=sys.prefix)
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, ".torch_extensions"))
    env.update(extra)
    return env


class Node:
    """``launch_scripts/torchrun.sh`` on one host, its output in a log file."""

    def __init__(self, host, log, out, nnodes, node_rank, master, port, nproc=1, extra=(), resume=False, **env):
        self.log_path = log
        self.log = open(log, "w")
        args = ["bash", TORCHRUN_SH, "--config", TINY, "--deepspeed", ZERO1, "--output", str(out),
                "--set", *SETTINGS, *extra] + (["--resume", "auto"] if resume else [])
        e = _env(NNODES=str(nnodes), NODE_RANK=str(node_rank), NPROC_PER_NODE=str(nproc), MASTER_ADDR=master,
                 MASTER_PORT=str(port), **env)
        self.proc = host.popen(args, env=e, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        self.ended = None

    def done(self) -> bool:
        if self.proc.poll() is not None and self.ended is None:
            self.ended = time.time()
        return self.ended is not None

    def text(self) -> str:
        self.log.flush()
        with open(self.log_path, errors="replace") as f:
            return f.read()


def wait_all(nodes, timeout=TIMEOUT, what="the runs"):
    end = time.monotonic() + timeout
    while not all([n.done() for n in nodes]):
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}:\n" + "\n----\n".join(n.text()[-3000:] for n in nodes))
        time.sleep(0.1)
    return [n.proc.returncode for n in nodes]


def losses(out, first=False):
    """step -> (total, task, balance, uncertainty), the last value logged (``first``: the first)."""
    path = os.path.join(str(out), "metrics.jsonl")
    got = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                if "train/loss_total" in r and not (first and r["step"] in got):
                    got[r["step"]] = (r["train/loss_total"], r["train/loss_task"], r["train/loss_balance"],
                                      r["train/loss_uncertainty"])
    return got


def last_step(out) -> int:
    got = losses(out)
    return max(got) if got else 0


def fault_time(text):
    i = text.index("FAULT INJECTED (t=")
    return float(text[i + len("FAULT INJECTED (t="):].split(")")[0])


def port() -> int:
    return random.randint(20000, 40000)  # inside fresh namespaces: nothing else listens there


def two_nodes(hosts, tmp, name, out, faults=None, **kw):
    p = port()
    env = {"S2MOE_FAULTS": faults} if faults else {}
    return [Node(hosts[i], str(tmp / f"{name}.{i}.log"), out, 2, i, hosts[0].addr, p, **env, **kw) for i in range(2)]


@pytest.fixture(scope="module")
def one_host(hosts, tmp_path_factory):
    """The reference: a one-host 2-rank torchrun run, started in the background (waited for by
    ``reference_losses``)."""
    d = tmp_path_factory.mktemp("one_host")
    node = Node(hosts[0], str(d / "ref.log"), d / "run", 1, 0, "127.0.0.1", port(), nproc=2)
    hosts.procs.remove(node.proc)  # the tests' kill_all must not end it: stopped here, by PID
    yield node, d / "run"
    _kill_group(node.proc)


def reference_losses(one_host):
    node, out = one_host
    assert wait_all([node]) == [0], node.text()[-3000:]
    got = losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    return got


def test_torchrun_two_hosts_equal_one_host_survive_a_sigkill_and_resume(hosts, one_host, tmp_path):
    out = tmp_path / "two_hosts"
    nodes = two_nodes(hosts, tmp_path, "killed", out, faults="kill_in_step@15:1")
    try:
        codes = wait_all(nodes)
        ref_losses = reference_losses(one_host)
    finally:
        hosts.kill_all()
    assert codes[0] != 0 and codes[1] != 0, [n.text()[-2000:] for n in nodes]
    killed = nodes[1].text()
    assert "SIGKILLs itself in step 15" in killed
    t_fault = fault_time(killed)
    after = [n.ended - t_fault for n in nodes]
    print(f"[figures] torchrun, 2 hosts: rank 1 SIGKILLed: host 1 ended {after[1]:.1f} s, host 0 "
          f"{after[0]:.1f} s later")
    assert max(after) < 60, after
    before = losses(out, first=True)
    assert sorted(before) == list(range(1, 15)), sorted(before)
    assert all(before[s] == ref_losses[s] for s in before), [(s, before[s], ref_losses[s]) for s in before]

    resumed = two_nodes(hosts, tmp_path, "resumed", out, resume=True)
    try:
        codes = wait_all(resumed)
    finally:
        hosts.kill_all()
    assert codes == [0, 0], [n.text()[-3000:] for n in resumed]
    assert f"resumed from {out}/checkpoints/global_step10 at step 10" in resumed[0].text()
    got = losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert all(got[s] == ref_losses[s] for s in got), \
        [(s, got[s], ref_losses[s]) for s in got if got[s] != ref_losses[s]]

    # a SIGTERM during start-up says where a restart continues (not just "step 0")
    early = Node(hosts[0], str(tmp_path / "early.log"), out, 1, 0, "127.0.0.1", port(), nproc=2, resume=True,
                 S2MOE_FAULTS="sigterm_at_start:0")
    try:
        assert wait_all([early]) == [0], early.text()[-3000:]
    finally:
        hosts.kill_all()
    assert (f"SIGTERM during start-up: nothing to save (step 0), exiting; a restart with --resume auto resumes "
            f"from {out}/checkpoints/global_step{STEPS}") in early.text(), early.text()[-3000:]


def test_cut_link_ends_both_hosts_within_the_collective_timeout(hosts, tmp_path):
    out = tmp_path / "cut"
    nodes = two_nodes(hosts, tmp_path, "cut", out, extra=["train.steps=100000", "train.ckpt_every=0",
                                                          "train.collective_timeout_s=30"])
    try:
        end = time.monotonic() + TIMEOUT
        while last_step(out) < 3:
            assert time.monotonic() < end and not any(n.done() for n in nodes), [n.text()[-3000:] for n in nodes]
            time.sleep(0.2)
        hosts.link_down()
        t_cut = time.time()
        codes = wait_all(nodes, timeout=120, what="both hosts to end after the link went down")
    finally:
        hosts.kill_all()
        hosts.link_up()
    after = [n.ended - t_cut for n in nodes]
    print(f"[figures] torchrun, 2 hosts: link cut at step {last_step(out)}: host 0 ended {after[0]:.1f} s, "
          f"host 1 {after[1]:.1f} s later (collective timeout 30 s)")
    assert codes[0] != 0 and codes[1] != 0
    assert 25 <= min(after) and max(after) < 30 + 20, after
    assert any("a collective failed" in n.text() for n in nodes), [n.text()[-3000:] for n in nodes]


def test_loopback_hostname_with_gloo_across_hosts_exits_2_naming_gloo_socket_ifname(hosts, tmp_path):
    """Debian's ``127.0.1.1 <hostname>``: gloo would advertise 127.0.1.1 to the other host."""
    saved = [open(h.hosts_file).read() for h in hosts.hosts]
    try:
        for h in hosts.hosts:
            h.set_hosts(f"127.0.0.1 localhost\n127.0.1.1 {h.hostname}\n" + saved[h.index])
        nodes = two_nodes(hosts, tmp_path, "loopback", tmp_path / "loopback")
        try:
            codes = wait_all(nodes, timeout=120, what="the start-up check")
        finally:
            hosts.kill_all()
        for n in nodes:
            assert "GLOO_SOCKET_IFNAME" in n.text() and "resolves to 127.0.1.1 first" in n.text(), n.text()[-3000:]
        assert codes[0] != 0 and codes[1] != 0
        assert all("exitcode  : 2" in n.text() for n in nodes), [n.text()[-2000:] for n in nodes]
        # the fix it names: the interface of the link; the run then trains
        fixed = [Node(hosts[i], str(tmp_path / f"ifname.{i}.log"), tmp_path / "ifname", 2, i, hosts[0].addr, p,
                      extra=["train.steps=2", "train.ckpt_every=0"], GLOO_SOCKET_IFNAME=hosts[i].veth)
                 for p in [port()] for i in range(2)]
        try:
            codes = wait_all(fixed, what="the run with GLOO_SOCKET_IFNAME")
        finally:
            hosts.kill_all()
        assert codes == [0, 0], [n.text()[-3000:] for n in fixed]
        assert sorted(losses(tmp_path / "ifname")) == [1, 2]
    finally:
        for h in hosts.hosts:
            h.set_hosts(saved[h.index])


@pytest.fixture(scope="module")
def ssh_hosts(hosts):
    why = hosts.start_sshd()
    if why:
        pytest.skip(f"no sshd on the simulated hosts: {why}")
    return hosts


def test_deepspeed_hostfile_over_pdsh_forwards_the_environment_and_ends_on_a_dead_rank(ssh_hosts, one_host,
                                                                                      tmp_path):
    """launch_scripts/deepspeed.sh with a hostfile: pdsh starts one rank per host over ssh, with a
    bare environment but for what DS_ENV_FILE carries (venv PATH, OMP_NUM_THREADS,
    TORCH_EXTENSIONS_DIR, S2MOE_*...). Losses equal the one-host torchrun run; rank 1 SIGKILLed
    in step 15 ends the runner; --resume auto continues exactly."""
    hosts = ssh_hosts
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"{h.hostname} slots=1\n" for h in hosts.hosts))
    out = tmp_path / "ds"
    runs = {}
    for name, faults, resume in (("killed", "kill_in_step@15:1", False), ("resumed", None, True)):
        env = _env(HOSTFILE=str(hostfile), NUM_NODES="2", NUM_GPUS="1", MASTER_ADDR=hosts[0].addr,
                   MASTER_PORT=str(port()), DS_LAUNCHER_ARGS="--launcher pdsh",
                   **({"S2MOE_FAULTS": faults} if faults else {}))
        log = open(tmp_path / f"ds_{name}.log", "w+")
        args = ["bash", os.path.join(ROOT, "launch_scripts", "deepspeed.sh"), "--config", TINY, "--deepspeed", ZERO1,
                "--output", str(out), "--set", *SETTINGS] + (["--resume", "auto"] if resume else [])
        proc = hosts[0].popen(args, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            code = proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            code = None  # fails below, with the log
        finally:
            ended = time.time()
            hosts.kill_all()
        log.seek(0)
        runs[name] = (code, log.read(), ended)
    ref = reference_losses(one_host)
    code, text, ended = runs["killed"]
    assert code not in (0, None) and "SIGKILLs itself in step 15" in text, text[-4000:]
    print(f"[figures] deepspeed (pdsh), 2 hosts: rank 1 SIGKILLed: the runner ended "
          f"{ended - fault_time(text):.1f} s later")
    assert "Emitting ninja build file" not in text and "Building extension module" not in text  # cached op used
    code, text, _ = runs["resumed"]
    assert code == 0, text[-4000:]
    assert f"resumed from {out}/checkpoints/global_step10 at step 10" in text
    got = losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert all(got[s] == ref[s] for s in got), [(s, got[s], ref[s]) for s in got if got[s] != ref[s]]
    first = losses(out, first=True)
    assert all(first[s] == ref[s] for s in range(1, 15))


def test_mpirun_hostfile_over_ssh_equals_one_host(ssh_hosts, one_host, tmp_path):
    """launch_scripts/mpirun.sh with a hostfile: Open MPI starts one rank per host over ssh; the
    losses of every step equal the one-host torchrun run."""
    import shutil
    if shutil.which("mpirun") is None:
        pytest.skip("no mpirun (bash launch_scripts/setup_env.sh installs Open MPI)")
    hosts = ssh_hosts
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"{h.hostname} slots=1\n" for h in hosts.hosts))
    out = tmp_path / "mpi"
    env = _env(HOSTFILE=str(hostfile), NP="2", MASTER_PORT=str(port()))
    log = open(tmp_path / "mpi.log", "w+")
    args = ["bash", os.path.join(ROOT, "launch_scripts", "mpirun.sh"), "--config", TINY, "--deepspeed", ZERO1,
            "--output", str(out), "--set", *SETTINGS]
    proc = hosts[0].popen(args, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        code = proc.wait(TIMEOUT)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        hosts.kill_all()
    log.seek(0)
    text = log.read()
    assert code == 0, text[-4000:]
    ref = reference_losses(one_host)
    got = losses(out)
    assert sorted(got) == list(range(1, STEPS + 1)), text[-3000:]
    assert all(got[s] == ref[s] for s in got), [(s, got[s], ref[s]) for s in got if got[s] != ref[s]]


@pytest.fixture(scope="module")
def slurm2(hosts, tmp_path_factory):
    """A two-node Slurm: slurmctld on host 0, one slurmd per host (``slurmd -D -N <node>``), one
    munged. The node names resolve nowhere: only their NodeAddr does."""
    from slurm_cluster import LocalSlurm, ensure_installed
    why = ensure_installed()
    if why:
        pytest.skip(f"no Slurm here: {why}")
    nodes = [{"name": f"s2n{i}{hosts.suffix}", "addr": h.addr, "hostname": h.hostname, "prefix": h.command([])}
             for i, h in enumerate(hosts.hosts)]
    try:
        c = LocalSlurm.launch(str(tmp_path_factory.mktemp("slurm2")), cpus=2, nodes=nodes)
    except RuntimeError as e:
        pytest.skip(f"could not start a two-node Slurm: {e}")
    yield c
    c.stop()


def test_sbatch_two_nodes_trains_across_both_with_the_node_address_as_master(slurm2, hosts, one_host, tmp_path):
    env = {k: v for k, v in _env().items() if not k.startswith("SLURM_")}
    env.update(S2MOE_REPO=ROOT, S2MOE_VENV=sys.prefix, S2MOE_CONFIG=TINY, S2MOE_OUTPUT=str(tmp_path / "run"),
               S2MOE_SET=" ".join(SETTINGS), PATH=os.path.dirname(sys.executable) + os.pathsep + env["PATH"])
    env.pop("S2MOE_DATA", None)
    log = str(tmp_path / "job.out")
    out = slurm2.run(["sbatch", "--parsable", "--job-name=s2moe-2n", "--nodes=2", "--ntasks-per-node=1",
                      "--gpus-per-node=0", "--cpus-per-task=1", f"--output={log}",
                      os.path.join(ROOT, "slurm", "pretrain.sbatch")], env=env, cwd=ROOT)
    job = out.stdout.strip().split(";")[0]
    end = time.monotonic() + TIMEOUT
    try:
        while slurm2.job(job).get("JobState") not in ("COMPLETED", "FAILED", "CANCELLED", None):
            assert time.monotonic() < end, open(log).read()[-4000:] + slurm2.logs()
            time.sleep(1)
        text = open(log).read() if os.path.exists(log) else ""
        fields = slurm2.job(job)
    finally:
        slurm2.run(["scancel", job], check=False)
    assert fields.get("JobState", "COMPLETED") == "COMPLETED", text[-4000:] + slurm2.logs()
    assert "restart 0: 2 node(s) [" in text and ", 2 ranks, 0 GPU(s)/node" in text, text[-3000:]
    assert f"rendezvous {hosts[0].addr}:" in text  # node 0's NodeAddr, not its name
    ref = reference_losses(one_host)
    got = losses(tmp_path / "run")
    assert sorted(got) == list(range(1, STEPS + 1)) and all(got[s] == ref[s] for s in got), \
        [(s, got.get(s), ref[s]) for s in ref if got.get(s) != ref[s]]


def _rank_pids(out) -> dict:
    """{pid: SLURMD_NODENAME or ''} of the live s2moe-train ranks writing to ``out`` (every simulated
    host shares this machine's PID namespace)."""
    found, mark = {}, str(out).encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{entry}/stat") as f:
                zombie = f.read().rsplit(")", 1)[1].split()[0] == "Z"
            argv0 = os.path.basename(cmd.split(b"\0", 1)[0])
            if zombie or not (argv0.startswith(b"python") or argv0 == b"s2moe-train") or mark not in cmd \
                    or b"s2moe-train" not in cmd or b"deepspeed.launcher" in cmd:
                continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        except OSError:
            continue
        if b"SLURM_JOB_ID" in env or b"LOCAL_RANK" in env or b"RANK" in env:
            found[int(entry)] = env.get(b"SLURMD_NODENAME", b"").decode()
    return found


def _wait_ranks_gone(out, timeout: float) -> float:
    """Seconds until no rank of ``out`` is alive (raises after ``timeout``)."""
    t0, end = time.time(), time.monotonic() + timeout
    while _rank_pids(out):
        assert time.monotonic() < end, f"ranks still alive after {timeout:.0f} s: {_rank_pids(out)}"
        time.sleep(0.2)
    return time.time() - t0


def test_sigterm_to_the_deepspeed_runner_checkpoints_before_the_ranks_exit(ssh_hosts, tmp_path):
    """SIGTERM to launch_scripts/deepspeed.sh (hostfile, pdsh): the ranks on both hosts checkpoint
    at the next step boundary and exit 0, and so does the script."""
    hosts = ssh_hosts
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"{h.hostname} slots=1\n" for h in hosts.hosts))
    out = tmp_path / "ds_term"
    env = _env(HOSTFILE=str(hostfile), NUM_NODES="2", NUM_GPUS="1", MASTER_ADDR=hosts[0].addr,
               MASTER_PORT=str(port()))
    log = open(tmp_path / "ds_term.log", "w+")
    args = ["bash", os.path.join(ROOT, "launch_scripts", "deepspeed.sh"), "--config", TINY, "--deepspeed", ZERO1,
            "--output", str(out), "--set", *SETTINGS, "train.steps=100000", "train.ckpt_every=0"]
    proc = hosts[0].popen(args, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        end = time.monotonic() + TIMEOUT
        while last_step(out) < 3:
            assert time.monotonic() < end and proc.poll() is None, open(log.name).read()[-4000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        t_term = time.time()
        try:
            code = proc.wait(120)
        except subprocess.TimeoutExpired:
            code = None
        runner_s = time.time() - t_term
        ranks_s = _wait_ranks_gone(out, 120) + runner_s
    finally:
        hosts.kill_all()
    log.seek(0)
    text = log.read()
    m = [int(s) for s in re.findall(r"SIGTERM: checkpointed at step (\d+), exiting", text)]
    print(f"[figures] deepspeed (pdsh), 2 hosts: SIGTERM to the runner: it ended {runner_s:.1f} s later "
          f"(exit {code}), the last rank {ranks_s:.1f} s later; checkpointed: {m}")
    # before: DeepSpeed's runner killed pdsh (the ranks' output with it), pkilled the node launchers
    # and exited 1 within ~5 s, not waiting for the ranks' checkpoint
    assert m and code == 0, text[-5000:]
    assert ranks_s - runner_s < 2  # the script ends once the ranks are gone, not before
    assert os.path.isfile(out / "checkpoints" / f"global_step{m[0]}" / "s2moe_complete.json"), text[-3000:]


def _slowness() -> float:
    """Waits stretch on a loaded machine (load per core above 1), up to 4x."""
    return min(4.0, max(1.0, os.getloadavg()[0] / (os.cpu_count() or 1)))


# EP=4 over 2 nodes x 2 tasks; constant LR after warm-up, so a run stopped at step K and a run of
# train.steps=K see the same learning rates (the job runs until cancelled)
EP4 = [s for s in SETTINGS if not s.startswith(("model.moe.ep_size", "train.steps", "train.ckpt_every"))] + [
    "model.moe.ep_size=4", "train.lr_schedule=constant", "train.ckpt_every=0", "train.keep_checkpoints=0"]
COLLECTIVE_TIMEOUT = 45  # above the 24-37 s Slurm took to set a node DOWN (SlurmdTimeout=30): it notices first


class SlurmJob:
    def __init__(self, cluster, job_id, log):
        self.c, self.id, self.log = cluster, job_id, log

    def text(self) -> str:
        return open(self.log, errors="replace").read() if os.path.exists(self.log) else ""

    def wait(self, what, ok, timeout):
        """Poll ``ok(log_text, job_fields)`` until truthy (returned); the timeout is load-scaled."""
        timeout *= _slowness()
        end = time.monotonic() + timeout
        while True:
            fields, text = self.c.job(self.id), self.text()
            got = ok(text, fields)
            if got:
                return got
            if time.monotonic() > end:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; job {self.id}: "
                                     f"{fields.get('JobState')} Reason={fields.get('Reason')} Restarts="
                                     f"{fields.get('Restarts')}\n--- job log ---\n{text[-6000:]}\n{self.c.logs()}")
            time.sleep(0.5)

    def line(self, pattern, what, timeout, after=0):
        return self.wait(what, lambda text, _: re.compile(pattern).search(text, after), timeout)


def _node_state(cluster, node) -> str:
    out = cluster.run(["scontrol", "show", "node", "-o", node], check=False).stdout
    m = re.search(r"State=(\S+)", out)
    return m.group(1) if m else "?"


def test_sbatch_two_nodes_two_tasks_each_ep4_usr1_requeue_node_failure_and_resume(slurm2, hosts, tmp_path):
    """One job, ``sbatch -N 2 --ntasks-per-node=2``, EP=4 (the all-to-all spans both nodes), through:
    USR1 to the steps (checkpoint, trains on) -> USR1 to the batch shell (checkpoint, exit 0,
    requeue) -> resume -> node 1 fails (link down, its slurmd SIGKILLed) -> Slurm requeues the job
    -> node 1 back (link up, slurmd restarted) -> resume -> scancel. Every loss, of the first and of
    the last time a step ran, equals a one-host 4-rank torchrun run."""
    run, log = tmp_path / "run", str(tmp_path / "job.out")
    env = {k: v for k, v in _env().items() if not k.startswith("SLURM_")}
    env.update(S2MOE_REPO=ROOT, S2MOE_VENV=sys.prefix, S2MOE_CONFIG=TINY, S2MOE_OUTPUT=str(run),
               S2MOE_SET=" ".join(EP4 + ["train.steps=100000", f"train.collective_timeout_s={COLLECTIVE_TIMEOUT}"]),
               PATH=os.path.dirname(sys.executable) + os.pathsep + env["PATH"])
    env.pop("S2MOE_DATA", None)
    out = slurm2.run(["sbatch", "--parsable", "--job-name=s2moe-ep4", "--nodes=2", "--ntasks-per-node=2",
                      "--gpus-per-node=0", "--cpus-per-task=1", f"--output={log}",
                      os.path.join(ROOT, "slurm", "pretrain.sbatch")], env=env, cwd=ROOT)
    job = SlurmJob(slurm2, out.stdout.strip().split(";")[0], log)
    node1 = f"s2n1{hosts.suffix}"
    figures = {}
    try:
        job.line(r"no checkpoint in .*: starting from step 0", "training to start", 240)
        assert "restart 0: 2 node(s) [" in job.text() and ", 4 ranks, 0 GPU(s)/node" in job.text(), job.text()
        job.wait("step 2", lambda *_: last_step(run) >= 2, 120)

        # 1) USR1 to the job steps: every rank checkpoints (one or two consecutive steps), trains on
        slurm2.run(["scancel", "--signal=USR1", job.id])
        job.line(r"checkpoint \S+/global_step(\d+)", "a checkpoint after USR1", 120)
        time.sleep(2)
        usr1 = [int(x) for x in re.findall(r"checkpoint \S+/global_step(\d+)", job.text())]
        assert len(usr1) in (1, 2) and usr1 == list(range(usr1[0], usr1[0] + len(usr1))), usr1
        fields = slurm2.job(job.id)
        assert fields.get("JobState") == "RUNNING" and fields.get("Restarts") == "0", fields
        assert "SIGTERM" not in job.text()

        # 2) USR1 to the batch shell: checkpoint, exit 0, requeue
        mark = len(job.text())
        slurm2.run(["scancel", "--batch", "--signal=USR1", job.id])
        b = int(job.line(r"SIGTERM: checkpointed at step (\d+), exiting", "the ranks to checkpoint and stop", 120,
                         mark).group(1))
        assert b > usr1[-1]
        job.line(r"srun exited with status 0\n.*requeueing job", "the script to requeue the job", 60, mark)
        job.wait("the requeue", lambda _, f: f.get("JobState") == "PENDING" and f.get("Restarts") == "1", 60)

        # 3) the rerun resumes at b (3 s: a credential issued in the second of the requeue is refused)
        time.sleep(3)
        mark = len(job.text())
        slurm2.run(["scontrol", "update", f"JobId={job.id}", "StartTime=now"])
        got = job.line(r"resumed from (\S+)/global_step(\d+) at step (\d+)", "the rerun to resume", 240, mark)
        assert got.group(1) == str(run / "checkpoints") and int(got.group(2)) == int(got.group(3)) == b
        job.wait(f"step {b + 2}", lambda *_: last_step(run) >= b + 2, 120)

        # 4) node 1 fails: its link down and its slurmd SIGKILLed (its job step lives on, cut off)
        ranks = _rank_pids(run)
        assert sorted(ranks.values()) == sorted([f"s2n0{hosts.suffix}"] * 2 + [node1] * 2), ranks
        failed_at = last_step(run)
        hosts.link_down()
        slurm2.kill_slurmd(node1)
        t0 = time.time()
        # the reference, one host, 4 ranks, while the job's ranks wait: constant LR, so a run of
        # train.steps=K equals the job's first K steps
        ref_steps, ref_out = failed_at + 2, tmp_path / "ref"
        ref = Node(hosts[0], str(tmp_path / "ref.log"), ref_out, 1, 0, "127.0.0.1", port(), nproc=4,
                   extra=[*EP4, f"train.steps={ref_steps}"])
        events = {}
        end = time.monotonic() + 240 * _slowness()
        while time.monotonic() < end:
            state, fields, alive = _node_state(slurm2, node1), slurm2.job(job.id), _rank_pids(run)
            now = time.time() - t0
            if "*" in state or "NOT_RESPONDING" in state:
                events.setdefault("node not responding", now)
            if "DOWN" in state:
                events.setdefault("node DOWN", now)
            if fields.get("Restarts") == "2" or fields.get("JobState") not in ("RUNNING", "COMPLETING"):
                events.setdefault(f"job {fields.get('JobState')} restarts {fields.get('Restarts')}", now)
            for node in {f"s2n0{hosts.suffix}", node1} - set(alive.values()):
                events.setdefault(f"ranks on {node[:4]} gone", now)
            if len(events) >= 5 or now > 200:
                break
            time.sleep(0.5)
        figures["node failure"] = {k: round(v, 1) for k, v in events.items()}
        print(f"[figures] slurm, node 1 failed at step {failed_at}: {figures['node failure']}", flush=True)
        fields = slurm2.job(job.id)
        print(f"[figures] job after the node failure: {fields.get('JobState')} Reason={fields.get('Reason')} "
              f"Restarts={fields.get('Restarts')}", flush=True)
        # Slurm requeued the job (Restarts 2): COMPLETING while a task lives, then PENDING
        assert fields.get("Restarts") == "2" and fields.get("JobState") in ("PENDING", "COMPLETING"), \
            (fields, job.text()[-3000:])
        assert not _rank_pids(run) and "SIGTERM: checkpointed" not in job.text()[mark:]
        end = time.monotonic() + 15 * _slowness()
        while slurm2.job(job.id).get("JobState") != "PENDING" and time.monotonic() < end:
            time.sleep(0.5)
        print(f"[figures] job {slurm2.job(job.id).get('JobState')} {time.time() - t0:.1f} s after the failure, "
              f"node 1 still {_node_state(slurm2, node1)}", flush=True)

        # 5) node 1 back: link up, slurmd restarted; the requeued job resumes at b
        hosts.link_up()
        slurm2.restart_slurmds()
        t1 = time.time()
        job.wait("node 1 back", lambda *_: _node_state(slurm2, node1).split("+")[0] in ("IDLE", "MIXED", "ALLOCATED"),
                 90)
        figures["node back"] = round(time.time() - t1, 1)
        job.wait("the job pending again", lambda _, f: f.get("JobState") == "PENDING", 60)
        print(f"[figures] job with node 1 back: Reason={slurm2.job(job.id).get('Reason')}", flush=True)
        time.sleep(3)
        mark = len(job.text())
        slurm2.run(["scontrol", "update", f"JobId={job.id}", "StartTime=now"])
        got = job.line(r"resumed from (\S+)/global_step(\d+) at step (\d+)", "the rerun to resume", 240, mark)
        assert int(got.group(2)) == int(got.group(3)) == b, got.group(0)
        job.wait(f"step {ref_steps}", lambda *_: last_step(run) >= ref_steps, 120)
        print(f"[figures] slurm: node 1 IDLE {figures['node back']} s after slurmd's restart", flush=True)
    finally:
        slurm2.run(["scancel", "--signal=KILL", "--full", job.id], check=False)
        slurm2.run(["scancel", job.id], check=False)
        hosts.link_up()

    try:
        assert wait_all([ref]) == [0], ref.text()[-3000:]
    finally:
        hosts.kill_all()
    want, first, last = losses(ref_out), losses(run, first=True), losses(run)
    assert sorted(want) == list(range(1, ref_steps + 1)) and set(want) <= set(first), (sorted(want), sorted(first))
    assert all(first[s] == want[s] for s in want), [(s, first[s], want[s]) for s in want if first[s] != want[s]]
    assert all(last[s] == want[s] for s in want), [(s, last[s], want[s]) for s in want if last[s] != want[s]]
