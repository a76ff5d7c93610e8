"""The sha256 of a peft adapter directory: the learner hashes the directory it saved, each rollout
server the directory it loaded (reported by `POST /v1/load_lora_adapter` and `GET /v1/models`), and
a version is the same adapter everywhere when the hashes agree.

Stdlib only: both processes import it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def adapter_sha256(directory: Path) -> str:
    """Hex sha256 of the concatenation, over the regular files directly in `directory` in the byte
    order of their names, of `<hex sha256 of the file's bytes>  <name>` + NUL (two spaces; no name
    holds a NUL, so the text splits one way only).

    That is what `sha256sum -z` prints for the files: in a shell, for a directory with no dotfiles,
    `LC_ALL=C sha256sum -z -- * | sha256sum`. Symlinks are followed, as the engine follows them;
    subdirectories (and anything else but files) are skipped: peft saves an adapter as flat files.
    Files are read in chunks (`hashlib.file_digest`), never whole. OSError if one cannot be read.
    """
    with os.scandir(directory) as entries:
        names = sorted((entry.name for entry in entries if entry.is_file()), key=os.fsencode)
    listing = hashlib.sha256()
    for name in names:
        with open(directory / name, "rb") as f:
            file_hex = hashlib.file_digest(f, "sha256").hexdigest()
        listing.update(file_hex.encode() + b"  " + os.fsencode(name) + b"\0")
    return listing.hexdigest()
