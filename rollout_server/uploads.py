"""Adapters sent over HTTP, for a learner that does not share the server's adapter root.

`PUT /v1/adapter_uploads/{sha256}` takes an uncompressed tar of the adapter's files (flat, as peft
saves them) and places them at `<adapter_root>/uploads/<sha256>`, from where they load as any
adapter does (`POST /v1/load_lora_adapter`, same versions, pins and checks). The body is written
to disk as it arrives (never held in memory) and bounded by `max_upload_bytes`; the files are
unpacked into a staging directory, fsynced, hashed (`adapter_sha256`) and renamed into place only
if the hash is the one the URL names, so a directory under uploads/ is always whole and named by
its content. The same upload twice is one directory. The oldest uploads beyond `max_uploads_kept`
are deleted, never one a served version loads from.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tarfile
import uuid
from collections.abc import AsyncIterator, Collection
from pathlib import Path

from shared.adapter_hash import adapter_sha256
from shared.durable import fsync_dir, fsync_tree
from shared.errors import AdapterLoadError, PayloadTooLargeError
from shared.schemas import AdapterUpload

UPLOADS = "uploads"
"""The folder under the adapter root that uploads go to."""
SHA256_PATTERN = r"^[0-9a-f]{64}$"
MAX_FILES = 16
"""Most files in one upload (peft writes two or three)."""
_STAGING = ".staging"


async def receive_upload(
    chunks: AsyncIterator[bytes], adapter_root: Path, sha256: str, *, max_bytes: int
) -> tuple[Path, AdapterUpload]:
    """Write the tar streamed as `chunks` to disk, unpack it and place its files at
    `<adapter_root>/uploads/<sha256>`: that directory and what to answer. PayloadTooLargeError
    past `max_bytes`; AdapterLoadError if it is no flat tar of regular files, or its files hash to
    another sha256. Nothing is left behind on failure."""
    staging = adapter_root.resolve() / UPLOADS / _STAGING / uuid.uuid4().hex
    staging.mkdir(parents=True)
    archive = staging.with_suffix(".tar")
    try:
        size = 0
        with archive.open("wb") as f:  # small writes of what the socket gave: no thread needed
            async for chunk in chunks:
                size += len(chunk)
                if size > max_bytes:
                    raise PayloadTooLargeError(
                        f"the upload grew past the server's max_upload_bytes={max_bytes}: is this an adapter?"
                    )
                f.write(chunk)
        return await asyncio.to_thread(_unpack_and_place, archive, staging, sha256)
    finally:
        archive.unlink(missing_ok=True)
        shutil.rmtree(staging, ignore_errors=True)


def _unpack_and_place(archive: Path, staging: Path, sha256: str) -> tuple[Path, AdapterUpload]:
    total = 0
    try:
        with tarfile.open(archive, mode="r:") as tar:
            for i, member in enumerate(tar):
                if i >= MAX_FILES:
                    raise AdapterLoadError(f"the upload holds more than {MAX_FILES} files: is this an adapter?")
                _check_member(member)
                with tar.extractfile(member) as source, (staging / member.name).open("wb") as target:
                    shutil.copyfileobj(source, target)
                total += member.size
    except tarfile.TarError as e:
        raise AdapterLoadError(f"the upload is not an uncompressed tar archive ({e})") from e
    got = adapter_sha256(staging)
    if got != sha256:
        raise AdapterLoadError(
            f"the uploaded files hash to sha256 {got[:12]}..., not {sha256[:12]}... as the URL says "
            "(sent incomplete, or altered on the way)"
        )
    answer = AdapterUpload(lora_path=f"{UPLOADS}/{sha256}", sha256=sha256, bytes=total)
    final = staging.parent.parent / sha256
    if final.is_dir() and adapter_sha256(final) == sha256:
        os.utime(final)  # sent again: as recent as a new upload, for prune_uploads
        return final, answer
    if final.exists():
        shutil.rmtree(final)  # not what its name says: an earlier write that did not end
    fsync_tree(staging)  # the files on disk before the name that says they are whole
    os.rename(staging, final)
    fsync_dir(final.parent)
    return final, answer


def _check_member(member: tarfile.TarInfo) -> None:
    """A regular file with a plain name: no directory part, no dotfile, no link or device."""
    name = member.name
    plain = name and "/" not in name and "\\" not in name and "\x00" not in name and not name.startswith(".")
    if not plain or len(os.fsencode(name)) > 255:
        raise AdapterLoadError(f"the upload holds {name!r}: only files with plain names (as peft saves them) are taken")
    if not member.isreg():
        raise AdapterLoadError(f"the upload holds {name!r}, which is not a regular file (a link or a directory?)")


def prune_uploads(adapter_root: Path, *, keep: int, in_use: Collection[Path]) -> list[Path]:
    """Delete the oldest uploads (by when they were placed) beyond the newest `keep`, except those
    in `in_use` (resolved paths of directories a served version loads from): what was deleted."""
    uploads = adapter_root.resolve() / UPLOADS
    if not uploads.is_dir():
        return []
    placed = sorted(
        (p for p in uploads.iterdir() if p.name != _STAGING and p.is_dir()),
        key=lambda p: p.stat().st_mtime_ns,
        reverse=True,
    )
    deleted = []
    for old in placed[keep:]:
        if old.resolve() not in in_use:
            shutil.rmtree(old, ignore_errors=True)
            deleted.append(old)
    return deleted
