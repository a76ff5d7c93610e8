"""The learner's link to its rollout servers, one or a pool of replicas, across their restarts.

Routing. A step's rollout goes out as one request per prompt (n = K: a group stays on one replica),
all at once, each to the replica in rotation with the fewest requests in flight. Prompt i keeps the
seeds one request of every prompt would give it, so the completions do not depend on the routing.
A rollout is pinned to the version live when it is asked for (`pinned`); one asked for ahead of
time (learner.overlap) may outlive its version: a replica that no longer serves it answers 409,
and the rollout raises RetiredVersionError rather than take the replica out.

Publishing. A version is served by every replica or by none. The learner loads it on each replica
in rotation; each answers the version and the sha256 of the files it loaded, and the version goes
live only when every answer carries the learner's own hash of the directory. A replica that
refuses it (or reports another hash) fails the publish: the replicas that took it go back to the
previous version (or to none), and the error names the replica. Rollouts name the version they
want, and a replica that does not serve it answers 409 instead of sampling another.

Recovery. A replica that does not answer, answers 503 (a dead engine, a sleep nobody here asked
for), or answers a pinned rollout with 409 (it restarted or fell behind) is taken out of rotation,
and its prompts go to the others. Before each rollout and publish, replicas out of rotation that
answer /health again are re-synced (woken, the live version re-pushed and its hash checked, a
log-probability canary against the learner) and put back; when none is left in rotation, the
learner waits for one (bounded backoff, `server_wait_s`, long enough for a cold start). Nothing
the loop has done is repeated or lost: a step's rollout is retried before it is scored, and the
version saved before a failure is the one put back.

Sleeps carry a lease, so a learner that dies while the servers sleep does not strand them, and
`close()` wakes them on every exit the process lives through.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from peft import PeftModel

from learner.device_memory import release_before_wake
from learner.logprobs import Sequence as TokenSequence
from learner.logprobs import scored_logprobs
from learner.rollout_client import RolloutClient
from shared.adapter_hash import adapter_sha256
from shared.config import LearnerConfig
from shared.errors import AdapterPublishError, RetiredVersionError, RolloutServerError, StaleAdapterError
from shared.schemas import RolloutRequest, RolloutResponse, SampleScores, run_name

log = logging.getLogger("grpo-learner")
T = TypeVar("T")
Canary = Callable[[RolloutClient, str | None, int], float]

ATTEMPTS_PER_CALL = 4
"""Tries of one call (a prompt's rollout, a sleep, a wake) before its error is raised; each lost try
takes a replica out of rotation, or waits for one to come back."""
RECENT_ROLLOUTS = 8
"""Rollouts whose parts are remembered, for posting their scores to the replicas that made them."""


@dataclass(eq=False)
class _Replica:
    client: RolloutClient
    in_rotation: bool = True
    awake: bool = True
    in_flight: int = 0
    sent: int = 0  # requests sent so far: ties of in_flight go to the replica sent fewer
    shares_root: bool | None = None  # its adapter root is the learner's adapter folder (None: not asked yet)

    @property
    def url(self) -> str:
        return self.client.base_url


@dataclass(frozen=True)
class _Published:
    adapter_dir: Path
    version: int
    sha256: str


class _ReplicaLost(Exception):
    """A replica went away or fell behind during a call; it is out of rotation now."""


class ServerLink:
    """Rollouts, sleep/wake and adapter versions over one or more replicas, re-established
    whenever one restarts."""

    def __init__(
        self,
        clients: Sequence[RolloutClient],
        cfg: LearnerConfig,
        canary: Canary,
        *,
        before_wake: Callable[[], None] = release_before_wake,
    ) -> None:
        """`canary(client, adapter, version)` measures how far a replica's log-probabilities of
        that version are from the learner's (`logprob_canary`). `before_wake()` runs before each
        call that wakes a server the learner put to sleep: the learner's cached GPU memory goes back
        to the driver first."""
        if not clients:
            raise ValueError("a ServerLink needs at least one rollout server")
        self._replicas = [_Replica(client) for client in clients]
        self._cfg = cfg
        self._canary = canary
        self._before_wake = before_wake
        self._woken = False  # a server this learner put to sleep has been woken
        self._checked_after_wake = False  # the canary ran on a version loaded after a wake
        self._published: _Published | None = None
        self._went_live = [0]  # every version live so far, in order: the base first
        # Rotation, in-flight counts and _parts, across a rollout's threads and a rollout asked for
        # ahead of time (learner.overlap) in another thread than the loop's.
        self._lock = threading.Lock()
        self._recovering = threading.Lock()  # one re-sync or wait for a lost replica at a time
        self._parts: dict[str, list[tuple[_Replica, str]]] = {}  # rollout id -> (replica, its rollout id)
        self._closed = False
        self._run = run_name(cfg.output_dir)

    @property
    def adapter(self) -> str | None:
        """The adapter rollouts sample from: None (the base) until a version is published."""
        return self._cfg.adapter_name if self._published else None

    @property
    def version(self) -> int:
        """The version rollouts must be stamped with (0: the base model)."""
        return self._published.version if self._published else 0

    @property
    def went_live(self) -> list[int]:
        """Every version live so far, in order, the base's 0 first."""
        return list(self._went_live)

    def versions_since(self, version: int) -> int:
        """How many versions went live after `version` (0: it is the live one), whatever their
        numbers (a run's first version follows the base, 0, with the number of its directory)."""
        assert version in self._went_live, f"version {version} never went live here ({self._went_live})"
        return len(self._went_live) - 1 - self._went_live.index(version)

    def pinned(self, request: RolloutRequest) -> RolloutRequest:
        """`request` pinned to the version live now: its adapter and version (the base: neither)."""
        return request.model_copy(update={"adapter": self.adapter, "version": self.version if self.adapter else None})

    def rollout(self, request: RolloutRequest) -> RolloutResponse:
        """Every prompt's completions (one request per prompt), from the version `request` is
        pinned to (`pinned`), else from the live one. RetiredVersionError if that version was
        replaced before every prompt was sampled (possible only for a request pinned earlier)."""
        self._rejoin_recovered()
        self.wake()
        request = request if request.run is not None else request.model_copy(update={"run": self._run})
        pinned = request.version if request.version is not None else (self.version if request.adapter else None)
        parts = [_one_prompt(request, i, pinned) for i in range(request.num_prompts)]
        with ThreadPoolExecutor(max_workers=len(parts)) as threads:
            answers = list(threads.map(self._rollout_part, parts))
        rollout_id = answers[0][1].rollout_id if len(answers) == 1 else uuid.uuid4().hex
        with self._lock:
            self._parts[rollout_id] = [(replica, answer.rollout_id) for replica, answer in answers]
            while len(self._parts) > RECENT_ROLLOUTS:
                self._parts.pop(next(iter(self._parts)))
        return RolloutResponse(
            rollout_id=rollout_id,
            adapter=request.adapter,
            policy_version=answers[0][1].policy_version,
            results=[answer.results[0] for _, answer in answers],
            created_at=min(answer.created_at for _, answer in answers),
        )

    def publish(self, adapter_dir: Path, version: int) -> None:
        """Serve `adapter_dir` (under the servers' adapter root) as version `version` from now on,
        on every replica (AdapterPublishError, and the previous version kept, if one refuses).

        Recorded before the loads are sent: a replica that fails during its load gets this version
        when it comes back.
        """
        previous = self._published
        self._published = _Published(adapter_dir, version, adapter_sha256(adapter_dir))
        self._rejoin_recovered()
        self.wake()
        took: list[_Replica] = []
        for replica in self._in_rotation():
            try:
                took.append(replica)
                self._load_published(replica)
            except (RolloutServerError, StaleAdapterError) as e:
                if isinstance(e, RolloutServerError) and _replica_lost(e):
                    took.remove(replica)
                    self._take_out(replica, e)
                    continue
                self._published = previous
                for other in took:
                    self._put_back(other, previous)
                raise AdapterPublishError(
                    f"{replica.url} did not take adapter version {version} ({e}); no replica serves it, "
                    f"they serve version {previous.version if previous else 0} as before"
                ) from e
        if not took:
            self._wait_for_a_replica()  # its re-sync loads this version
        if self._woken and not self._checked_after_wake:
            # A vLLM issue reported LoRA silently ignored after a level-1 wake: the first version
            # loaded into a woken server is checked once per run, as after a restart.
            for replica in took:
                self._check_canary(replica, f"after the run's first wake and the load of version {version}")
            self._checked_after_wake = True
        self._went_live.append(version)

    def follow(self, adapter_dir: Path, version: int) -> None:
        """Serve `adapter_dir` as version `version` from now on, as another learner process (rank 0
        under torchrun) has published it to every replica: nothing is loaded here. Rollouts are
        pinned to that version, and a replica re-synced later gets it, checked against the sha256
        of `adapter_dir` as read here (the ranks share the filesystem the adapters are on).

        Call it only once `publish` has returned in the process that published (a barrier): before,
        replicas would answer this link's pinned rollouts with 409 and leave its rotation.
        """
        self._published = _Published(adapter_dir, version, adapter_sha256(adapter_dir))
        self._went_live.append(version)

    def sleep(self) -> None:
        """Let the learner have the GPU; the servers wake by themselves after `sleep_lease_s`
        unless the learner wakes them first."""
        if self._cfg.sleep_server:
            self._on_every_replica(self._sleep)

    def wake(self) -> None:
        """Have the servers take the GPU back (no call to a server the learner did not put to sleep)."""
        self._on_every_replica(self._wake)

    def post_scores(self, rollout_id: str, scores: SampleScores | None, step: int) -> None:
        """Attach a step's scores (`Learned.sample_scores`) to its rollout in the sample logs of
        the replicas that made it.

        Diagnostics, not training: scores JSON cannot hold (None: an infinite reward or a
        non-finite advantage) are not sent, and a restarted server no longer has the rollout;
        either costs the log one record.
        """
        if scores is None:
            log.warning("step %d: non-finite rewards or advantages, not posted to the sample log", step)
            return
        with self._lock:
            parts = self._parts.pop(rollout_id, [])
        for i, (replica, part_id) in enumerate(parts):
            part_scores = scores if len(parts) == 1 else _one_prompt_scores(scores, i)
            try:
                replica.client.post_scores(part_id, part_scores)
            except RolloutServerError as e:
                if e.status_code not in (0, 404, 503):
                    raise
                log.warning("scores of rollout %s not recorded by %s: %s", part_id, replica.url, e.detail)

    def close(self) -> None:
        """Wake the servers the learner left asleep (normal exit, error or Ctrl-C); a server that
        cannot be reached is left to its lease. A rollout still in flight in another thread
        (learner.overlap) then fails rather than wait for a lost server to come back."""
        self._closed = True
        for replica in self._replicas:
            if not replica.awake:
                try:
                    replica.client.wake_up_on_exit()
                    replica.awake = True
                except RolloutServerError as e:
                    log.warning("could not wake %s on exit (its sleep lease will): %s", replica.url, e)

    # --- calls on replicas --------------------------------------------------------------------

    def _rollout_part(self, request: RolloutRequest) -> tuple[_Replica, RolloutResponse]:
        asked = request.version if request.adapter is not None else 0  # the base is version 0
        for _ in range(ATTEMPTS_PER_CALL + len(self._replicas)):
            replica = self._reserve_least_busy()
            try:
                return replica, self._call(
                    replica,
                    lambda c: c.generate(request, expected_version=asked),
                    fell_behind=request.version is not None,  # else a 409 is the request's own fault
                    asked=asked,
                )
            except _ReplicaLost:
                continue
            finally:
                with self._lock:
                    replica.in_flight -= 1
        raise RolloutServerError(0, "the rollout servers kept going away during one prompt's rollout")

    def _on_every_replica(self, call: Callable[[_Replica], None]) -> None:
        """`call` on every replica in rotation; lost ones are taken out, and with none left the
        learner waits for one to come back (re-synced: awake) and calls it there."""
        for _ in range(ATTEMPTS_PER_CALL):
            done = 0
            for replica in self._in_rotation():
                try:
                    self._call(replica, lambda _, replica=replica: call(replica))
                    done += 1
                except _ReplicaLost:
                    pass
            if done:
                return
            self._wait_for_a_replica()
        raise RolloutServerError(0, "the rollout servers kept going away")

    def _sleep(self, replica: _Replica) -> None:
        # Before the call: interrupted mid-call, the server may already sleep.
        replica.awake = False
        replica.client.sleep(level=1, lease_s=self._cfg.sleep_lease_s)

    def _wake(self, replica: _Replica) -> None:
        if not replica.awake:
            self._before_wake()
            replica.client.wake_up()
            self._woken = True
            replica.awake = True

    def _call(
        self,
        replica: _Replica,
        call: Callable[[RolloutClient], T],
        *,
        fell_behind: bool = True,
        asked: int | None = None,
    ) -> T:
        """`call(client)`; a lost replica is taken out of rotation (_ReplicaLost), as is one that
        answers 409 if `fell_behind` (a rollout pinned to a version it does not serve). A rollout
        of version `asked` answered 409 after the live version moved on raises RetiredVersionError."""
        try:
            return call(replica.client)
        except RolloutServerError as e:
            if e.status_code == 409 and asked is not None and asked != self.version:
                raise RetiredVersionError(
                    f"{replica.url} no longer serves version {asked}: version {self.version} replaced it"
                ) from e
            if not (_replica_lost(e) or (fell_behind and e.status_code == 409)):
                raise
            self._take_out(replica, e)
            raise _ReplicaLost from e

    def _in_rotation(self) -> list[_Replica]:
        with self._lock:
            return [r for r in self._replicas if r.in_rotation]

    def _reserve_least_busy(self) -> _Replica:
        """The replica in rotation with the fewest requests in flight, counted in flight from here
        (the caller releases it), so that concurrent choices spread; waits for one if none is."""
        while True:
            with self._lock:
                ready = [r for r in self._replicas if r.in_rotation]
                if ready:
                    replica = min(ready, key=lambda r: (r.in_flight, r.sent))
                    replica.in_flight += 1
                    replica.sent += 1
                    return replica
            self._wait_for_a_replica()

    def _take_out(self, replica: _Replica, error: Exception) -> None:
        with self._lock:
            was_in, replica.in_rotation = replica.in_rotation, False
        if was_in:
            log.warning("%s taken out of rotation: %s", replica.url, error)

    # --- recovery -----------------------------------------------------------------------------

    def _rejoin_recovered(self) -> None:
        """Re-sync and put back the replicas out of rotation that answer /health again (no wait)."""
        with self._recovering:
            for replica in self._replicas:
                if not replica.in_rotation and replica.client.is_healthy():
                    self._try_resync(replica)

    def _wait_for_a_replica(self) -> None:
        """Block until some replica is in rotation again, polling the others' /health with backoff
        (0.5 s doubling to 10 s) for at most `server_wait_s`."""
        with self._recovering:
            deadline, pause = time.monotonic() + self._cfg.server_wait_s, 0.5
            while not self._in_rotation():
                if self._closed:
                    raise RolloutServerError(0, "the learner closed its link to the rollout servers")
                lost = [r for r in self._replicas if not r.in_rotation]
                log.warning("no rollout server in rotation; waiting for %s", ", ".join(r.url for r in lost))
                for replica in lost:
                    if replica.client.is_healthy(timeout_s=10):
                        self._try_resync(replica)
                if self._in_rotation():
                    return
                if time.monotonic() + pause > deadline:
                    raise RolloutServerError(0, f"no rollout server came back within {self._cfg.server_wait_s:.0f} s")
                time.sleep(pause)
                pause = min(2 * pause, 10.0)

    def _try_resync(self, replica: _Replica) -> None:
        try:
            self._resync(replica)
        except RolloutServerError as e:
            if not _replica_lost(e):
                raise
            log.warning("%s answers /health but could not be re-synced yet: %s", replica.url, e)

    def _resync(self, replica: _Replica) -> None:
        """Make a replica serve what this learner expects (awake, the live version under the
        learner's number and hash, sampling as the learner scores), then put it in rotation."""
        client = replica.client
        client.wake_up()
        replica.awake = True
        replica.shares_root = None  # restarted: perhaps with another adapter root
        if self._published:
            live = self._published
            card = client.served(self._cfg.adapter_name)
            if card is None or (card.version, card.sha256) != (live.version, live.sha256):
                self._load_published(replica)
            self._check_canary(replica, f"after re-loading version {live.version}")
        with self._lock:
            replica.in_rotation = True

    def _check_canary(self, replica: _Replica, when: str) -> None:
        """StaleAdapterError unless `replica` samples the live version as the learner scores it."""
        live = self._published
        gap = self._canary(replica.client, self.adapter, live.version)
        if not gap <= self._cfg.canary_tolerance:
            raise StaleAdapterError(
                f"{when}, {replica.url}'s log-probabilities differ from the learner's by {gap:.4f} nats per "
                f"token (tolerance {self._cfg.canary_tolerance}): it does not sample from the learner's policy "
                "(another base model or dtype? on CUDA, VLLM_USE_V2_MODEL_RUNNER=0 is vLLM's other runner)"
            )
        log.info("%s: %s serves version %d (canary gap %.2e nats per token)", when, replica.url, live.version, gap)

    def _load_published(self, replica: _Replica) -> None:
        live = self._published
        path = self._lora_path(replica, live)
        loaded = replica.client.load_adapter(self._cfg.adapter_name, path, version=live.version)
        if (loaded.version, loaded.sha256) != (live.version, live.sha256):
            raise StaleAdapterError(
                f"{replica.url} loaded {self._cfg.adapter_name!r} as version {loaded.version} with sha256 "
                f"{loaded.sha256[:12]}, not version {live.version} with sha256 {live.sha256[:12]} "
                f"(its adapter root is not this run's {live.adapter_dir.parent}? --adapter-transfer upload "
                "sends each version over HTTP)"
            )

    def _lora_path(self, replica: _Replica, published: _Published) -> str:
        """Where `replica` finds `published`'s files (`LearnerConfig.adapter_transfer`): its
        directory's name, under an adapter root shared with the learner, or, sent over HTTP,
        uploads/<sha256>. In auto, whether the root is shared is asked once per server start: the
        server's hash of the version's directory name is the learner's."""
        name = published.adapter_dir.name
        transfer = self._cfg.adapter_transfer
        if transfer == "auto" and replica.shares_root is None:
            replica.shares_root = replica.client.adapter_digest(name) == published.sha256
            how = "reads them from its adapter root" if replica.shares_root else "gets them over HTTP (upload)"
            log.info(
                "%s does%s share %s: it %s",
                replica.url,
                "" if replica.shares_root else " not",
                published.adapter_dir.parent,
                how,
            )
        if transfer == "shared" or (transfer == "auto" and replica.shares_root):
            return name
        return replica.client.upload_adapter(published.adapter_dir, published.sha256).lora_path

    def _put_back(self, replica: _Replica, previous: _Published | None) -> None:
        """After a failed publish: back to the previous version (or to no adapter), or out of
        rotation (re-synced later) if even that fails."""
        try:
            if previous is None:
                replica.client.unload_adapter(self._cfg.adapter_name)
            else:
                path = self._lora_path(replica, previous)
                replica.client.load_adapter(self._cfg.adapter_name, path, version=previous.version)
        except RolloutServerError as e:
            self._take_out(replica, e)


def _replica_lost(error: RolloutServerError) -> bool:
    """No answer at all, or 503 (a dead engine, or a sleep nobody here asked for)."""
    return error.status_code in (0, 503)


def _one_prompt(request: RolloutRequest, i: int, version: int | None) -> RolloutRequest:
    """Prompt i of `request` alone, with the seeds it has in the whole request, pinned to `version`."""
    return request.model_copy(
        update={
            "prompts": None if request.prompts is None else [request.prompts[i]],
            "prompt_token_ids": None if request.prompt_token_ids is None else [request.prompt_token_ids[i]],
            "seed": None if request.seed is None else request.seed + i * request.n,
            "version": version,
        }
    )


def _one_prompt_scores(scores: SampleScores, i: int) -> SampleScores:
    return scores.model_copy(
        update={
            "rewards": [scores.rewards[i]],
            "advantages": [scores.advantages[i]],
            "components": {name: [values[i]] for name, values in scores.components.items()},
            "answers": None if scores.answers is None else [scores.answers[i]],
        }
    )


def logprob_canary(
    client: RolloutClient,
    adapter: str | None,
    version: int,
    *,
    policy: PeftModel,
    prompt_ids: list[int],
    cfg: LearnerConfig,
    pad_id: int,
) -> float:
    """Mean |server - learner| log-probability of one seeded completion of `prompt_ids`, sampled
    by the server from `adapter` at `version` and scored by the learner's policy at the sampling
    temperature. Float32 on CPU measures ~1e-6; a wrong adapter or base measures whole nats."""
    request = RolloutRequest(
        prompt_token_ids=[prompt_ids],
        n=1,
        max_tokens=min(16, cfg.sampling.max_tokens),
        temperature=cfg.sampling.temperature,
        seed=0,
        adapter=adapter,
        run=run_name(cfg.output_dir),
        kind="canary",
    )
    completion = client.generate(request, expected_version=version).results[0].completions[0]
    if not completion.token_ids:
        return 0.0
    with torch.no_grad():
        learner_1_T = scored_logprobs(
            policy,
            [TokenSequence.continuation(prompt_ids, completion.token_ids)],
            temperature=cfg.sampling.temperature,
            chunk_size=cfg.logprob_chunk_size,
            pad_id=pad_id,
        )
    server_T = torch.tensor(completion.logprobs, dtype=torch.float32)
    return (learner_1_T[0, : len(server_T)].float().cpu() - server_T).abs().mean().item()
