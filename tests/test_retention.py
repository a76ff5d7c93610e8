"""Which adapter versions a run keeps (learner.retention): a table of cases, then the directories."""

from __future__ import annotations

from pathlib import Path

import pytest

from learner.retention import prune_versions, versions_to_delete


@pytest.mark.parametrize(
    ("existing", "went_live", "checkpointed", "keep", "deleted"),
    [
        # the newest 2 kept, with the live one (10) and the one before it (9)
        (range(1, 11), [0, *range(1, 11)], [], 2, list(range(1, 9))),
        # a checkpoint serves from version 4: kept however old
        (range(1, 11), [0, *range(1, 11)], [4], 2, [1, 2, 3, 5, 6, 7, 8]),
        # keep 0: only what is needed (the live one and the one before)
        (range(1, 6), [0, 1, 2, 3, 4, 5], [], 0, [1, 2, 3]),
        # one step ahead (overlap): version 4 went live after 3, whose rollout may still be in flight
        (range(1, 5), [0, 1, 2, 3, 4], [], 0, [1, 2]),
        # a resumed run: its first live version is the checkpoint's (7), after the base
        (range(1, 9), [0, 7, 8], [7], 0, [1, 2, 3, 4, 5, 6]),
        # fewer versions than keep: nothing goes
        ([1, 2], [0, 1, 2], [], 5, []),
        # nothing on disk
        ([], [0], [], 3, []),
    ],
)
def test_versions_to_delete(existing, went_live, checkpointed, keep, deleted) -> None:
    assert versions_to_delete(existing, went_live=went_live, checkpointed=checkpointed, keep=keep) == deleted


def test_prune_deletes_only_version_directories(tmp_path: Path) -> None:
    for v in range(1, 6):
        (tmp_path / f"v{v:06d}").mkdir()
        (tmp_path / f"v{v:06d}" / "adapter_model.safetensors").write_bytes(b"w")
    (tmp_path / "uploads").mkdir()  # not a version: left alone
    (tmp_path / "notes.txt").write_text("mine")
    deleted = prune_versions(tmp_path, went_live=[0, 4, 5], checkpointed=[2], keep=1)
    assert [p.name for p in deleted] == ["v000001", "v000003"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "uploads", "v000002", "v000004", "v000005"]
