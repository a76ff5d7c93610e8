"""Group-relative advantages: each completion's reward against the other completions of its prompt.

Pure tensor functions (no model, no I/O). Shapes: P prompts, G completions per prompt.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor


def group_normalize(rewards_P_G: Tensor, *, eps: float, scale_rewards: Literal["group", "batch", "none"]) -> Tensor:
    """Centre each group's rewards on the group mean and divide by a std (TRL's `scale_rewards`).

    A = (R - mean_group) / (std + eps * max|R|), where std and max|R| are the group's
    (`scale_rewards="group"`, GRPO) or the whole batch's (`"batch"`: every reward against the
    batch mean, as TRL's `rewards.std()`). Both stds are the unbiased one (correction=1), as TRL's
    torch.std and verl's. With `"none"` (Dr. GRPO), A = R - mean_group.

    The floor is relative because rounding noise is: identical texts scored in other batch shapes
    (GPU kernels, bf16) differ by a fraction of the rewards' own magnitude, and an absolute floor
    (TRL's 1e-4) would let that noise become advantages of ±1 for large rewards while squashing
    real differences between tiny ones. A group whose rewards are all exactly equal (one sample,
    all zeros included) gets exactly zero advantage, never NaN: a single reward has no spread,
    where torch.std would give NaN.

    A NaN reward marks an unscorable completion (no reward function applied to it): it is left
    out of every mean, std and largest |reward|, and its advantage is 0 (TRL 1.16's GRPOTrainer
    does the same), so it neither moves the policy nor shifts the others' baseline.

    Args:
        rewards_P_G: Float rewards, one row per prompt. P may be 0. For "batch", the whole step's
            (every rank's) rows.
        eps: Floor of the std, relative to the largest |reward| it is the std of.
        scale_rewards: Whose std divides: the group's, the batch's, or none.

    Returns:
        advantages_P_G, same shape and dtype as the rewards; finite wherever the rewards are
        finite or NaN.
    """
    assert rewards_P_G.dim() == 2, f"rewards must be [P, G], got {tuple(rewards_P_G.shape)}"
    assert rewards_P_G.is_floating_point(), f"rewards must be float, got {rewards_P_G.dtype}"
    assert scale_rewards in ("group", "batch", "none"), f"scale_rewards must be group, batch or none: {scale_rewards!r}"
    if rewards_P_G.numel() == 0:
        return torch.zeros_like(rewards_P_G)
    # Rewards are P*G scalars, so float64 is free. Unscored entries are held at 0 throughout.
    scored_P_G = ~rewards_P_G.isnan()
    rewards_d_P_G = rewards_P_G.double().masked_fill(~scored_P_G, 0.0)
    advantages_P_G = _centred(rewards_d_P_G, scored_P_G)
    if scale_rewards == "group":
        count_P_1 = scored_P_G.sum(dim=1, keepdim=True)
        std_P_1 = _unbiased_std(advantages_P_G.square().sum(dim=1, keepdim=True), count_P_1)
        floor_P_1 = eps * rewards_d_P_G.abs().amax(dim=1, keepdim=True)
        advantages_P_G = _divide(advantages_P_G, std_P_1 + floor_P_1)
    elif scale_rewards == "batch":
        # Every scored reward against the batch mean: the same centring, on one row of all of them.
        scored_1_M = scored_P_G.reshape(1, -1)
        deviations_1_M = _centred(rewards_d_P_G.reshape(1, -1), scored_1_M)
        std_1_1 = _unbiased_std(deviations_1_M.square().sum(dim=1, keepdim=True), scored_1_M.sum(dim=1, keepdim=True))
        floor = eps * rewards_d_P_G.abs().max()
        advantages_P_G = _divide(advantages_P_G, std_1_1 + floor)
    return advantages_P_G.to(rewards_P_G.dtype)


def _centred(rewards_d_P_G: Tensor, scored_P_G: Tensor) -> Tensor:
    """Each row's scored float64 rewards minus their mean; 0 where unscored (which hold 0).

    Subtracting each row's first scored reward first cancels a large common offset exactly
    (Sterbenz) before the mean is rounded; deviations are shift-invariant, and an all-equal row
    becomes exact zeros, hence exactly zero advantage.
    """
    first_P_1 = rewards_d_P_G.gather(1, scored_P_G.int().argmax(dim=1, keepdim=True))
    count_P_1 = scored_P_G.sum(dim=1, keepdim=True).clamp(min=1)
    shifted_P_G = torch.where(scored_P_G, rewards_d_P_G - first_P_1, 0.0)
    return torch.where(scored_P_G, shifted_P_G - shifted_P_G.sum(dim=1, keepdim=True) / count_P_1, 0.0)


def _unbiased_std(squares_P_1: Tensor, count_P_1: Tensor) -> Tensor:
    """sqrt(sum of squared deviations / (count - 1)); 0 for one value (whose deviation is 0)."""
    return (squares_P_1 / (count_P_1 - 1).clamp(min=1)).sqrt()


def _divide(advantages_P_G: Tensor, denominator: Tensor) -> Tensor:
    """advantages / denominator, 0 where it is 0: only for all-zero rewards, whose deviations are
    exact zeros (0, not 0/0)."""
    return torch.where(denominator > 0, advantages_P_G / denominator, 0.0)


def zero_variance_groups(rewards_P_G: Tensor) -> int:
    """Count the groups whose rewards are all exactly equal (they carry no learning signal).

    Unscorable completions (NaN) are left out, as `group_normalize` leaves them out: a group with
    at most one scored reward counts too.

    Args:
        rewards_P_G: Rewards, one row per prompt.

    Returns:
        The number of such rows.
    """
    assert rewards_P_G.dim() == 2, f"rewards must be [P, G], got {tuple(rewards_P_G.shape)}"
    scored_P_G = ~rewards_P_G.isnan()
    first_P_1 = rewards_P_G.gather(1, scored_P_G.int().argmax(dim=1, keepdim=True))
    return int(((rewards_P_G == first_P_1) | ~scored_P_G).all(dim=1).sum())
