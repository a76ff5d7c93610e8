"""Group-relative advantages against an independent computation with `statistics` and exact
fractions (mean and population std of the same float values, rounded once at the end)."""

from __future__ import annotations

import statistics
from fractions import Fraction

import pytest
import torch

from learner.advantages import group_normalize, zero_variance_groups

EPS = 1e-6


def _expected(rewards: list[list[float]], *, scale_by_std: bool) -> list[list[float]]:
    out = []
    for group in rewards:
        exact = [Fraction(r) for r in group]
        mean = statistics.mean(exact)
        denom = statistics.pstdev(group) + EPS if scale_by_std else 1.0
        out.append([float(r - mean) / denom for r in exact])
    return out


CASES = {
    # Every group all-equal: no signal, exactly zero advantage (not 0/eps noise).
    "all_equal": ([[0.1, 0.1, 0.1], [-3.0, -3.0, -3.0]], torch.float64),
    # all-equal in float32 where the mean of 0.1s is not exactly 0.1.
    "all_equal_f32": ([[0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]], torch.float32),
    # ±5e-13 around 1: std ~4e-13 is swamped by eps, advantages ~4e-7 instead of ±1.22.
    "near_equal": ([[1.0, 1.0 + 5e-13, 1.0 - 5e-13]], torch.float64),
    # The same in float32 rounds to all-equal: exactly zero.
    "near_equal_f32": ([[1.0, 1.0 + 5e-13, 1.0 - 5e-13]], torch.float32),
    # 1e12 offsets: a naive float64 mean loses ~1e-4 absolute, which the deviations (~1) would see.
    "huge_offset": ([[1e12, 1e12 + 1.0, 1e12 + 3.0], [-1e12, -1e12 + 2.0, -1e12]], torch.float64),
    # Huge spread: advantages ±1 (eps is negligible against std 1e12).
    "huge_spread": ([[1e12, -1e12]], torch.float64),
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
@pytest.mark.parametrize("name", ["all_equal", "all_equal_f32", "near_equal_f32", "single_sample"])
def test_zero_variance_groups_get_exact_zero(name: str, scale_by_std: bool) -> None:
    rewards_P_G = torch.tensor(CASES[name][0], dtype=CASES[name][1])
    advantages_P_G = group_normalize(rewards_P_G, eps=EPS, scale_by_std=scale_by_std)
    assert torch.equal(advantages_P_G, torch.zeros_like(rewards_P_G))


def test_near_equal_stays_tiny() -> None:
    # (5e-13) / (pstdev ~4.08e-13 + 1e-6) ~ 5e-7: eps keeps rounding noise from becoming ±1.22.
    rewards_P_G = torch.tensor(CASES["near_equal"][0], dtype=torch.float64)
    advantages_P_G = group_normalize(rewards_P_G, eps=EPS, scale_by_std=True)
    assert advantages_P_G.abs().max() < 1e-6


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
