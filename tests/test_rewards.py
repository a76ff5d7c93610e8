"""Rewards from per-token NLLs: hand cases one per line, then properties with hypothesis."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from learner.advantages import group_normalize
from learner.rewards import (
    answer_perplexity_rewards,
    completion_cross_entropy_rewards,
    floor_empty_rewards,
    unsupervised_rewards,
)

LN2 = math.log(2.0)
LN4 = math.log(4.0)
INF = math.inf
NAN = math.nan
T, F = True, False
SCORES = ["arithmetic", "geometric"]


def _row(values: list[float]) -> torch.Tensor:
    return torch.tensor([values], dtype=torch.float64)


def _mask(flags: list[bool]) -> torch.Tensor:
    return torch.tensor([flags], dtype=torch.bool)


def _lens(*lens: int) -> torch.Tensor:
    return torch.tensor(lens, dtype=torch.long)


# --- unsupervised: -mean NLL of the completion -------------------------------------------------


@pytest.mark.parametrize(
    ("nll", "mask", "expected"),
    [
        ([1.0, 3.0], [T, T], -2.0),  # mean NLL 2 -> reward -2
        ([1.0, 3.0, 100.0], [T, T, F], -2.0),  # padding is not averaged in
        ([2.0, INF], [T, F], -2.0),  # inf padding must not leak (inf * 0 would be NaN)
        ([0.0, 0.0], [T, T], 0.0),  # a certain completion: the best reward, 0
        ([5.0, 1.0], [F, F], -20.0),  # no token: empty_reward, not -0 from an empty mean
        ([NAN, NAN], [F, F], -20.0),  # no token, NaN padding: still empty_reward, never NaN
    ],
)
def test_unsupervised_cases(nll: list[float], mask: list[bool], expected: float) -> None:
    rewards_N = unsupervised_rewards(_row(nll), _mask(mask), empty_reward=-20.0)
    torch.testing.assert_close(rewards_N, _row([expected])[0])


@settings(deadline=None)
@given(
    nll=st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=1, max_size=6),
    empty_reward=st.floats(-100.0, 0.0),
)
def test_unsupervised_empty_row_gets_empty_reward(nll: list[float], empty_reward: float) -> None:
    mask_N_T = torch.zeros(1, len(nll), dtype=torch.bool)
    rewards_N = unsupervised_rewards(_row(nll), mask_N_T, empty_reward=empty_reward)
    assert rewards_N.item() == empty_reward


# --- unsupervised: an empty completion scores below its group's worst non-empty one ------------


@pytest.mark.parametrize(
    ("rewards", "empty", "margin", "expected"),
    [
        ([[-2.0, -3.0, -20.0]], [[F, F, T]], 1.0, [[-2.0, -3.0, -4.0]]),  # worst non-empty -3, minus 1
        ([[-2.0, -20.0, -20.0]], [[F, T, T]], 1.0, [[-2.0, -3.0, -3.0]]),  # every empty gets the floor
        ([[-2.0, -20.0]], [[F, T]], 0.0, [[-2.0, -2.0]]),  # margin 0: ties with the worst
        ([[-20.0, -20.0]], [[T, T]], 1.0, [[-20.0, -20.0]]),  # all empty: kept, equal, zero advantage
        ([[-2.0, -3.0]], [[F, F]], 1.0, [[-2.0, -3.0]]),  # nothing empty: unchanged
        ([[-1.0, -20.0], [-5.0, -20.0]], [[F, T], [F, T]], 0.5, [[-1.0, -1.5], [-5.0, -5.5]]),  # per group
        ([[0.0, NAN]], [[F, T]], 1.0, [[0.0, -1.0]]),  # whatever the empty slot held is replaced
        ([[-1e12, -20.0]], [[F, T]], 1.0, [[-1e12, -1e12 - 1.0]]),  # huge magnitudes: exact in float64
    ],
)
def test_floor_empty_rewards_cases(
    rewards: list[list[float]], empty: list[list[bool]], margin: float, expected: list[list[float]]
) -> None:
    rewards_P_G = torch.tensor(rewards, dtype=torch.float64)
    floored_P_G = floor_empty_rewards(rewards_P_G, torch.tensor(empty), margin=margin)
    torch.testing.assert_close(floored_P_G, torch.tensor(expected, dtype=torch.float64))


def test_floor_empty_rewards_empty_batch() -> None:
    rewards_P_G = torch.zeros(0, 4)
    assert floor_empty_rewards(rewards_P_G, torch.zeros(0, 4, dtype=torch.bool), margin=1.0).shape == (0, 4)


def test_floor_keeps_the_other_completions_advantages_full_size() -> None:
    # Group of -mean NLLs [-2, -3, -4] and one empty completion. Unbiased std, eps 0 here:
    #   fixed -20: mean -7.25, std sqrt((5.25^2 + 4.25^2 + 3.25^2 + 12.75^2) / 3) = sqrt(72.9167),
    #     so -2 vs -4 differ by 2 / 8.5391 = 0.23 in advantage;
    #   floor -4 - 1 = -5: mean -3.5, std sqrt((1.5^2 + 0.5^2 + 0.5^2 + 1.5^2) / 3) = sqrt(5/3),
    #     so they differ by 2 / 1.2910 = 1.55, about 6.6x more.
    rewards_P_G = torch.tensor([[-2.0, -3.0, -4.0, -20.0]], dtype=torch.float64)
    empty_P_G = torch.tensor([[F, F, F, T]])
    fixed_P_G = group_normalize(rewards_P_G, eps=0.0, scale_rewards="group")
    floored_rewards_P_G = floor_empty_rewards(rewards_P_G, empty_P_G, margin=1.0)
    floored_P_G = group_normalize(floored_rewards_P_G, eps=0.0, scale_rewards="group")
    torch.testing.assert_close(
        fixed_P_G[0, 0] - fixed_P_G[0, 2], torch.tensor(2 / (218.75 / 3) ** 0.5, dtype=torch.float64)
    )
    torch.testing.assert_close(
        floored_P_G[0, 0] - floored_P_G[0, 2], torch.tensor(2 / (5 / 3) ** 0.5, dtype=torch.float64)
    )


# --- supervised, answer_perplexity: coverage * likelihood of the answer ------------------------


@pytest.mark.parametrize(
    ("nll", "mask", "completion_len", "answer_len", "score", "expected"),
    [
        ([LN2, LN2], [T, T], 2, 2, "arithmetic", 0.5),  # p = 0.5, 0.5; full coverage
        ([LN2, LN2], [T, T], 2, 2, "geometric", 0.5),  # equal p: both means agree
        ([0.0, LN4], [T, T], 2, 2, "arithmetic", 0.625),  # mean(1, 0.25)
        ([0.0, LN4], [T, T], 2, 2, "geometric", 0.5),  # exp(-ln4 / 2) = 1/2 = 1/perplexity
        ([0.0, 0.0], [T, T], 1, 2, "arithmetic", 0.5),  # half coverage halves a certain answer
        ([0.0, 0.0], [T, T], 1, 2, "geometric", 0.5),  # same for geometric
        ([0.0, 0.0], [T, T], 5, 2, "arithmetic", 1.0),  # coverage is capped at 1
        ([LN2, LN2], [T, T], 0, 2, "arithmetic", 0.0),  # empty completion: coverage 0
        ([LN2, LN2], [T, T], 0, 2, "geometric", 0.0),  # empty completion: coverage 0
        ([0.0, INF], [T, F], 1, 1, "arithmetic", 1.0),  # inf padding is not read
        ([0.0, INF], [T, F], 1, 1, "geometric", 1.0),  # inf padding is not read
        ([0.0, 0.0], [F, F], 2, 2, "arithmetic", 0.0),  # no answer token scored: no evidence
        ([0.0, 0.0], [F, F], 2, 2, "geometric", 0.0),  # no answer token scored: no evidence
    ],
)
def test_answer_perplexity_cases(
    nll: list[float],
    mask: list[bool],
    completion_len: int,
    answer_len: int,
    score: str,
    expected: float,
) -> None:
    rewards_N = answer_perplexity_rewards(_row(nll), _mask(mask), _lens(completion_len), _lens(answer_len), score=score)
    torch.testing.assert_close(rewards_N, _row([expected])[0])


def test_answer_perplexity_rejects_empty_answer() -> None:
    with pytest.raises(AssertionError):
        answer_perplexity_rewards(_row([0.0]), _mask([F]), _lens(1), _lens(0), score="arithmetic")


NLLS = st.lists(st.floats(0.0, 30.0), min_size=1, max_size=8)


@settings(deadline=None)
@given(nll=NLLS, score=st.sampled_from(SCORES))
def test_answer_perplexity_never_decreases_with_coverage(nll: list[float], score: str) -> None:
    # The same answer NLLs scored after completions of length 0 .. 2 * answer_len.
    answer_len = len(nll)
    completion_lens_N = torch.arange(2 * answer_len + 1)
    n = completion_lens_N.shape[0]
    rewards_N = answer_perplexity_rewards(
        _row(nll).expand(n, -1),
        torch.ones(n, answer_len, dtype=torch.bool),
        completion_lens_N,
        torch.full((n,), answer_len),
        score=score,
    )
    assert rewards_N[0] == 0.0  # the empty completion scores the minimum
    assert bool((rewards_N.diff() >= 0).all()), rewards_N
    assert bool(((rewards_N >= 0) & (rewards_N <= 1)).all()), rewards_N


@settings(deadline=None)
@given(
    nll_and_increase=NLLS.flatmap(
        lambda nll: st.tuples(st.just(nll), st.lists(st.floats(0.0, 30.0), min_size=len(nll), max_size=len(nll)))
    ),
    completion_len=st.integers(0, 10),
    score=st.sampled_from(SCORES),
)
def test_answer_perplexity_never_increases_with_nll(
    nll_and_increase: tuple[list[float], list[float]], completion_len: int, score: str
) -> None:
    nll, increase = nll_and_increase
    worse_nll = [x + d for x, d in zip(nll, increase, strict=True)]
    answer_nll_N_T = torch.tensor([nll, worse_nll], dtype=torch.float64)
    rewards_N = answer_perplexity_rewards(
        answer_nll_N_T,
        torch.ones_like(answer_nll_N_T, dtype=torch.bool),
        _lens(completion_len, completion_len),
        _lens(len(nll), len(nll)),
        score=score,
    )
    assert rewards_N[1] <= rewards_N[0], rewards_N


# --- supervised, completion_cross_entropy: completion position t against answer token t ---------


@pytest.mark.parametrize(
    ("ce", "covered", "answer_len", "score", "expected"),
    [
        ([0.0, 0.0], [T, T], 2, "arithmetic", 1.0),  # the answer, certainly: the maximum
        ([0.0, 0.0], [T, T], 2, "geometric", 1.0),  # the answer, certainly: the maximum
        ([0.0, LN2], [T, T], 2, "arithmetic", 0.75),  # (1 + 0.5) / 2
        ([0.0, LN2], [T, T], 2, "geometric", 2**-0.5),  # exp(-(0 + ln2) / 2)
        ([0.0, 9.0], [T, F], 2, "arithmetic", 0.5),  # one of two answer tokens covered
        ([0.0, 9.0], [T, F], 2, "geometric", 0.5),  # coverage 1/2 times exp(-0)
        ([LN2, LN2, 0.0], [T, T, F], 4, "arithmetic", 0.25),  # (0.5 + 0.5) / 4
        ([LN2, LN2, 0.0], [T, T, F], 4, "geometric", 0.25),  # 2/4 * exp(-ln2)
        ([0.0, 0.0], [F, F], 2, "arithmetic", 0.0),  # empty completion: nothing covered
        ([0.0, 0.0], [F, F], 2, "geometric", 0.0),  # empty completion: no mean of nothing
        ([0.0, INF], [T, F], 2, "geometric", 0.5),  # inf padding is not read
        ([0.0, 100.0], [T, F], 2, "geometric", 0.5),  # geometric: 1 good of 2 tokens ...
        ([0.0, 100.0], [T, T], 2, "geometric", math.exp(-50.0)),  # ... beats 1 good + 1 awful
        ([0.0, 100.0], [T, T], 2, "arithmetic", (1 + math.exp(-100.0)) / 2),  # arithmetic: never
    ],
)
def test_completion_cross_entropy_cases(
    ce: list[float], covered: list[bool], answer_len: int, score: str, expected: float
) -> None:
    rewards_N = completion_cross_entropy_rewards(_row(ce), _mask(covered), _lens(answer_len), score=score)
    torch.testing.assert_close(rewards_N, _row([expected])[0])


def test_completion_cross_entropy_rejects_covering_past_the_answer() -> None:
    with pytest.raises(AssertionError):
        completion_cross_entropy_rewards(_row([0.0, 0.0]), _mask([T, T]), _lens(1), score="arithmetic")


CES = st.lists(st.floats(0.0, 10.0), min_size=1, max_size=8)


def _prefix_rewards(ce: list[float], answer_len: int, score: str) -> torch.Tensor:
    # Prefix c of the completion covers its first min(c, answer_len) positions.
    n = len(ce) + 1
    covered_N_T = torch.zeros(n, len(ce), dtype=torch.bool)
    for c in range(n):
        covered_N_T[c, : min(c, answer_len)] = True
    return completion_cross_entropy_rewards(
        _row(ce).expand(n, -1), covered_N_T, torch.full((n,), answer_len), score=score
    )


@settings(deadline=None)
@given(ce=CES, answer_len=st.integers(1, 10))
def test_completion_cross_entropy_prefixes_never_decrease(ce: list[float], answer_len: int) -> None:
    # Arithmetic only: each extra covered position adds exp(-ce) >= 0 over a fixed answer_len.
    # (Geometric is not monotone; see the hand cases above.)
    rewards_N = _prefix_rewards(ce, answer_len, "arithmetic")
    assert rewards_N[0] == 0.0  # the empty completion scores the minimum
    assert bool((rewards_N.diff() >= 0).all()), rewards_N


@settings(deadline=None)
@given(ce=CES, answer_len=st.integers(1, 10), score=st.sampled_from(SCORES))
def test_completion_cross_entropy_bounds(ce: list[float], answer_len: int, score: str) -> None:
    # Every prefix scores in [0, 1]; the empty one scores exactly 0; past the answer, nothing moves.
    rewards_N = _prefix_rewards(ce, answer_len, score)
    assert rewards_N[0] == 0.0
    assert bool(((rewards_N >= 0) & (rewards_N <= 1)).all()), rewards_N
    at_answer_len = rewards_N[min(answer_len, len(ce))]
    assert bool((rewards_N[answer_len:] == at_answer_len).all()), rewards_N


@settings(deadline=None)
@given(
    ce_and_position=CES.flatmap(lambda ce: st.tuples(st.just(ce), st.integers(0, len(ce) - 1))),
    extra_answer=st.integers(0, 3),
    damage=st.floats(0.5, 10.0),
    score=st.sampled_from(SCORES),
)
def test_completion_cross_entropy_corruption_lowers_reward(
    ce_and_position: tuple[list[float], int], extra_answer: int, damage: float, score: str
) -> None:
    # Same length, every position covered; one position predicts its answer token worse.
    ce, position = ce_and_position
    corrupted = list(ce)
    corrupted[position] += damage
    ce_N_T = torch.tensor([ce, corrupted], dtype=torch.float64)
    answer_len = len(ce) + extra_answer
    rewards_N = completion_cross_entropy_rewards(
        ce_N_T, torch.ones_like(ce_N_T, dtype=torch.bool), _lens(answer_len, answer_len), score=score
    )
    assert rewards_N[1] < rewards_N[0], rewards_N
