"""From a rollout to an updated policy: rewards, group-normalized advantages, one policy update.

Unsupervised rewards are the policy's own log-probabilities of the completions at temperature 1.
When they are the whole reward (no other `reward_funcs`), the update computes exactly those (it
samples at temperature 1 and nothing in the model drops out) and every micro-batch holds whole
groups, the rewards are read from the update's forward and the advantages follow within the
micro-batch, before its loss: two forwards per micro-batch (reference, policy) instead of three.
The rewards come from detached log-probabilities, so no gradient flows through them, and the loss
is the one the two-pass path computes (the loss is linear in the advantages, and they are the same
numbers). Any other reward is computed whole before the update (`reward_funcs.score`).

The reference pass stays a forward of its own: peft mixes adapters in one batch only in eval mode
(which would turn off gradient checkpointing), and the reference rows' activations would be kept
for backward.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from peft import PeftModel
from torch import Tensor

from learner import reward_funcs, scoring
from learner.advantages import group_normalize
from learner.distributed import Distributed
from learner.prompts import Row
from learner.reward_funcs import RewardFunc
from learner.update import UpdateStats, policy_update
from shared.config import LearnerConfig
from shared.schemas import Completion, SampleScores


@dataclass(frozen=True)
class Learned:
    rewards_P_G: Tensor
    advantages_P_G: Tensor
    stats: UpdateStats
    score_s: float
    """Seconds spent scoring in passes of its own (0 when the rewards came from the update's forward)."""
    components_P_G: dict[str, Tensor] = field(default_factory=dict)
    """Each reward function's own rewards (before weighting), by name; NaN where one did not apply.
    Empty when the reward is a single built-in function at weight 1 (then it is `rewards_P_G`)."""

    def sample_scores(self, step: int, answers: list[str | None] | None = None) -> SampleScores | None:
        """The scores as the server's sample log and the samples files keep them: NaN (did not
        apply, unscorable) as None, with each prompt's expected answer (supervised rows). None when
        a reward is infinite or an advantage is not finite (a reward function or the model blew
        up), which JSON cannot hold."""
        values = [self.rewards_P_G, *self.components_P_G.values()]
        if any(v.isinf().any() for v in values) or not self.advantages_P_G.isfinite().all():
            return None
        return SampleScores(
            rewards=_none_for_nan(self.rewards_P_G),
            advantages=self.advantages_P_G.tolist(),
            step=step,
            answers=answers,
            components={name: _none_for_nan(values_P_G) for name, values_P_G in self.components_P_G.items()},
        )


def _none_for_nan(values_P_G: Tensor) -> list[list[float | None]]:
    return [[None if math.isnan(v) else v for v in row] for row in values_P_G.tolist()]


def rewards_come_from_the_update(policy: PeftModel, cfg: LearnerConfig, group_size: int) -> bool:
    """Whether the update's forward computes the rewards' log-probabilities, in micro-batches of
    whole groups (see the module docstring): the reward is the unsupervised one alone, and each
    group's advantages need only its own rewards (not scale_rewards "batch")."""
    return (
        cfg.mode == "unsupervised"
        and reward_funcs.is_the_mode_reward(cfg)
        and cfg.sampling.temperature == 1.0
        and cfg.micro_batch_size % group_size == 0
        and cfg.scale_rewards != "batch"
        and not _drops_out(policy)
    )


def learn_from(
    policy: PeftModel,
    optimizer: torch.optim.Optimizer,
    prompt_ids_P: list[list[int]],
    completions_P_G: list[list[Completion]],
    text_ids_P_G: list[list[list[int]]],
    answer_ids_P: list[list[int]] | None,
    cfg: LearnerConfig,
    *,
    pad_id: int,
    reward_fns: list[RewardFunc],
    rows_P: list[Row],
    decode: Callable[[list[int]], str],
    step: int,
    ranks: Distributed = Distributed(),
) -> Learned:
    """Score the completions (`text_ids_P_G`: their tokens without end-of-sequence), normalize
    within groups, and update the policy on every sampled token.

    The reward is the weighted sum of `reward_fns` (`reward_funcs.score`; Python functions get
    the prompts and columns of `rows_P` and the completions' text by `decode`). Every reward is
    computed before the update: a reward function that fails (RewardFunctionError, naming it and
    `step`) leaves the policy and the optimizer as they were.

    Under torchrun the prompts are this rank's shard (`ranks`, see learner.update.policy_update):
    rewards and advantages are of its own groups; the update and its figures are the whole step's.
    """
    P, G = len(completions_P_G), len(completions_P_G[0])
    prompt_ids_N = [prompt_ids_P[p] for p in range(P) for _ in range(G)]
    completion_ids_N = [c.token_ids for group in completions_P_G for c in group]
    sampler_logprobs_N = [c.logprobs for group in completions_P_G for c in group]

    def update(advantages):
        return policy_update(
            policy,
            optimizer,
            prompt_ids_N,
            completion_ids_N,
            sampler_logprobs_N,
            advantages,
            cfg,
            pad_id=pad_id,
            ranks=ranks,
        )

    if rewards_come_from_the_update(policy, cfg, G):
        text_ids_N = [t for group in text_ids_P_G for t in group]
        rewards_N = torch.full((P * G,), torch.nan)
        advantages_N = torch.full((P * G,), torch.nan)

        def advantages_for(part: slice, logprobs_B_T: Tensor, mask_B_T: Tensor) -> Tensor:
            text_lens_B = torch.tensor([len(t) for t in text_ids_N[part]])
            text_mask_B_T = mask_B_T.cpu() & (torch.arange(mask_B_T.shape[1])[None, :] < text_lens_B[:, None])
            keys_B = [(tuple(p), tuple(t)) for p, t in zip(prompt_ids_N[part], text_ids_N[part], strict=True)]
            rewards_b_G = scoring.rewards_from_policy_logprobs(logprobs_B_T.cpu(), text_mask_B_T, keys_B, G, cfg)
            rewards_N[part] = rewards_b_G.flatten()
            advantages_N[part] = _normalize(rewards_b_G, cfg).flatten()
            return advantages_N[part]

        stats = update(advantages_for)
        if not rewards_N.isnan().any():
            return Learned(rewards_N.view(P, G), advantages_N.view(P, G), stats, score_s=0.0)
        # A non-finite loss stopped the update before its last micro-batches: score them all
        # for the record (no step was taken).
        start = time.perf_counter()
        rewards_P_G = scoring.score(policy, prompt_ids_P, text_ids_P_G, answer_ids_P, cfg, pad_id=pad_id)
        return Learned(rewards_P_G, _normalize(rewards_P_G, cfg), stats, score_s=time.perf_counter() - start)

    start = time.perf_counter()
    rewards_P_G, components_P_G = reward_funcs.score(
        reward_fns,
        policy,
        prompt_ids_P,
        completions_P_G,
        text_ids_P_G,
        answer_ids_P,
        rows_P,
        decode,
        cfg,
        pad_id=pad_id,
        step=step,
        global_step=step - 1,  # the updates done before this step's (TRL's trainer_state.global_step)
    )
    advantages_P_G = _normalize(rewards_P_G, cfg, ranks)
    score_s = time.perf_counter() - start
    return Learned(rewards_P_G, advantages_P_G, update(advantages_P_G.flatten()), score_s, components_P_G)


def _normalize(rewards_P_G: Tensor, cfg: LearnerConfig, ranks: Distributed = Distributed()) -> Tensor:
    """Advantages of this rank's groups. With scale_rewards "batch" the std is the whole step's:
    every rank's rewards are gathered (one collective, on every rank; the shards are equal and in
    rank order), normalized together, and this rank's rows taken back."""
    if cfg.scale_rewards != "batch":
        return group_normalize(rewards_P_G, eps=cfg.advantage_eps, scale_rewards=cfg.scale_rewards)
    P, G = rewards_P_G.shape
    step_P_G = ranks.gather(rewards_P_G.flatten()).view(-1, G)
    advantages_P_G = group_normalize(step_P_G, eps=cfg.advantage_eps, scale_rewards="batch")
    return advantages_P_G[ranks.rank * P : (ranks.rank + 1) * P]


def _drops_out(policy: PeftModel) -> bool:
    """Whether a training-mode forward of `policy` differs from an eval-mode one: a dropout module
    with p > 0 (LoRA's included) or a non-zero dropout rate in the model's config (attention
    dropout is applied functionally)."""
    modules = any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in policy.modules())
    config = policy.get_base_model().config.to_dict()
    rates = any("dropout" in k and isinstance(v, float) and v > 0 for k, v in config.items())
    return modules or rates
