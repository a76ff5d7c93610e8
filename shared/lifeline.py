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


def die_with_parent(sig: signal.Signals = signal.SIGKILL) -> bool:
    """Have the kernel send `sig` to this process when its parent dies; False where unsupported.

    If the parent is already gone (this process was reparented before the call), exits now.
    """
    if _libc is None:
        return False
    parent = os.getppid()
    if _libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return False
    if parent == 1 or os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)
    return True
