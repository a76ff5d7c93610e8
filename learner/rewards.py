"""Rewards from per-token negative log-likelihoods (nats). Pure tensor functions, no model.

The learner's scorer runs the model and hands over per-token NLLs [N, T] with bool masks [N, T];
these functions only turn them into one reward per completion, rewards_N.

Why not the design's literal `reward = -loss * coverage` for supervised mode: the loss (an NLL)
is >= 0 and coverage is <= 1, so the product is <= 0 and is largest, 0, at coverage 0. It rewards
shorter completions and makes the empty completion the best one. We score token probabilities
instead (RLPR, arXiv 2506.18254): p_j = exp(-nll_j) lies in [0, 1], so a reward built from them
times coverage is in [0, 1], grows with coverage and shrinks as the NLLs grow; the empty completion
scores 0, the minimum.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Score = Literal["arithmetic", "geometric"]


def _check(values_N_T: Tensor, mask_N_T: Tensor) -> None:
    assert values_N_T.dim() == 2, f"values must be [N, T], got {tuple(values_N_T.shape)}"
    assert values_N_T.shape == mask_N_T.shape, (
        f"values {tuple(values_N_T.shape)} and mask {tuple(mask_N_T.shape)} differ"
    )
    assert mask_N_T.dtype == torch.bool, f"mask must be bool, got {mask_N_T.dtype}"


def _masked_sum_and_count(values_N_T: Tensor, mask_N_T: Tensor) -> tuple[Tensor, Tensor]:
    # where, not multiply: padding may hold inf or NaN, and inf * 0 is NaN.
    sum_N = torch.where(mask_N_T, values_N_T, 0.0).sum(dim=1)
    count_N = mask_N_T.sum(dim=1).to(values_N_T.dtype)
    return sum_N, count_N


def unsupervised_rewards(completion_nll_N_T: Tensor, completion_mask_N_T: Tensor, *, empty_reward: float) -> Tensor:
    """Reward = minus the mean NLL of the completion's own tokens (its log-likelihood per token).

    A row with no completion token has no mean to take; it gets `empty_reward`, never 0 (which
    would make the empty completion the best possible one) and never NaN.

    Args:
        completion_nll_N_T: Per-token NLL of each completion token, in nats.
        completion_mask_N_T: True at completion tokens.
        empty_reward: Reward of a row with no completion token.

    Returns:
        rewards_N.
    """
    _check(completion_nll_N_T, completion_mask_N_T)
    sum_N, count_N = _masked_sum_and_count(completion_nll_N_T, completion_mask_N_T)
    mean_nll_N = sum_N / count_N.clamp(min=1)
    return torch.where(count_N > 0, -mean_nll_N, empty_reward)


def floor_empty_rewards(rewards_P_G: Tensor, empty_P_G: Tensor, *, margin: float) -> Tensor:
    """Give each empty completion its group's worst non-empty reward minus `margin`.

    An empty completion has no NLL to average, and a fixed low reward for it (-20 nats/token
    against typical -2..-4) is an outlier that inflates the group's std and shrinks every other
    completion's advantage several-fold. Placed just below the group's worst text, it still ranks
    last without dominating the spread. A group with no non-empty completion keeps its rewards
    (the caller gives them one value, hence zero advantage).

    Args:
        rewards_P_G: Rewards, one row per prompt; the values at empty completions are ignored.
        empty_P_G: Bool, True at completions with no text token.
        margin: How far below the worst non-empty reward of its group an empty one scores.

    Returns:
        rewards_P_G with the empty completions of mixed groups replaced.
    """
    assert rewards_P_G.dim() == 2, f"rewards must be [P, G], got {tuple(rewards_P_G.shape)}"
    assert empty_P_G.shape == rewards_P_G.shape, f"empty {tuple(empty_P_G.shape)} vs rewards {tuple(rewards_P_G.shape)}"
    assert empty_P_G.dtype == torch.bool, f"empty must be bool, got {empty_P_G.dtype}"
    # where, not masking by multiplication: an empty slot may hold NaN.
    worst_P_1 = torch.where(empty_P_G, torch.inf, rewards_P_G).amin(dim=1, keepdim=True)
    has_text_P_1 = (~empty_P_G).any(dim=1, keepdim=True)
    return torch.where(empty_P_G & has_text_P_1, worst_P_1 - margin, rewards_P_G)


def answer_perplexity_rewards(
    answer_nll_N_T: Tensor,
    answer_mask_N_T: Tensor,
    completion_lens_N: Tensor,
    answer_lens_N: Tensor,
    *,
    score: Score,
) -> Tensor:
    """Reward = coverage * likelihood of the reference answer, scored after the completion.

    coverage = min(1, completion_len / answer_len), and with p_j = exp(-nll_j) over the masked
    answer tokens:
      arithmetic: coverage * mean_j p_j (RLPR's probability reward);
      geometric:  coverage * exp(-mean_j nll_j) = coverage / perplexity.
    Rewards lie in [0, 1]. An empty completion has coverage 0 and scores 0; so does a row with no
    masked answer token (no evidence of the answer).

    Args:
        answer_nll_N_T: Per-token NLL of the answer tokens, in nats.
        answer_mask_N_T: True at answer tokens.
        completion_lens_N: Completion lengths in tokens.
        answer_lens_N: Answer lengths in tokens; must be > 0.
        score: "arithmetic" or "geometric", as above.

    Returns:
        rewards_N in [0, 1].
    """
    _check(answer_nll_N_T, answer_mask_N_T)
    n = answer_nll_N_T.shape[0]
    assert completion_lens_N.shape == (n,), f"completion_lens must be [{n}]"
    assert answer_lens_N.shape == (n,), f"answer_lens must be [{n}]"
    assert bool((answer_lens_N > 0).all()), "every answer must have at least one token"
    assert score in ("arithmetic", "geometric"), f"unknown score {score!r}"
    dtype = answer_nll_N_T.dtype
    coverage_N = (completion_lens_N.to(dtype) / answer_lens_N.to(dtype)).clamp(max=1.0)
    if score == "arithmetic":
        prob_sum_N, count_N = _masked_sum_and_count(torch.exp(-answer_nll_N_T), answer_mask_N_T)
        likelihood_N = prob_sum_N / count_N.clamp(min=1)
    else:
        nll_sum_N, count_N = _masked_sum_and_count(answer_nll_N_T, answer_mask_N_T)
        likelihood_N = torch.exp(-nll_sum_N / count_N.clamp(min=1))
    return torch.where(count_N > 0, coverage_N * likelihood_N, 0.0)


def completion_cross_entropy_rewards(
    ce_N_T: Tensor, covered_mask_N_T: Tensor, answer_lens_N: Tensor, *, score: Score
) -> Tensor:
    """Reward = how well the completion's position t predicts answer token t, over the answer.

    ce_N_T[i, t] is the cross-entropy (nats) of the model's distribution at completion position t
    against answer token t; covered_mask_N_T marks t < min(completion_len, answer_len). With
    p_t = exp(-ce_t) and coverage = covered_count / answer_len (<= 1 by the mask's contract):
      arithmetic: (1 / answer_len) * sum over covered t of p_t
                  = coverage * mean p over covered positions; uncovered answer positions count 0,
                  so extending a completion never lowers the reward;
      geometric:  coverage * exp(-mean covered ce). Not monotone in length: a badly predicted
                  extra token raises the mean cross-entropy.
    Rewards lie in [0, 1]; a row with no covered position (empty completion) scores 0.

    Args:
        ce_N_T: Cross-entropy at each completion position against the answer token, in nats.
        covered_mask_N_T: True at positions covered by both completion and answer.
        answer_lens_N: Answer lengths in tokens; must be > 0.
        score: "arithmetic" or "geometric", as above.

    Returns:
        rewards_N in [0, 1].
    """
    _check(ce_N_T, covered_mask_N_T)
    assert answer_lens_N.shape == (ce_N_T.shape[0],), f"answer_lens must be [{ce_N_T.shape[0]}]"
    assert bool((answer_lens_N > 0).all()), "every answer must have at least one token"
    assert bool((covered_mask_N_T.sum(dim=1) <= answer_lens_N).all()), "covers past the answer"
    assert score in ("arithmetic", "geometric"), f"unknown score {score!r}"
    answer_lens_N = answer_lens_N.to(ce_N_T.dtype)
    if score == "arithmetic":
        prob_sum_N, _ = _masked_sum_and_count(torch.exp(-ce_N_T), covered_mask_N_T)
        return prob_sum_N / answer_lens_N
    ce_sum_N, count_N = _masked_sum_and_count(ce_N_T, covered_mask_N_T)
    # The covered count never exceeds answer_len (asserted above), so coverage <= 1 already.
    coverage_N = count_N / answer_lens_N
    rewards_N = coverage_N * torch.exp(-ce_sum_N / count_N.clamp(min=1))
    return torch.where(count_N > 0, rewards_N, 0.0)


def weighted_reward_sum(rewards_P_G_F: Tensor, weights_F: Tensor) -> Tensor:
    """Reward = sum over the F reward functions of weight * that function's reward, NaN-skipping.

    NaN marks a completion a function does not apply to (it returned None): it adds nothing, as
    in TRL's GRPOTrainer (nansum), so a function that judges only some rows does not drag the
    others' rewards. A completion no function applies to is unscorable: NaN, as in TRL 1.16 (a 0
    would bias its group's baseline and give it an advantage of its own); `group_normalize` leaves
    it out of the group's statistics and gives it advantage 0.

    Args:
        rewards_P_G_F: Each function's rewards, last axis in the order of `weights_F`.
        weights_F: One weight per function.

    Returns:
        rewards_P_G, NaN exactly where every function's reward is NaN.
    """
    assert rewards_P_G_F.dim() == 3, f"rewards must be [P, G, F], got {tuple(rewards_P_G_F.shape)}"
    assert weights_F.shape == rewards_P_G_F.shape[2:], (
        f"weights {tuple(weights_F.shape)} vs {rewards_P_G_F.shape[2]} functions"
    )
    rewards_P_G = (rewards_P_G_F * weights_F).nansum(dim=2)
    return rewards_P_G.masked_fill(rewards_P_G_F.isnan().all(dim=2), torch.nan)
