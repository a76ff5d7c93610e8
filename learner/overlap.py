"""Where each step's rollout comes from: sampled when the step starts, or one step ahead (overlap).

Synchronous (the default): step t's prompts are sampled from the version step t-1 published, and
the policy trains on its own samples (staleness 0).

One step off (`cfg.overlap`): as soon as step t's rollout is in, step t+1's prompts go to the
servers, pinned to the version they serve then, and are sampled while step t scores, updates and
publishes. Step t+1 then trains on samples one version older than its policy (staleness 1: one
publish per step, so never more), and grpo_loss's importance weights against the sampler's
log-probabilities correct for the difference as they correct for the sampler's own (`is_weight`,
`is_weight_p99` in the metrics; LearnerConfig refuses them unbounded). A rollout a server refused
because its version was replaced while it was in flight (RetiredVersionError: a prompt retried on
another replica after the publish) is dropped, its completions counted (`stale_dropped`), and its
prompts sampled again from the live version.

The gain needs servers that do not share the learner's device: on one GPU the server sleeps while
the learner trains (sleep_server), so there is nothing to overlap, and LearnerConfig refuses both.

Checkpoints take the prompt sampler's position as of the last step taken (`state_dict`), not of
the batch in flight, and the version that batch was pinned to (`ahead_version`): a resumed run
samples that batch again, from that version (`sample_ahead`, learner.loop), as the run it resumes
did, so it trains on the same samples. It differs only where that run dropped the rollout after
the checkpoint (a RetiredVersionError) and sampled it again from the next version.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from learner.distributed import Distributed
from learner.prompts import PromptEncoder, PromptSampler, Row
from learner.server_link import ServerLink
from shared.config import LearnerConfig
from shared.errors import RetiredVersionError
from shared.schemas import RolloutRequest, RolloutResponse

log = logging.getLogger("grpo-learner")


@dataclass(frozen=True)
class Sampled:
    """A step's prompts (this rank's share of them) and their completions."""

    rows: list[Row]
    prompt_ids_P: list[list[int]]
    rollout: RolloutResponse
    staleness: int
    """Versions between the one that sampled `rollout` and the policy it trains (0: on-policy)."""
    stale_dropped: int
    """Completions asked for this step ahead and dropped: their version was replaced while in flight."""


@dataclass(frozen=True)
class _Batch:
    step: int
    rows: list[Row]
    prompt_ids_P: list[list[int]]
    sampler_state: dict
    """The prompt sampler's state right after this batch was drawn (what a checkpoint keeps)."""


@dataclass(frozen=True)
class _Ahead:
    batch: _Batch
    version: int
    """The version its request is pinned to (0: the base)."""
    rollout: Future[RolloutResponse]


class Rollouts:
    """Each step's rollout, from `server`, of the next batch of `prompts` (this rank's share)."""

    def __init__(
        self,
        server: ServerLink,
        prompts: PromptSampler,
        encode: PromptEncoder,
        cfg: LearnerConfig,
        ranks: Distributed = Distributed(),
    ) -> None:
        self._server, self._prompts, self._encode, self._cfg, self._ranks = server, prompts, encode, cfg, ranks
        self._state = prompts.state_dict()
        self._ahead: _Ahead | None = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout-ahead") if cfg.overlap else None

    def take(self, step: int) -> Sampled:
        """Step `step`'s prompts and completions; with overlap, asks for step + 1's before returning."""
        batch, rollout, dropped = self._next(step), None, 0
        if self._ahead is not None:
            rollout, dropped = self._unless_retired(batch, self._ahead.rollout)
            self._ahead = None
        if rollout is None:
            rollout = self._server.rollout(self._request(batch))
        self._state = batch.sampler_state
        if self._thread is not None and step < self._cfg.steps:
            self._ask_ahead(step + 1)
        lag = self._server.versions_since(rollout.policy_version)
        assert lag <= 1, f"step {step} sampled {lag} versions behind its policy: one publish per step allows 1"
        return Sampled(batch.rows, batch.prompt_ids_P, rollout, lag, dropped)

    def sample_ahead(self, step: int) -> None:
        """Sample step `step`'s prompts now, from the version live now, as if asked for ahead: a run
        resumed with overlap samples the step the run it resumes had in flight at its checkpoint,
        from the version that run sampled it from (learner.loop). Returns once they are sampled,
        before another version goes live and retires this one."""
        self._ask_ahead(step).result()

    @property
    def ahead_version(self) -> int | None:
        """The version the rollout asked for ahead is pinned to (0: the base); None: none is."""
        return None if self._ahead is None else self._ahead.version

    def state_dict(self) -> dict:
        """The prompt sampler's state after the last step taken (PromptSampler.state_dict): a run
        resumed from it samples the batch in flight again."""
        return self._state

    def close(self) -> None:
        """Leave a rollout still in flight (a run that stopped early) to end with the link it uses:
        ServerLink.close makes its calls fail instead of waiting for servers."""
        if self._thread is not None:
            self._thread.shutdown(wait=False, cancel_futures=True)

    def _unless_retired(self, batch: _Batch, ahead: Future[RolloutResponse]) -> tuple[RolloutResponse | None, int]:
        """The rollout of `batch` asked for ahead, and 0; or None (ask again) and how many
        completions were dropped: its version was replaced while it was in flight."""
        try:
            return ahead.result(), 0
        except RetiredVersionError as e:
            log.warning("step %d: the rollout asked for ahead is dropped and asked for again: %s", batch.step, e)
            return None, len(batch.rows) * self._cfg.sampling.n

    def _ask_ahead(self, step: int) -> Future[RolloutResponse]:
        """Draw step `step`'s batch and ask for its rollout in the background, pinned to the live version."""
        batch = self._draw(step)
        request = self._request(batch)
        version = request.version if request.adapter is not None else 0
        self._ahead = _Ahead(batch, version, self._thread.submit(self._server.rollout, request))
        return self._ahead.rollout

    def _next(self, step: int) -> _Batch:
        if self._ahead is None:
            return self._draw(step)
        assert self._ahead.batch.step == step, f"step {step} taken, step {self._ahead.batch.step} asked for ahead"
        return self._ahead.batch

    def _draw(self, step: int) -> _Batch:
        rows = self._ranks.shard(self._prompts.next_batch())  # the same batches on every rank
        return _Batch(step, rows, [self._encode.prompt(row) for row in rows], self._prompts.state_dict())

    def _request(self, batch: _Batch) -> RolloutRequest:
        """The batch's request, pinned now to the version live now (the base: unpinned)."""
        first = self._ranks.rank * len(batch.rows)  # the shard's first prompt in the step: its seeds
        request = self._encode.rollout_request(batch.prompt_ids_P, self._server.adapter, batch.step, first_prompt=first)
        return self._server.pinned(request)
