"""A bounded, in-memory record of recent rollouts, optionally mirrored to a JSONL file."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

from shared.errors import InvalidRequestError, SampleNotFoundError
from shared.schemas import SampleRecord, SampleScores


class SampleStore:
    """The last `capacity` rollouts, oldest evicted first; scores can be attached later."""

    def __init__(self, capacity: int, path: Path | None = None) -> None:
        self._capacity = capacity
        self._records: OrderedDict[str, SampleRecord] = OrderedDict()
        self._path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def add(self, record: SampleRecord) -> None:
        """Record a rollout, evicting the oldest beyond capacity."""
        self._records[record.rollout_id] = record
        while len(self._records) > self._capacity:
            self._records.popitem(last=False)
        self._append({"event": "rollout", **record.model_dump(mode="json")})

    def attach_scores(self, rollout_id: str, scores: SampleScores) -> SampleRecord:
        """Attach rewards/advantages, which must match the rollout's [prompt][completion] shape."""
        record = self._records.get(rollout_id)
        if record is None:
            raise SampleNotFoundError(f"no recorded rollout {rollout_id!r} (evicted or never made)")
        shape = [len(r.completions) for r in record.results]
        if [len(row) for row in scores.rewards] != shape:
            raise InvalidRequestError(f"scores are shaped {[len(r) for r in scores.rewards]}, the rollout is {shape}")
        record.scores = scores
        self._append({"event": "scores", "rollout_id": rollout_id, **scores.model_dump(mode="json")})
        return record

    def recent(self, limit: int, adapter: str | None = None) -> list[SampleRecord]:
        """Newest first, at most `limit`, optionally only those of one adapter."""
        out = []
        for record in reversed(self._records.values()):
            if adapter is None or record.adapter == adapter:
                out.append(record)
                if len(out) == limit:
                    break
        return out

    def _append(self, row: dict) -> None:
        if self._path is not None:
            with self._path.open("a") as f:
                f.write(json.dumps(row) + "\n")
