"""Rewards of sampled completions, computed under the current policy without gradients.

Completion tokens reach here without their trailing end-of-sequence token: a reward judges the
text, and "the completion is empty" must mean no text (the policy update, in contrast, trains
every sampled token, end-of-sequence included).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Literal

import torch
from peft import PeftModel
from torch import Tensor

from learner.logprobs import Sequence, micro_batched_logprobs
from learner.rewards import (
    answer_perplexity_rewards,
    completion_cross_entropy_rewards,
    floor_empty_rewards,
    unsupervised_rewards,
)
from shared.config import LearnerConfig

Builtin = Literal["completion_log_likelihood", "answer_perplexity", "completion_cross_entropy"]
UNSUPERVISED_REWARD: Builtin = "completion_log_likelihood"
"""Minus the completion's mean NLL per token (`unsupervised_rewards`): unsupervised mode's reward."""


def mode_reward(cfg: LearnerConfig) -> Builtin:
    """The built-in reward of `cfg`'s mode, the reward when no `reward_funcs` are configured."""
    return UNSUPERVISED_REWARD if cfg.mode == "unsupervised" else cfg.reward


def score(
    model: PeftModel,
    prompt_ids_P: list[list[int]],
    completion_ids_P_G: list[list[list[int]]],
    answer_ids_P: list[list[int]] | None,
    cfg: LearnerConfig,
    *,
    pad_id: int,
    reward: Builtin | None = None,
) -> Tensor:
    """rewards_P_G of every completion (text tokens only) under the policy, at temperature 1, by the
    built-in `reward` (None: the mode's, `mode_reward`).

    Each distinct (prompt, answer, completion) is scored once and its reward copied to every
    duplicate: equal completions then share one reward exactly, whichever micro-batch (and so
    padding, kernel and rounding) they would have fallen in, and std scaling cannot turn that
    rounding into advantages. Under completion_log_likelihood an empty completion scores just
    below its group's worst non-empty one (`floor_empty_rewards`).
    """
    reward = reward or mode_reward(cfg)
    P, G = len(completion_ids_P_G), len(completion_ids_P_G[0])
    all_N = [(p, c) for p in range(P) for c in completion_ids_P_G[p]]
    answer_key_P = [None] * P if answer_ids_P is None else [tuple(a) for a in answer_ids_P]
    first_U, inverse_N = _distinct([(tuple(prompt_ids_P[p]), answer_key_P[p], tuple(c)) for p, c in all_N])
    distinct_U = [all_N[i] for i in first_U]
    if reward == UNSUPERVISED_REWARD:
        sequences = [Sequence.continuation(prompt_ids_P[p], c) for p, c in distinct_U]
    else:
        assert answer_ids_P is not None, f"{reward} needs the answers"
        if reward == "answer_perplexity":
            # prompt ++ completion ++ answer, scored on the answer only.
            sequences = [Sequence.continuation(prompt_ids_P[p] + c, answer_ids_P[p]) for p, c in distinct_U]
        else:
            # prompt ++ completion; the logits that predicted completion token t score answer token t.
            sequences = [Sequence.aligned(prompt_ids_P[p], c, answer_ids_P[p]) for p, c in distinct_U]
    logprobs_U_T, mask_U_T = micro_batched_logprobs(
        model,
        sequences,
        temperature=1.0,
        chunk_size=cfg.logprob_chunk_size,
        pad_id=pad_id,
        micro_batch_size=cfg.micro_batch_size,
    )
    nll_U_T = -logprobs_U_T
    if reward == UNSUPERVISED_REWARD:
        rewards_U = unsupervised_rewards(nll_U_T, mask_U_T, empty_reward=cfg.empty_completion_reward)
    else:
        answer_lens_U = torch.tensor([len(answer_ids_P[p]) for p, _ in distinct_U])
        if reward == "answer_perplexity":
            completion_lens_U = torch.tensor([len(c) for _, c in distinct_U])
            rewards_U = answer_perplexity_rewards(
                nll_U_T, mask_U_T, completion_lens_U, answer_lens_U, score=cfg.answer_score
            )
        else:
            rewards_U = completion_cross_entropy_rewards(nll_U_T, mask_U_T, answer_lens_U, score=cfg.answer_score)
    rewards_P_G = rewards_U[inverse_N].view(P, G)
    if reward == UNSUPERVISED_REWARD:
        empty_P_G = torch.tensor([[not c for c in group] for group in completion_ids_P_G], dtype=torch.bool)
        rewards_P_G = floor_empty_rewards(rewards_P_G, empty_P_G, margin=cfg.empty_completion_margin)
    return rewards_P_G


def rewards_from_policy_logprobs(
    logprobs_N_T: Tensor, text_mask_N_T: Tensor, keys_N: list[Hashable], group_size: int, cfg: LearnerConfig
) -> Tensor:
    """Unsupervised rewards_P_G of N = P * G completions, from the policy's log-probabilities of
    their tokens at temperature 1 (text tokens where `text_mask_N_T`): what `score` computes, read
    from a forward that already ran (the update's). Completions with equal keys share the first
    one's reward exactly, as in `score`."""
    first_U, inverse_N = _distinct(keys_N)
    rewards_N = unsupervised_rewards(-logprobs_N_T, text_mask_N_T, empty_reward=cfg.empty_completion_reward)
    rewards_P_G = rewards_N[first_U][inverse_N].view(-1, group_size)
    empty_P_G = ~text_mask_N_T.any(dim=1).view(-1, group_size)
    return floor_empty_rewards(rewards_P_G, empty_P_G, margin=cfg.empty_completion_margin)


def _distinct(keys_N: list[Hashable]) -> tuple[list[int], Tensor]:
    """Positions of the first occurrence of each distinct key, and for every key the index of its
    distinct key among those: keys_N[i] == keys_N[first_U[inverse_N[i]]]."""
    slot_of: dict[Hashable, int] = {}
    first_U: list[int] = []
    inverse_N = []
    for i, key in enumerate(keys_N):
        if key not in slot_of:
            slot_of[key] = len(first_U)
            first_U.append(i)
        inverse_N.append(slot_of[key])
    return first_U, torch.tensor(inverse_N, dtype=torch.long)
