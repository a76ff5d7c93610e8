"""Group-relative advantages against an independent computation with `statistics` and exact
fractions (mean and unbiased std, as TRL's torch.std, of the same float values, rounded once at
the end).

The std is floored relative to the rewards' scale: A = (R - mean) / (std + eps * max|R|), so
differences below eps of the rewards' own magnitude (float rounding, GPU kernels) stay small.
scale_rewards picks the std (and the max|R|): the group's ("group"), the whole batch's ("batch"),
or none at all ("none": A = R - mean)."""

from __future__ import annotations

import math
import statistics
from fractions import Fraction

import pytest
import torch

from learner.advantages import group_normalize, zero_variance_groups
from shared.config import LearnerConfig

EPS = 1e-4


def _scale(values: list[float]) -> float:
    """Unbiased std (0 for a single value, which has no spread: TRL's torch.std would be NaN) plus
    the relative floor."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return std + EPS * max(abs(r) for r in values)


def _expected(rewards: list[list[float]], *, scale_rewards: str) -> list[list[float]]:
    everything = [r for group in rewards for r in group]
    out = []
    for group in rewards:
        exact = [Fraction(r) for r in group]
        mean = statistics.mean(exact)
        denom = {"group": _scale(group), "batch": _scale(everything), "none": 1.0}[scale_rewards]
        # An all-zero group has nothing to divide: its deviations are exact zeros, so is A.
        out.append([float(r - mean) / denom if denom > 0 else 0.0 for r in exact])
    return out


CASES = {
    # Every group all-equal: no signal, exactly zero advantage (not 0/eps noise).
    "all_equal": ([[0.1, 0.1, 0.1], [-3.0, -3.0, -3.0]], torch.float64),
    # all-equal in float32 where the mean of 0.1s is not exactly 0.1.
    "all_equal_f32": ([[0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]], torch.float32),
    # ±5e-13 around 1: std 5e-13 is swamped by eps * 1, advantages ~5e-9 instead of ±1.
    "near_equal": ([[1.0, 1.0 + 5e-13, 1.0 - 5e-13]], torch.float64),
    # The same spread around -4 (a typical -mean NLL): the floor is 4e-4, advantages ~1e-9.
    "near_equal_offset": ([[-4.0, -4.0 + 5e-13, -4.0 - 5e-13]], torch.float64),
    # The same in float32 rounds to all-equal: exactly zero.
    "near_equal_f32": ([[1.0, 1.0 + 5e-13, 1.0 - 5e-13]], torch.float32),
    # 1e12 offsets: a naive float64 mean loses ~1e-4 absolute, which the deviations (~1) would see.
    # Deviations of 1e-12 relative are below any float32 reward's resolution: the floor 1e8
    # makes them ~1e-8, not ±1.
    "huge_offset": ([[1e12, 1e12 + 1.0, 1e12 + 3.0], [-1e12, -1e12 + 2.0, -1e12]], torch.float64),
    # Huge spread: advantages ±1 / (1 + 1e-4) (floor 1e8 against std 1e12).
    "huge_spread": ([[1e12, -1e12]], torch.float64),
    # Tiny rewards with a real relative spread keep full-size advantages: the floor scales down too.
    "tiny_spread": ([[1e-9, 2e-9, 0.0]], torch.float64),
    # All zeros: std 0 and floor 0; exactly zero advantage, never 0/0.
    "all_zero": ([[0.0, 0.0, 0.0]], torch.float32),
    # G = 1: no spread (torch.std would give NaN), deviation 0, so advantage 0 rather than NaN.
    "single_sample": ([[5.0], [-2.0], [0.0]], torch.float32),
    # Ordinary groups next to a zero-variance one.
    "mixed": ([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0], [0.0, 1.0, 2.0, 3.0]], torch.float32),
}


SCALES = ["group", "batch", "none"]


@pytest.mark.parametrize("scale_rewards", SCALES)
@pytest.mark.parametrize("name", list(CASES))
def test_group_normalize_matches_statistics(name: str, scale_rewards: str) -> None:
    values, dtype = CASES[name]
    rewards_P_G = torch.tensor(values, dtype=dtype)
    advantages_P_G = group_normalize(rewards_P_G, eps=EPS, scale_rewards=scale_rewards)
    # The expectation uses the rewards as stored (float32 rounding included).
    expected = _expected(rewards_P_G.tolist(), scale_rewards=scale_rewards)
    torch.testing.assert_close(advantages_P_G, torch.tensor(expected, dtype=dtype))


@pytest.mark.parametrize("scale_rewards", SCALES)
@pytest.mark.parametrize("name", ["all_equal", "all_equal_f32", "near_equal_f32", "single_sample", "all_zero"])
def test_zero_variance_groups_get_exact_zero(name: str, scale_rewards: str) -> None:
    rewards_P_G = torch.tensor(CASES[name][0], dtype=CASES[name][1])
    advantages_P_G = group_normalize(rewards_P_G, eps=EPS, scale_rewards=scale_rewards)
    assert torch.equal(advantages_P_G, torch.zeros_like(rewards_P_G))


def test_near_equal_stays_tiny() -> None:
    # (5e-13) / (stdev 5e-13 + 1e-4 * 1) ~ 5e-9: eps keeps rounding noise from becoming ±1.
    rewards_P_G = torch.tensor(CASES["near_equal"][0], dtype=torch.float64)
    advantages_P_G = group_normalize(rewards_P_G, eps=EPS, scale_rewards="group")
    assert advantages_P_G.abs().max() < 1e-8


def test_scoring_noise_is_not_a_unit_advantage_at_the_default_eps() -> None:
    # Two scorings of the same text, -4 nats/token, apart by 1e-5 (2.5e-6 relative: the size of a
    # float32 sum reordered by another batch shape on a GPU). Deviations ±5e-6, unbiased std
    # sqrt(2 * (5e-6)^2 / 1) = 5e-6 * sqrt(2).
    # An absolute eps 1e-6: 5e-6 / (7.07e-6 + 1e-6) = ±0.62, a full-size signal from noise.
    # Relative floor 1e-4 * 4 = 4e-4: 5e-6 / (7.07e-6 + 4e-4) = ±0.0123.
    eps = LearnerConfig().advantage_eps
    rewards_P_G = torch.tensor([[-4.0, -4.0 + 1e-5]], dtype=torch.float64)
    advantages_P_G = group_normalize(rewards_P_G, eps=eps, scale_rewards="group")
    want_P_G = torch.tensor([[-5e-6, 5e-6]], dtype=torch.float64) / (5e-6 * math.sqrt(2) + 4e-4)
    torch.testing.assert_close(advantages_P_G, want_P_G)


def test_no_std_scaling_is_plain_centring() -> None:
    # mean of [1, 2, 6] is 3 -> [-2, -1, 3], whatever the spread.
    rewards_P_G = torch.tensor([[1.0, 2.0, 6.0]])
    advantages_P_G = group_normalize(rewards_P_G, eps=EPS, scale_rewards="none")
    torch.testing.assert_close(advantages_P_G, torch.tensor([[-2.0, -1.0, 3.0]]))


def test_group_std_is_the_unbiased_one() -> None:
    # G = 8, four 0s and four 1s: mean 1/2, deviations ±1/2. Unbiased std (TRL's torch.std, verl)
    # sqrt(8 * 1/4 / 7) = sqrt(2/7) = 0.53452, not the population std 1/2, so the advantages are
    # ±(1/2) / (sqrt(2/7) + 1e-4 * 1) = ±0.93522: sqrt(7/8) of the population std's ±1 (1/1.069).
    rewards_P_G = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    advantages_P_G = group_normalize(rewards_P_G, eps=EPS, scale_rewards="group")
    want = 0.5 / (math.sqrt(2 / 7) + EPS)
    torch.testing.assert_close(advantages_P_G, torch.tensor([[-want] * 4 + [want] * 4], dtype=torch.float64))


def test_batch_scaling_divides_every_group_by_the_batch_std() -> None:
    # Groups [0, 1] and [2, 5]: centred on their own means (1/2, 7/2) -> [-1/2, 1/2], [-3/2, 3/2].
    # "group": group 0's std sqrt((1/4 + 1/4) / 1) = sqrt(1/2), floor 1e-4 * 1;
    #          group 1's std sqrt((9/4 + 9/4) / 1) = sqrt(9/2), floor 1e-4 * 5.
    # "batch": all four rewards [0, 1, 2, 5], mean 2, squared deviations 4 + 1 + 0 + 9 = 14,
    #          unbiased std sqrt(14/3) (as TRL's rewards.std()), floor 1e-4 * 5, for both groups.
    rewards_P_G = torch.tensor([[0.0, 1.0], [2.0, 5.0]], dtype=torch.float64)
    centred_P_G = torch.tensor([[-0.5, 0.5], [-1.5, 1.5]], dtype=torch.float64)
    group_P_1 = torch.tensor([[math.sqrt(0.5) + 1e-4], [math.sqrt(4.5) + 5e-4]], dtype=torch.float64)
    got = group_normalize(rewards_P_G, eps=EPS, scale_rewards="group")
    torch.testing.assert_close(got, centred_P_G / group_P_1)
    got = group_normalize(rewards_P_G, eps=EPS, scale_rewards="batch")
    torch.testing.assert_close(got, centred_P_G / (math.sqrt(14 / 3) + 5e-4))


@pytest.mark.parametrize("scale_rewards", SCALES)
def test_empty_batch(scale_rewards: str) -> None:
    advantages_P_G = group_normalize(torch.zeros(0, 8), eps=EPS, scale_rewards=scale_rewards)
    assert advantages_P_G.shape == (0, 8)


def test_rejects_flat_rewards() -> None:
    with pytest.raises(AssertionError):
        group_normalize(torch.zeros(8), eps=EPS, scale_rewards="group")


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([[1.0, 1.0], [1.0, 2.0]], 1),  # one all-equal group
        ([[0.0], [3.0]], 2),  # single-sample groups are trivially all-equal
        ([[1.0, 1.0 + 5e-13]], 0),  # near-equal is not equal (float64)
        ([[-1e12, -1e12, -1e12]], 1),  # huge magnitude, exactly equal
    ],
)
def test_zero_variance_groups(values: list[list[float]], expected: int) -> None:
    assert zero_variance_groups(torch.tensor(values, dtype=torch.float64)) == expected


def test_zero_variance_groups_empty_batch() -> None:
    assert zero_variance_groups(torch.zeros(0, 8)) == 0


def test_unscorable_completions_are_left_out_of_their_group_and_get_zero_advantage() -> None:
    nan = float("nan")
    # Group 0: scored [1, 3], mean 2, unbiased std sqrt((1 + 1) / 1) = sqrt(2), floor 1e-4 * 3
    # -> ±1 / (sqrt(2) + 3e-4). Group 1: nothing scored -> zeros. Group 2: one scored -> its
    # deviation is 0.
    rewards_P_G = torch.tensor([[1.0, nan, 3.0], [nan, nan, nan], [nan, 5.0, nan]])
    got = group_normalize(rewards_P_G, eps=1e-4, scale_rewards="group")
    a = 1 / (math.sqrt(2) + 3e-4)
    want = torch.tensor([[-a, 0.0, a], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(got, want)
    # "batch": the scored rewards [1, 3, 5], mean 3, unbiased std sqrt((4 + 0 + 4) / 2) = 2, floor
    # 1e-4 * 5: group 0's deviations ±1 -> ±1 / 2.0005; the others still 0.
    got = group_normalize(rewards_P_G, eps=1e-4, scale_rewards="batch")
    want = torch.tensor([[-1 / 2.0005, 0.0, 1 / 2.0005], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(got, want)
    # Dr. GRPO (centre only): [nan, 2, 4] -> [0, -1, 1]
    got = group_normalize(torch.tensor([[nan, 2.0, 4.0]]), eps=1e-4, scale_rewards="none")
    torch.testing.assert_close(got, torch.tensor([[0.0, -1.0, 1.0]]))


def test_zero_variance_groups_leave_unscorable_completions_out() -> None:
    nan = float("nan")
    # all unscorable | one scored | two different | equal with an unscorable | equal
    rewards_P_G = torch.tensor([[nan, nan], [1.0, nan], [1.0, 2.0], [nan, 3.0], [4.0, 4.0]])
    assert zero_variance_groups(rewards_P_G) == 4
