"""Exact quantiles past torch.quantile's 2^24-element limit, against torch.quantile below it."""

from __future__ import annotations

import math

import pytest
import torch

from learner.quantiles import quantiles

QS = [0.0, 0.25, 0.5, 0.9, 0.99, 1.0]


@pytest.mark.parametrize(
    "values",
    [
        [3.0],  # one value: every quantile is it
        [2.0, 1.0],  # position q * 1 between the two
        [5.0, 1.0, 4.0, 1.0, 3.0],  # ties
        torch.randn(1001, generator=torch.Generator().manual_seed(0)).tolist(),  # (n - 1) * q lands between slots
    ],
)
def test_matches_torch_quantile_linear_interpolation(values: list[float]) -> None:
    values_M = torch.tensor(values, dtype=torch.float64)
    want = torch.quantile(values_M, torch.tensor(QS, dtype=torch.float64)).tolist()
    torch.testing.assert_close(quantiles(values_M, QS), want)


def test_empty_and_nan_give_nan() -> None:
    # No tokens: nothing to rank. A NaN anywhere: torch.quantile's NaN, not a rank that skips it.
    assert all(math.isnan(q) for q in quantiles(torch.zeros(0), [0.5, 0.99]))
    assert all(math.isnan(q) for q in quantiles(torch.tensor([1.0, math.nan, 2.0]), [0.5, 0.99]))


def test_past_torch_quantiles_limit() -> None:
    # n = 2^24 + 1 values 0, 1, ..., 2^24 (exact in float32), shuffled by i -> 5 i mod n (5 is
    # coprime to n = 97 * 257 * 673, so this is a permutation). torch.quantile raises here.
    # Sorted, slot k holds k, and the position of q is q * (n - 1) = q * 2^24, so the linearly
    # interpolated quantile is q * 2^24 itself: p50 = 2^23, p99 = 0.99 * 2^24 = 16609443.84.
    n = 2**24 + 1
    values_M = (torch.arange(n, dtype=torch.int64) * 5 % n).float()
    torch.testing.assert_close(quantiles(values_M, [0.5, 0.99]), [2.0**23, 0.99 * 2**24])


def test_a_position_on_a_slot_is_that_value() -> None:
    # [0, inf, 1] sorted is [0, 1, inf]: q = 0.5 sits on slot 1 (value 1) and q = 1 on slot 2 (inf),
    # so no interpolation with inf happens (torch.quantile's lerp gives NaN at q = 1 here).
    assert quantiles(torch.tensor([0.0, math.inf, 1.0]), [0.0, 0.5, 1.0]) == [0.0, 1.0, math.inf]
