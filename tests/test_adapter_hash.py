"""shared.adapter_hash: the sha256 that learner and servers compare, with expectations from hashlib
and from coreutils' sha256sum."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from shared.adapter_hash import adapter_sha256


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write(directory: Path, files: dict[str, bytes]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return directory


def test_the_hash_is_sha256_of_each_files_sha256_and_name_in_name_order(tmp_path: Path) -> None:
    directory = write(tmp_path / "v1", {"b.bin": b"xy", "a.json": b"abc"})
    # a.json before b.bin; each line "<sha256 of its bytes>  <name>\0"
    listing = f"{sha(b'abc')}  a.json\0{sha(b'xy')}  b.bin\0".encode()
    assert adapter_sha256(directory) == sha(listing)


def test_an_empty_directory_hashes_the_empty_listing(tmp_path: Path) -> None:
    assert adapter_sha256(write(tmp_path / "v1", {})) == sha(b"")


def test_one_byte_or_one_name_changes_the_hash(tmp_path: Path) -> None:
    config, weights = b'{"r": 8}', bytes(range(256)) * 64
    flipped = bytearray(weights)
    flipped[1000] ^= 1
    original = write(tmp_path / "original", {"adapter_config.json": config, "adapter_model.safetensors": weights})
    one_byte = write(tmp_path / "byte", {"adapter_config.json": config, "adapter_model.safetensors": bytes(flipped)})
    one_name = write(tmp_path / "name", {"adapter_config.jsoN": config, "adapter_model.safetensors": weights})
    assert len({adapter_sha256(original), adapter_sha256(one_byte), adapter_sha256(one_name)}) == 3


def test_moving_bytes_from_one_file_to_the_next_changes_the_hash(tmp_path: Path) -> None:
    # The same bytes concatenated, split at another place: a plain hash of names + bytes could collide.
    split_early = write(tmp_path / "early", {"a": b"x", "b": b"yz"})
    split_late = write(tmp_path / "late", {"a": b"xy", "b": b"z"})
    assert adapter_sha256(split_early) != adapter_sha256(split_late)


def test_the_hash_does_not_depend_on_the_order_files_were_written(tmp_path: Path) -> None:
    files = {"adapter_config.json": b"{}", "adapter_model.safetensors": b"w" * 10, "README.md": b"# card"}
    forward = write(tmp_path / "forward", files)
    backward = write(tmp_path / "backward", dict(reversed(files.items())))
    assert adapter_sha256(forward) == adapter_sha256(backward)


def test_subdirectories_are_skipped_and_symlinks_hash_as_their_target(tmp_path: Path) -> None:
    plain = write(tmp_path / "plain", {"adapter_model.safetensors": b"weights"})
    linked = write(tmp_path / "linked", {})
    (linked / "adapter_model.safetensors").symlink_to(plain / "adapter_model.safetensors")
    write(linked / "checkpoint-1", {"optimizer.pt": b"state"})
    assert adapter_sha256(linked) == adapter_sha256(plain)


@pytest.mark.skipif(shutil.which("sha256sum") is None, reason="needs coreutils' sha256sum")
def test_the_hash_is_what_sha256sum_z_piped_to_sha256sum_prints(tmp_path: Path) -> None:
    # Several MiB, so the files are hashed over many of file_digest's 256 KiB chunks.
    files = {"adapter_config.json": b'{"r": 8}', "adapter_model.safetensors": os.urandom(5 * 2**20 + 7)}
    directory = write(tmp_path / "v1", files)
    shell = subprocess.run(
        "sha256sum -z -- * | sha256sum",
        shell=True,
        cwd=directory,
        env={**os.environ, "LC_ALL": "C"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert shell.stdout.split()[0] == adapter_sha256(directory)
