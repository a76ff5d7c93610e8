"""Bounded disk: which adapter versions a run keeps.

Every step saves a version (about 120 MB for a float32 r=16 LoRA of a 3B model on every linear
layer: ~60 GB per 500 steps if all were kept). After each publish, rank 0 deletes the versions no
one needs any more; kept are:
- the live version, and the one live before it (a rollout asked for ahead of time, learner.overlap,
  may still be pinned to it, and a replica re-synced meanwhile loads it from here);
- every version a checkpoint serves from (its resume serves that directory);
- the newest `keep_adapters`.
Servers hold no copy of their own to drop: a replaced version leaves the engine once its last
request ends (rollout_server.service), and uploads are pruned on the server (rollout_server.uploads).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from learner.model import versions
from shared.durable import remove_tree

log = logging.getLogger(__name__)


def versions_to_delete(
    existing: Iterable[int], *, went_live: list[int], checkpointed: Iterable[int], keep: int
) -> list[int]:
    """The versions of `existing` that no one needs: not among the last two of `went_live` (in
    order, the base's 0 first), not in `checkpointed`, not among the newest `keep`. Ascending."""
    existing = sorted(set(existing))
    needed = set(went_live[-2:]) | set(checkpointed) | set(existing[-keep:] if keep else [])
    return [v for v in existing if v not in needed]


def prune_versions(adapter_root: Path, *, went_live: list[int], checkpointed: Iterable[int], keep: int) -> list[Path]:
    """Delete the version directories `versions_to_delete` names under `adapter_root` (renamed
    aside first, so a reader never sees half a directory); what was deleted."""
    on_disk = versions(adapter_root)
    deleted = []
    for version in versions_to_delete(on_disk, went_live=went_live, checkpointed=checkpointed, keep=keep):
        remove_tree(on_disk[version])
        deleted.append(on_disk[version])
    if deleted:
        log.debug("deleted adapter versions %s", ", ".join(p.name for p in deleted))
    return deleted
