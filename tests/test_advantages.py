"""Group-relative advantages against an independent computation with `statistics` and exact
fractions (mean and population std of the same float values, rounded once at the end).

The std is floored relative to the group's scale: A = (R - mean) / (std + eps * max|R|), so
differences below eps of the rewards' own magnitude (float rounding, GPU kernels) stay small."""

from __future__ import annotations

import statistics
from fractions import Fraction

import pytest
import torch

from learner.advantages import group_normalize, zero_variance_groups
from shared.config import LearnerConfig

EPS = 1e-4


def _expected(rewards: list[list[float]], *, scale_by_std: bool) -> list[list[float]]:
    out = []
    for group in rewards:
        exact = [Fraction(r) for r in group]
        mean = statistics.mean(exact)
        denom = statistics.pstdev(group) + EPS * max(abs(r) for r in group) if scale_by_std else 1.0
        # An all-zero group has nothing to divide: its deviations are exact zeros, so is A.
        out.append([float(r - mean) / denom if denom > 0 else 0.0 for r in exact])
    return out


CASES = {
    # Every group all-equal: no signal, exactly zero advantage (not 0/eps noise).
    "all_equal": ([[0.1, 0.1, 0.1], [-3.0, -3.0, -3.0]], torch.float64),
    # all-equal in float32 where the mean of 0.1s is not exactly 0.1.
    "all_equal_f32": ([[0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]], torch.float32),
    # ±5e-13 around 1: std ~4e-13 is swamped by eps * 1, advantages ~5e-9 instead of ±1.22.
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
    # G = 1: population std 0, so advantage 0 rather than NaN.
    "single_sample": ([[5.0], [-2.0], [0.0]], torch.float32),
    # Ordinary groups next to a zero-variance one.
    "mixed": ([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0], [0.0, 1.0, 2.0, 3.0]], torch.float32),
}


@pytest.mark.parametrize("scale_by_std", [True, False])
@pytest.mark.parametrize("name", list(CASES))
def test_group_normalize_matches_statistics(name: str, scale_by_std: bool) -> None:
    values, dtype = CASES[name]
    rewards_P_G = torch.tensor(values, dtype=dtype)
    advantages_P_G = group_normalize(rewards_P_G, eps=EPS, scale_by_std=scale_by_std)
    # The expectation uses the rewards as stored (float32 rounding included).
    expected = _expected(rewards_P_G.tolist(), scale_by_std=scale_by_std)
    torch.testing.assert_close(advantages_P_G, torch.tensor(expected, dtype=dtype))


@pytest.mark.parametrize("scale_by_std", [True, False])
@pytest.mark.parametrize("name", ["all_equal", "all_equal_f32", "near_equal_f32", "single_sample", "all_zero"])
def test_zero_variance_groups_get_exact_zero(name: str, scale_by_std: bool) -> None:
    rewards_P_G = torch.tensor(CASES[name][0], dtype=CASES[name][1])
    advantages_P_G = group_normalize(rewards_P_G, eps=EPS, scale_by_std=scale_by_std)
    assert torch.equal(advantages_P_G, torch.zeros_like(rewards_P_G))


def test_near_equal_stays_tiny() -> None:
    # (5e-13) / (pstdev ~4.08e-13 + 1e-4 * 1) ~ 5e-9: eps keeps rounding noise from becoming ±1.22.
    rewards_P_G = torch.tensor(CASES["near_equal"][0], dtype=torch.float64)
    advantages_P_G = group_normalize(rewards_P_G, eps=EPS, scale_by_std=True)
    assert advantages_P_G.abs().max() < 1e-8


def test_scoring_noise_is_not_a_unit_advantage_at_the_default_eps() -> None:
    # Two scorings of the same text, -4 nats/token, apart by 1e-5 (2.5e-6 relative: the size of a
    # float32 sum reordered by another batch shape on a GPU). Deviations ±5e-6, pstdev 5e-6.
    # Old absolute eps 1e-6: 5e-6 / 6e-6 = ±0.83, a full-size signal from noise.
    # Relative floor 1e-4 * 4 = 4e-4: 5e-6 / (5e-6 + 4e-4) = ±0.0123.
    eps = LearnerConfig().advantage_eps
    rewards_P_G = torch.tensor([[-4.0, -4.0 + 1e-5]], dtype=torch.float64)
    advantages_P_G = group_normalize(rewards_P_G, eps=eps, scale_by_std=True)
    torch.testing.assert_close(advantages_P_G, torch.tensor([[-5e-6, 5e-6]], dtype=torch.float64) / (5e-6 + 4e-4))


def test_no_std_scaling_is_plain_centring() -> None:
    # mean of [1, 2, 6] is 3 -> [-2, -1, 3], whatever the spread.
    rewards_P_G = torch.tensor([[1.0, 2.0, 6.0]])
    advantages_P_G = group_normalize(rewards_P_G, eps=EPS, scale_by_std=False)
    torch.testing.assert_close(advantages_P_G, torch.tensor([[-2.0, -1.0, 3.0]]))


@pytest.mark.parametrize("scale_by_std", [True, False])
def test_empty_batch(scale_by_std: bool) -> None:
    advantages_P_G = group_normalize(torch.zeros(0, 8), eps=EPS, scale_by_std=scale_by_std)
    assert advantages_P_G.shape == (0, 8)


def test_rejects_flat_rewards() -> None:
    with pytest.raises(AssertionError):
        group_normalize(torch.zeros(8), eps=EPS, scale_by_std=True)


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
    # Group 0: scored [1, 3], mean 2, population std 1, floor 1e-4 * 3 -> ±1 / 1.0003.
    # Group 1: nothing scored -> zeros. Group 2: one scored -> its deviation is 0.
    rewards_P_G = torch.tensor([[1.0, nan, 3.0], [nan, nan, nan], [nan, 5.0, nan]])
    got = group_normalize(rewards_P_G, eps=1e-4, scale_by_std=True)
    want = torch.tensor([[-1 / 1.0003, 0.0, 1 / 1.0003], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(got, want)
    # Dr. GRPO (centre only): [nan, 2, 4] -> [0, -1, 1]
    got = group_normalize(torch.tensor([[nan, 2.0, 4.0]]), eps=1e-4, scale_by_std=False)
    torch.testing.assert_close(got, torch.tensor([[0.0, -1.0, 1.0]]))


def test_zero_variance_groups_leave_unscorable_completions_out() -> None:
    nan = float("nan")
    # all unscorable | one scored | two different | equal with an unscorable | equal
    rewards_P_G = torch.tensor([[nan, nan], [1.0, nan], [1.0, 2.0], [nan, 3.0], [4.0, 4.0]])
    assert zero_variance_groups(rewards_P_G) == 4
