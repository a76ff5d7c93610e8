"""The learner's link to its rollout server, across the server's restarts.

The loop asks for rollouts, sleeps and wakes the server, and publishes adapter versions; this
module makes each of those survive a server that went away: it waits (bounded backoff, long
enough for a cold start) until a server answers /health again, puts back what the learner had
published (the same adapter directory under the learner's version number), checks that the
server now samples from the learner's policy (the version stamp, and a log-probability canary),
and retries the call. Nothing the loop has done is repeated or lost: a step's rollout is retried
before it is scored, and the version saved before a failure is the one put back.

Sleeps carry a lease, so a learner that dies while the server sleeps does not strand it, and
`close()` wakes the server on every exit the process lives through.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from peft import PeftModel

from learner.logprobs import Sequence, scored_logprobs
from learner.rollout_client import RolloutClient
from shared.config import LearnerConfig
from shared.errors import RolloutServerError, StaleAdapterError
from shared.schemas import RolloutRequest, RolloutResponse, SampleScores

log = logging.getLogger("grpo-learner")
T = TypeVar("T")
Canary = Callable[[RolloutClient, str | None, int], float]

RECONNECTS_PER_CALL = 3


class ServerLink:
    """Rollouts, sleep/wake and adapter versions, re-established whenever the server restarts."""

    def __init__(self, client: RolloutClient, cfg: LearnerConfig, canary: Canary) -> None:
        """`canary(client, adapter, version)` measures how far the server's log-probabilities of
        that version are from the learner's (`logprob_canary`)."""
        self._client = client
        self._cfg = cfg
        self._canary = canary
        self._published: tuple[Path, int] | None = None  # the adapter directory and version to serve
        self._awake = True

    @property
    def adapter(self) -> str | None:
        """The adapter rollouts sample from: None (the base) until a version is published."""
        return self._cfg.adapter_name if self._published else None

    @property
    def version(self) -> int:
        """The version rollouts must be stamped with (0: the base model)."""
        return self._published[1] if self._published else 0

    def rollout(self, request: RolloutRequest) -> RolloutResponse:
        """The server's completions, from the published version (StaleAdapterError if another)."""
        self.wake()
        return self._reconnecting(lambda: self._client.generate(request, expected_version=self.version))

    def publish(self, adapter_dir: Path, version: int) -> None:
        """Serve `adapter_dir` (under the server's adapter root) as version `version` from now on.

        Recorded before the load is sent: should the server fail during it, the version put back
        on the next server is this one.
        """
        self._published = (adapter_dir, version)
        self.wake()
        self._reconnecting(self._load_published)

    def sleep(self) -> None:
        """Let the learner have the GPU; the server wakes by itself after `sleep_lease_s` unless
        the learner wakes it first."""
        if self._cfg.sleep_server:
            self._reconnecting(self._sleep_once)

    def wake(self) -> None:
        """Have the server take the GPU back (no call if the learner never put it to sleep)."""
        if not self._awake:
            self._reconnecting(self._client.wake_up)
            self._awake = True

    def post_scores(self, rollout_id: str, scores: SampleScores | None, step: int) -> None:
        """Attach a step's scores (`Learned.sample_scores`) to its rollout in the server's sample log.

        Diagnostics, not training: scores JSON cannot hold (None: an infinite reward or a
        non-finite advantage) are not sent, and a restarted server no longer has the rollout;
        either costs the log one record.
        """
        if scores is None:
            log.warning("step %d: non-finite rewards or advantages, not posted to the sample log", step)
            return
        try:
            self._client.post_scores(rollout_id, scores)
        except RolloutServerError as e:
            if e.status_code not in (0, 404, 503):
                raise
            log.warning("scores of rollout %s not recorded: %s", rollout_id, e.detail)

    def close(self) -> None:
        """Wake the server if the learner left it asleep (normal exit, error or Ctrl-C); a server
        that cannot be reached is left to its lease."""
        if not self._awake:
            try:
                self._client.wake_up_on_exit()
                self._awake = True
            except RolloutServerError as e:
                log.warning("could not wake the rollout server on exit (its sleep lease will): %s", e)

    # --- recovery -----------------------------------------------------------------------------

    def _reconnecting(self, call: Callable[[], T]) -> T:
        for attempt in range(RECONNECTS_PER_CALL + 1):
            try:
                return call()
            except RolloutServerError as e:
                if not _server_gone(e) or attempt == RECONNECTS_PER_CALL:
                    raise
                log.warning("the rollout server went away (%s); waiting for it", e.detail)
                self._resync()
        raise AssertionError("unreachable")

    def _resync(self) -> None:
        """Wait for a server, then make it serve what this learner expects: awake, the published
        version under the learner's number, sampling as the learner scores."""
        self._client.wait_healthy(self._cfg.server_wait_s)
        self._client.wake_up()
        self._awake = True
        if self._published and self._client.served_version(self._cfg.adapter_name) != self.version:
            self._load_published()
            gap = self._canary(self._client, self.adapter, self.version)
            if not gap <= self._cfg.canary_tolerance:
                raise StaleAdapterError(
                    f"after re-loading version {self.version}, the server's log-probabilities differ from the "
                    f"learner's by {gap:.4f} nats per token (tolerance {self._cfg.canary_tolerance}): it does not "
                    "sample from the learner's policy (another base model or dtype?)"
                )
            log.info("the server serves version %d again (canary gap %.2e nats per token)", self.version, gap)

    def _sleep_once(self) -> None:
        # Before each try: interrupted mid-call, the server may already sleep; and a try after a
        # recovery (which wakes the server) must not leave the link believing it awake.
        self._awake = False
        self._client.sleep(level=1, lease_s=self._cfg.sleep_lease_s)

    def _load_published(self) -> None:
        adapter_dir, version = self._published
        loaded = self._client.load_adapter(self._cfg.adapter_name, adapter_dir.name, version=version).version
        if loaded != version or self._client.served_version(self._cfg.adapter_name) != version:
            raise StaleAdapterError(
                f"the server does not serve {self._cfg.adapter_name!r} version {version} after loading it"
            )


def _server_gone(error: RolloutServerError) -> bool:
    """No answer at all, or 503 (a dead engine, or a sleep nobody here asked for)."""
    return error.status_code in (0, 503)


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
    )
    completion = client.generate(request, expected_version=version).results[0].completions[0]
    if not completion.token_ids:
        return 0.0
    with torch.no_grad():
        learner_1_T = scored_logprobs(
            policy,
            [Sequence.continuation(prompt_ids, completion.token_ids)],
            temperature=cfg.sampling.temperature,
            chunk_size=cfg.logprob_chunk_size,
            pad_id=pad_id,
        )
    server_T = torch.tensor(completion.logprobs, dtype=torch.float32)
    return (learner_1_T[0, : len(server_T)].float().cpu() - server_T).abs().mean().item()
