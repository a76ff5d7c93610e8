"""Group-relative advantages: each completion's reward against the other completions of its prompt.

Pure tensor functions (no model, no I/O). Shapes: P prompts, G completions per prompt.
"""

from __future__ import annotations

import torch
from torch import Tensor


def group_normalize(rewards_P_G: Tensor, *, eps: float, scale_by_std: bool) -> Tensor:
    """Centre each group's rewards on the group mean and, optionally, divide by the group std.

    A = (R - mean_group) / (std_group + eps * max_group |R|), with the population std
    (correction=0). The floor is relative because rounding noise is: identical texts scored in
    other batch shapes (GPU kernels, bf16) differ by a fraction of the rewards' own magnitude, and
    an absolute floor would let that noise become advantages of ±1 for large rewards while
    squashing real differences between tiny ones. A group whose rewards are all exactly equal
    (one sample, all zeros included) gets exactly zero advantage, never NaN. With
    `scale_by_std=False` (Dr. GRPO), A = R - mean_group.

    A NaN reward marks an unscorable completion (no reward function applied to it): it is left
    out of its group's mean, std and largest |reward|, and its advantage is 0 (TRL 1.16's
    GRPOTrainer does the same), so it neither moves the policy nor shifts the others' baseline.

    Args:
        rewards_P_G: Float rewards, one row per prompt. P may be 0.
        eps: Floor of the group std, relative to the group's largest |reward|.
        scale_by_std: Divide by the group std (GRPO) or only centre (Dr. GRPO).

    Returns:
        advantages_P_G, same shape and dtype as the rewards; finite wherever the rewards are
        finite or NaN.
    """
    assert rewards_P_G.dim() == 2, f"rewards must be [P, G], got {tuple(rewards_P_G.shape)}"
    assert rewards_P_G.is_floating_point(), f"rewards must be float, got {rewards_P_G.dtype}"
    # Rewards are P*G scalars, so float64 is free. Subtracting each group's first reward first
    # cancels a large common offset exactly (Sterbenz) before the mean is rounded; mean and std are
    # shift-invariant, and an all-equal group becomes exact zeros, hence exactly zero advantage.
    # The shift is by each group's first scored reward; unscored entries are held at 0 throughout.
    scored_P_G = ~rewards_P_G.isnan()
    rewards_d_P_G = rewards_P_G.double().masked_fill(~scored_P_G, 0.0)
    first_P_1 = rewards_d_P_G.gather(1, scored_P_G.int().argmax(dim=1, keepdim=True))
    count_P_1 = scored_P_G.sum(dim=1, keepdim=True).clamp(min=1)
    shifted_P_G = torch.where(scored_P_G, rewards_d_P_G - first_P_1, 0.0)
    advantages_P_G = torch.where(scored_P_G, shifted_P_G - shifted_P_G.sum(dim=1, keepdim=True) / count_P_1, 0.0)
    if scale_by_std:
        std_P_1 = (advantages_P_G.square().sum(dim=1, keepdim=True) / count_P_1).sqrt()  # population std
        floor_P_1 = eps * rewards_d_P_G.abs().amax(dim=1, keepdim=True)
        denominator_P_1 = std_P_1 + floor_P_1
        # Zero only for an all-zero group, whose deviations are exact zeros: 0, not 0/0.
        advantages_P_G = torch.where(denominator_P_1 > 0, advantages_P_G / denominator_P_1, 0.0)
    return advantages_P_G.to(rewards_P_G.dtype)


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
