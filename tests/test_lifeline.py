"""shared/lifeline.py: a child dies with its parent, and a parent of pid 1 (a container's main
process) is a parent, not a sign that the real one died."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_as_pid_1(code: str) -> subprocess.CompletedProcess:
    """`code` run by a Python that is pid 1 of a new PID namespace, as a container's entry point is."""
    if subprocess.run(["unshare", "--pid", "--fork", "true"], capture_output=True).returncode != 0:
        pytest.skip("cannot create a PID namespace here (unshare --pid needs root)")
    cmd = ["unshare", "--pid", "--fork", sys.executable, "-c", textwrap.dedent(code)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_a_child_of_pid_1_arms_the_signal_and_lives() -> None:
    """vLLM's engine core is the child of a rollout server that is pid 1 in its container: it
    exited at start-up (exit 1, no message) and the server never started."""
    done = run_as_pid_1(
        """
        import os
        from shared.lifeline import die_with_parent
        assert os.getpid() == 1
        child = os.fork()
        if child == 0:
            os._exit(0 if die_with_parent() else 3)
        print(os.waitpid(child, 0)[1] >> 8)
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0"]


def test_a_child_whose_parent_died_before_arming_exits() -> None:
    """Told its parent's pid, a child that already has another parent (reparented) exits at once."""
    code = "import os; from shared.lifeline import die_with_parent; die_with_parent(parent=os.getppid() + 10**6)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=60).returncode == 1


def child_outlives_parent(parent_code: str) -> bool:
    """Run `parent_code` (it prints the pid of a child it started), SIGKILL it, and tell whether
    that child is still alive 10 s later. A child left alive is killed here."""
    parent = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(parent_code)], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        child = int(parent.stdout.readline())
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _alive(child):
            time.sleep(0.05)
        alive = _alive(child)
        if alive:
            os.kill(child, signal.SIGKILL)
        return alive
    finally:
        if parent.poll() is None:
            parent.kill()


def test_a_child_dies_when_its_parent_is_killed() -> None:
    """A child that armed the signal itself (as a spawned engine core does, or a Popen preexec_fn)."""
    code = """
        import os, time
        from shared.lifeline import die_with_parent
        child = os.fork()
        if child == 0:
            die_with_parent(parent=os.getppid())
            time.sleep(60)
            os._exit(0)
        print(child, flush=True)
        time.sleep(60)
    """
    assert not child_outlives_parent(code)


FORKED_CHILD = """
    import multiprocessing, time
    from shared.lifeline import forked_children_die_with_parent
    if {armed}:
        forked_children_die_with_parent()
    # As vLLM starts its engine core on CUDA: multiprocessing's fork, no code of ours in the child.
    child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))
    child.start()
    print(child.pid, flush=True)
    time.sleep(60)
"""


def test_a_forked_child_dies_with_its_parent_once_armed() -> None:
    """vLLM's engine core on CUDA is forked, not spawned: it never imports the server's module,
    where spawned children arm the signal. The server arms every fork instead."""
    assert not child_outlives_parent(FORKED_CHILD.format(armed=True))


def test_without_arming_a_forked_child_outlives_its_parent() -> None:
    """What the server did before: the check above can fail."""
    assert child_outlives_parent(FORKED_CHILD.format(armed=False))


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting for a reaper."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
