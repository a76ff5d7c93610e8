"""Processes that must not outlive their parent: a parent-death signal (Linux `prctl`).

vLLM's engine core is a `multiprocessing` child of the rollout server; a server killed with
SIGKILL runs no cleanup, so without this the engine core lives on (holding its memory, and on
CUDA the GPU). The kernel delivers the signal when the thread that forked the process exits,
so call this only in processes started from their parent's main thread.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1
# Loaded once here: die_with_parent also runs as a Popen preexec_fn, between fork and exec, where
# loading a library could deadlock.
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def die_with_parent(sig: signal.Signals = signal.SIGKILL, *, parent: int | None = None) -> bool:
    """Have the kernel send `sig` to this process when its parent dies; False where unsupported.

    `parent` is the pid of the process that started this one (a Popen preexec_fn's caller passes its
    own); if this process's parent is another by the time the signal is armed, it was reparented:
    the parent is gone, and this process exits now. None: the parent this process has now. A parent
    of pid 1 is not a sign of death: in a container the server is pid 1 (its engine core exited
    here at start-up while that was taken for one).
    """
    if _libc is None:
        return False
    parent = os.getppid() if parent is None else parent
    if _libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return False
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)
    return True


_forking_pid: int | None = None


def _remember_forking_pid() -> None:
    global _forking_pid
    _forking_pid = os.getpid()


def _die_with_forking_parent() -> None:
    die_with_parent(parent=_forking_pid)


def forked_children_die_with_parent() -> None:
    """Arm the parent-death signal in every child this process forks from now on (and they fork).

    A child started by `fork` runs none of our code: vLLM's engine core on CUDA is one
    (`VLLM_WORKER_MULTIPROC_METHOD` defaults to fork there; only CPU forces spawn, whose children
    import the server's module and arm the signal there). Without this, a server killed with
    SIGKILL would leave its engine core holding the GPU. Children started by subprocess (which
    execs) are not affected: their own code decides.
    """
    os.register_at_fork(before=_remember_forking_pid, after_in_child=_die_with_forking_parent)
