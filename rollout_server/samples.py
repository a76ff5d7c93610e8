"""A bounded, in-memory record of recent rollouts, optionally mirrored to a JSONL file.

Memory holds each record as its JSON text, so `samples_max_bytes` bounds what the records really
take (a parsed record takes several times its JSON). The file is written by one thread, in order,
off the event loop; `add` and `attach_scores` return once their line is written, and it is renamed
to '<name>.1' when it would pass `samples_file_max_bytes`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

from shared.config import ServerConfig
from shared.errors import InvalidRequestError, SampleNotFoundError
from shared.schemas import CurvePoint, PromptRollout, RewardCurve, SampleRecord, SampleScores

log = logging.getLogger("rollout_server")

TRUNCATED_CHARS = 256
"""Characters of each completion text a truncated record keeps."""


MAX_CURVES = 64
"""Runs' reward curves kept (those scored last)."""


class _Kept(NamedTuple):
    adapter: str | None
    run: str | None
    kind: str
    data: bytes  # the record's JSON; NaN and +-inf written as the bare constants, so they read back


class SampleStore:
    """The last `samples_capacity` rollouts within `samples_max_bytes`, oldest evicted first; scores
    can be attached later. The newest record is always kept, so it can be scored: one over the byte
    budget alone is kept truncated (`SampleRecord.truncated`)."""

    def __init__(self, cfg: ServerConfig) -> None:
        self._capacity = cfg.samples_capacity
        self._max_bytes = cfg.samples_max_bytes
        self._records: OrderedDict[str, _Kept] = OrderedDict()
        self._size = 0
        self._curves = _Curves(cfg.samples_curve_points)
        self._file: _RotatingFile | None = None
        self._writer: ThreadPoolExecutor | None = None
        if cfg.samples_path is not None:
            self._file = _RotatingFile(cfg.samples_path, cfg.samples_file_max_bytes)
            # One worker: lines reach the file in the order they were queued.
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="samples")

    @property
    def size_bytes(self) -> int:
        """Bytes the kept records take (their JSON)."""
        return self._size

    async def add(self, record: SampleRecord) -> None:
        """Record a rollout, evicting the oldest beyond capacity or the byte budget."""
        data = _dumps(record)
        self._keep(record.rollout_id, record, data)
        await self._append({"event": "rollout"}, data)

    async def attach_scores(self, rollout_id: str, scores: SampleScores) -> SampleRecord:
        """Attach rewards/advantages, which must match the rollout's [prompt][completion] shape."""
        kept = self._records.get(rollout_id)
        if kept is None:
            raise SampleNotFoundError(f"no recorded rollout {rollout_id!r} (evicted or never made)")
        record = SampleRecord.model_validate_json(kept.data)
        shape = [len(r.completions) for r in record.results]
        if [len(row) for row in scores.rewards] != shape:
            raise InvalidRequestError(f"scores are shaped {[len(r) for r in scores.rewards]}, the rollout is {shape}")
        self._curves.replace(record, record.scores, scores)
        record.scores = scores
        self._keep(rollout_id, record, _dumps(record))
        await self._append({"event": "scores", "rollout_id": rollout_id}, _dumps(scores))
        return record

    def recent(
        self,
        limit: int,
        adapter: str | None = None,
        *,
        run: str | None = None,
        kind: str | None = None,
        tokens: bool = True,
    ) -> list[SampleRecord]:
        """Newest first, at most `limit`, optionally only those of one adapter, run or kind; without
        their token ids and logprobs unless `tokens`."""
        out = []
        for kept in reversed(self._records.values()):
            if _matches(kept, adapter, run, kind):
                record = SampleRecord.model_validate_json(kept.data)
                out.append(record if tokens else _without_tokens(record))
                if len(out) == limit:
                    break
        return out

    def curves(self) -> list[RewardCurve]:
        """Every kept run's mean reward per step, by run and kind (`_Curves`)."""
        return self._curves.all()

    async def close(self) -> None:
        """Wait until every queued line is written; no line may be added after."""
        if self._writer is not None:
            await asyncio.to_thread(self._writer.shutdown)

    def _keep(self, rollout_id: str, record: SampleRecord, data: bytes) -> None:
        if len(data) > self._max_bytes and not record.truncated:
            data = _dumps(_truncated(record))
        previous = self._records.get(rollout_id)
        self._size += len(data) - (len(previous.data) if previous else 0)
        self._records[rollout_id] = _Kept(
            record.adapter, record.run, record.kind, data
        )  # a replaced one keeps its place
        while len(self._records) > 1 and (len(self._records) > self._capacity or self._size > self._max_bytes):
            _, evicted = self._records.popitem(last=False)
            self._size -= len(evicted.data)

    async def _append(self, head: dict[str, str], data: bytes) -> None:
        if self._writer is None or self._file is None:
            return
        write = asyncio.get_running_loop().run_in_executor(self._writer, self._file.write, head, data)
        # Shielded: a request cancelled meanwhile (its client left) still gets its line written.
        await asyncio.shield(write)


def _matches(kept: _Kept, adapter: str | None, run: str | None, kind: str | None) -> bool:
    return (
        (adapter is None or kept.adapter == adapter)
        and (run is None or kept.run == run)
        and (kind is None or kept.kind == kind)
    )


def cut_text(text: str, max_chars: int) -> str:
    """`text`, or its first quarter and last three quarters of `max_chars` joined by '…'."""
    if len(text) <= max_chars:
        return text
    head = max_chars // 4
    return text[:head] + "…" + text[len(text) - (max_chars - head - 1) :]


class _Curves:
    """Mean reward per step of each (run, kind, adapter), from every score posted, whether or not
    its rollout is still in the log: the newest `max_points` steps of the MAX_CURVES curves scored
    last. A rollout scored again replaces its first scores."""

    def __init__(self, max_points: int) -> None:
        self._max_points = max_points
        # (run, kind, adapter) -> step -> [sum of rewards, completions with a reward, version]
        self._curves: OrderedDict[tuple[str | None, str, str | None], dict[int, list]] = OrderedDict()

    def replace(self, record: SampleRecord, old: SampleScores | None, new: SampleScores) -> None:
        key = (record.run, record.kind, record.adapter)
        curve = self._curves.setdefault(key, {})
        self._curves.move_to_end(key)
        for scores, sign in ((old, -1), (new, 1)):
            if scores is None or scores.step is None:
                continue
            rewards = [r for row in scores.rewards for r in row if r is not None]
            point = curve.setdefault(scores.step, [0.0, 0, record.policy_version])
            point[0] += sign * math.fsum(rewards)
            point[1] += sign * len(rewards)
            if point[1] == 0:
                del curve[scores.step]
        while len(curve) > self._max_points:
            del curve[min(curve)]
        while len(self._curves) > MAX_CURVES:
            self._curves.popitem(last=False)

    def all(self) -> list[RewardCurve]:
        return [
            RewardCurve(
                run=run,
                kind=kind,
                adapter=adapter,
                points=[
                    CurvePoint(step=step, reward_mean=total / n, completions=n, policy_version=version)
                    for step, (total, n, version) in sorted(curve.items())
                    if n > 0
                ],
            )
            for (run, kind, adapter), curve in self._curves.items()
        ]


class _RotatingFile:
    """Appends JSONL lines; renames the file to '<name>.1' before a line would take it past `max_bytes`."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = path
        self.old = path.with_name(path.name + ".1")
        self.max_bytes = max_bytes
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, head: dict[str, str], data: bytes) -> None:
        """Append `head`'s fields and then `data`'s (a JSON object) as one line.

        A failed write is logged, not raised: the file is a record for people, and a full disk must
        not fail the rollout whose line it is.
        """
        line = _jsonl_line(head, data)
        try:
            size = self.path.stat().st_size if self.path.exists() else 0
            if size > 0 and size + len(line) > self.max_bytes:
                self.path.replace(self.old)  # one old file is kept: the previous '.1' goes
            with self.path.open("ab") as f:
                f.write(line)
        except OSError:
            log.exception("could not append to the sample file %s; the line is lost", self.path)


def _dumps(model: SampleRecord | SampleScores) -> bytes:
    # Python's json writes NaN/Infinity as bare constants, which pydantic reads back into floats;
    # pydantic's own JSON would write null, which a float field refuses.
    return json.dumps(model.model_dump(mode="json")).encode()


def _jsonl_line(head: dict[str, str], data: bytes) -> bytes:
    """`head`'s fields then `data`'s as one JSON line, with NaN and +-inf written as null."""
    line = json.dumps(head)[:-1].encode() + b"," + data[1:]  # '{"event": ..., ' + '"rollout_id": ...}'
    if b"NaN" in data or b"Infinity" in data:  # rare (or a text that says so): re-encode strictly
        line = json.dumps(_finite(json.loads(line)), allow_nan=False).encode()
    return line + b"\n"


def _finite(value: Any) -> Any:
    """`value` with every NaN and +-inf float, at any depth, replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


def _without_tokens(record: SampleRecord) -> SampleRecord:
    """The record without token ids and logprobs: most of its bytes, and nothing a person reads."""
    results = [
        r.model_copy(
            update={
                "prompt_token_ids": [],
                "completions": [c.model_copy(update={"token_ids": [], "logprobs": []}) for c in r.completions],
            }
        )
        for r in record.results
    ]
    return record.model_copy(update={"results": results})


def _truncated(record: SampleRecord) -> SampleRecord:
    """The record without token ids, logprobs and prompts, and with texts cut to TRUNCATED_CHARS."""
    results = [
        PromptRollout(
            prompt=None,
            prompt_token_ids=[],
            completions=[
                c.model_copy(update={"text": c.text[:TRUNCATED_CHARS], "token_ids": [], "logprobs": []})
                for c in r.completions
            ],
        )
        for r in record.results
    ]
    return record.model_copy(update={"results": results, "truncated": True})
