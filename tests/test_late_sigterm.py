"""A SIGTERM sent to every node reaches the ranks at different times: once a rank has acted on one
(checkpoint, exit 0), a late copy must not kill it on its way out (it died with -15, and the
launcher reported the whole run as failed)."""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = """
import os, signal, sys
from s2moe_dist.train.signals import SignalFlags
flags = SignalFlags().install()
if sys.argv[1] == "term":
    os.kill(os.getpid(), signal.SIGTERM)  # the one the rank acts on
    assert flags.exit
if sys.argv[1] == "agreed":  # another rank's SIGTERM, OR-ed in the flags' all-reduce: exit together
    assert flags.settle(*flags.local()[:1], [1.0, 1.0]) == (True, True)
if sys.argv[1] != "usr1":
    flags.uninstall()
h = signal.getsignal(signal.SIGTERM)
print("after uninstall:", {signal.SIG_DFL: "default", signal.SIG_IGN: "ignored"}.get(h, h), flush=True)
if sys.argv[1] in ("term", "agreed"):
    os.kill(os.getpid(), signal.SIGTERM)  # a late copy (this rank's own), while the rank leaves
if sys.argv[1] == "usr1":  # exiting after a SIGTERM, Slurm's USR1 warning arrives
    os.kill(os.getpid(), signal.SIGTERM)
    flags.uninstall()
    os.kill(os.getpid(), signal.SIGUSR1)
print("still alive", flush=True)
"""


def _run(mode: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True, env=env,
                          timeout=60)


def test_a_late_sigterm_after_a_sigterm_exit_does_not_kill_the_rank():
    out = _run("term")
    assert out.returncode == 0 and "still alive" in out.stdout, (out.returncode, out.stdout, out.stderr)


def test_a_sigterm_that_arrives_after_the_ranks_agreed_to_exit_does_not_kill_the_rank():
    out = _run("agreed")
    assert out.returncode == 0 and "still alive" in out.stdout, (out.returncode, out.stdout, out.stderr)


def test_without_a_sigterm_the_previous_handler_comes_back():
    out = _run("none")
    assert out.returncode == 0 and "after uninstall: default" in out.stdout, out


def test_a_sigusr1_on_the_way_out_after_a_sigterm_does_not_kill_the_rank():
    # seen on Slurm: srun reported the task killed by "User defined signal 1", the job FAILED
    out = _run("usr1")
    assert out.returncode == 0 and "still alive" in out.stdout, (out.returncode, out.stdout, out.stderr)
