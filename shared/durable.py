"""Writes that survive a power loss: fsync the files, then the directories that name them.

A rename is atomic against a crash of the process, not of the machine: without fsync, the kernel
may write the rename (the directory) before the renamed files' data, and a power loss leaves a
directory under its final name holding empty or partial files. Stdlib only: both processes use it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def fsync_tree(directory: Path) -> None:
    """fsync every regular file under `directory`, then every directory in it, deepest first."""
    for parent, _dirs, files in os.walk(directory, topdown=False):
        for name in files:
            path = Path(parent, name)
            if path.is_symlink():
                continue
            with path.open("rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(parent))


def fsync_dir(directory: Path) -> None:
    """fsync `directory` itself: the names in it (a rename into it, a new entry) reach the disk."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_tree(path: Path) -> None:
    """Delete a directory by first renaming it into a hidden `.removing-<name>-*` one beside it, so
    a kill mid-delete never leaves half a directory under a name that counts (a `step-N`, a `vN`)."""
    hidden = Path(tempfile.mkdtemp(prefix=f".removing-{path.name}-", dir=path.parent))
    os.rename(path, hidden / path.name)
    shutil.rmtree(hidden)
