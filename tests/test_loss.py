"""GRPO loss, one regime per test, against hand-derived values (float64 throughout)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from learner.loss import LossInputs, grpo_loss
from shared.config import LossConfig

E = math.e
LN2 = math.log(2.0)
# Asymmetric clip range, so a swapped low/high shows: ratio clipped to [0.9, 1.3].
ASYMMETRIC = LossConfig(clip_eps_low=0.1, clip_eps_high=0.3, beta=0.0, tis_cap=2.0)


def _t(values: list) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def _inputs(
    *,
    log_ratio: list,
    advantages: list[float],
    ref_minus_learner: list | None = None,
    old_minus_sampler: list | None = None,
    mask: list | None = None,
) -> tuple[LossInputs, torch.Tensor]:
    """Inputs around fixed old logprobs: learner = old + log_ratio, ref = learner +
    ref_minus_learner (default 0: no KL), sampler = old - old_minus_sampler (default 0: w = 1)."""
    log_ratio_N_T = _t(log_ratio)
    old_N_T = torch.linspace(-3.0, -0.5, log_ratio_N_T.numel(), dtype=torch.float64)
    old_N_T = old_N_T.reshape(log_ratio_N_T.shape)
    learner_N_T = (old_N_T + log_ratio_N_T).requires_grad_()
    zeros_N_T = torch.zeros_like(old_N_T)
    ref_N_T = learner_N_T.detach() + (zeros_N_T if ref_minus_learner is None else _t(ref_minus_learner))
    sampler_N_T = old_N_T - (zeros_N_T if old_minus_sampler is None else _t(old_minus_sampler))
    mask_N_T = torch.ones_like(old_N_T, dtype=torch.bool) if mask is None else torch.tensor(mask)
    inputs = LossInputs(
        learner_logprobs_N_T=learner_N_T,
        old_logprobs_N_T=old_N_T,
        ref_logprobs_N_T=ref_N_T,
        sampler_logprobs_N_T=sampler_N_T,
        advantages_N=_t(advantages),
        mask_N_T=mask_N_T,
    )
    return inputs, learner_N_T


def test_clipped_high() -> None:
    # log ratio 1: ratio will be [e, e, e] > 1.3. A = 1 > 0, so min(e * 1, 1.3 * 1) = 1.3.
    # loss = -1.3; every token clipped, and the clipped branch passes no gradient.
    inputs, learner_N_T = _inputs(log_ratio=[[1.0, 1.0, 1.0]], advantages=[1.0])
    out = grpo_loss(inputs, ASYMMETRIC)
    out.loss.backward()
    torch.testing.assert_close(out.loss, _t(-1.3))
    assert out.clip_fraction == 1.0
    torch.testing.assert_close(learner_N_T.grad, torch.zeros_like(learner_N_T))


def test_clipped_low() -> None:
    # log ratio -1: ratio will be [1/e, 1/e] ~ 0.37 < 0.9. A = -1 < 0:
    # min(0.37 * -1, 0.9 * -1) = -0.9, so loss = 0.9; every token clipped, no gradient.
    inputs, learner_N_T = _inputs(log_ratio=[[-1.0, -1.0]], advantages=[-1.0])
    out = grpo_loss(inputs, ASYMMETRIC)
    out.loss.backward()
    torch.testing.assert_close(out.loss, _t(0.9))
    assert out.clip_fraction == 1.0
    torch.testing.assert_close(learner_N_T.grad, torch.zeros_like(learner_N_T))


def test_unclipped() -> None:
    # One token per row, with the default clip range [0.8, 1.2]:
    #   ratio 1.1, A = 2:   inside the range                    -> surrogate 2.2
    #   ratio e,   A = -1:  min(-e, -1.2) = -e (pessimistic)    -> surrogate -e
    #   ratio 1/e, A = 1:   min(1/e, 0.8) = 1/e (pessimistic)   -> surrogate 1/e
    # token_mean loss = -(2.2 - e + 1/e) / 3; the min never took a clipped term.
    inputs, _ = _inputs(log_ratio=[[math.log(1.1)], [1.0], [-1.0]], advantages=[2.0, -1.0, 1.0])
    out = grpo_loss(inputs, LossConfig(beta=0.0))
    torch.testing.assert_close(out.loss, _t(-(2.2 - E + 1 / E) / 3))
    assert out.clip_fraction == 0.0


def test_unclipped_gradient() -> None:
    # loss_t = -w * r * A + beta * k3, r = exp(logp - old), k3 = exp(ref - logp) - (ref - logp) - 1
    # d r / d logp = r;  d k3 / d logp = 1 - exp(ref - logp);  token_mean divides by 2 tokens.
    # w = exp(ln 1.5) = 1.5 (under the cap 2), beta = 0.1:
    #   row 0: r = 1.1, A = 2,  ref - logp = ln2:  grad = (-1.5*1.1*2 + 0.1*(1 - 2)) / 2 = -1.7
    #   row 1: r = e,   A = -1, ref - logp = -ln2: grad = (1.5*e + 0.1*(1 - 0.5)) / 2
    # loss = (-3.3 + 0.1*(1 - ln2) + 1.5*e + 0.1*(ln2 - 0.5)) / 2 = (-3.3 + 1.5*e + 0.05) / 2
    inputs, learner_N_T = _inputs(
        log_ratio=[[math.log(1.1)], [1.0]],
        advantages=[2.0, -1.0],
        ref_minus_learner=[[LN2], [-LN2]],
        old_minus_sampler=[[math.log(1.5)], [math.log(1.5)]],
    )
    out = grpo_loss(inputs, LossConfig(beta=0.1, tis_cap=2.0))
    out.loss.backward()
    torch.testing.assert_close(out.loss, _t((-3.3 + 1.5 * E + 0.05) / 2))
    torch.testing.assert_close(learner_N_T.grad, _t([[-1.7], [(1.5 * E + 0.05) / 2]]))


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean", "token_sum"])
def test_all_masked(aggregation: str) -> None:
    # No completion token at all; the padding holds garbage that must not leak.
    inf, nan = math.inf, math.nan
    inputs, learner_N_T = _inputs(
        log_ratio=[[inf, nan], [-inf, 0.0]],
        advantages=[1.0, -1.0],
        ref_minus_learner=[[nan, inf], [-inf, 1.0]],
        old_minus_sampler=[[-inf, inf], [nan, 1.0]],
        mask=[[False, False], [False, False]],
    )
    out = grpo_loss(inputs, LossConfig(aggregation=aggregation), max_tokens=2)
    out.loss.backward()
    assert out.loss.item() == 0.0
    assert out.num_tokens == 0
    assert (out.kl_mean, out.clip_fraction, out.is_weight_mean, out.sampler_gap) == (0, 0, 0, 0)
    assert learner_N_T.grad is not None
    assert torch.equal(learner_N_T.grad, torch.zeros_like(learner_N_T))


def test_padding_does_not_leak() -> None:
    # Same real tokens as a clean batch (r = 1, A = 1 -> loss -1); the padded slot holds inf/NaN.
    inf, nan = math.inf, math.nan
    inputs, learner_N_T = _inputs(
        log_ratio=[[0.0, inf]],
        advantages=[1.0],
        ref_minus_learner=[[0.0, nan]],
        old_minus_sampler=[[0.0, -inf]],
        mask=[[True, False]],
    )
    out = grpo_loss(inputs, LossConfig())
    out.loss.backward()
    torch.testing.assert_close(out.loss, _t(-1.0))
    torch.testing.assert_close(learner_N_T.grad, _t([[-1.0, 0.0]]))


def test_zero_advantage_leaves_only_kl() -> None:
    # A = 0: the surrogate is 0 whatever the ratio (here e, which would clip), and no token
    # counts as clipped. k3 at ref - logp = ln2 is 2 - ln2 - 1, at -ln2 it is 1/2 + ln2 - 1;
    # their mean is 1/4, so loss = beta * 1/4 = 0.025.
    inputs, _ = _inputs(log_ratio=[[1.0, 1.0]], advantages=[0.0], ref_minus_learner=[[LN2, -LN2]])
    out = grpo_loss(inputs, LossConfig(beta=0.1))
    torch.testing.assert_close(out.loss, _t(0.025))
    torch.testing.assert_close(out.kl_mean, 0.25)
    assert out.clip_fraction == 0.0


def test_k3_kl() -> None:
    # k3 = exp(d) - d - 1 with d = ref - logp:
    #   d = ln2  -> 2 - ln2 - 1   = 1 - ln2
    #   d = -ln2 -> 1/2 + ln2 - 1 = ln2 - 1/2
    #   d = 0    -> 0
    # mean = (1/2) / 3 = 1/6. d k3 / d logp = 1 - exp(d) = [-1, 1/2, 0], over 3 tokens, beta 1:
    # the gradient pulls logp toward the reference from both sides.
    inputs, learner_N_T = _inputs(log_ratio=[[0.0, 0.0, 0.0]], advantages=[0.0], ref_minus_learner=[[LN2, -LN2, 0.0]])
    out = grpo_loss(inputs, LossConfig(beta=1.0))
    out.loss.backward()
    torch.testing.assert_close(out.kl_mean, 1 / 6)
    torch.testing.assert_close(out.loss, _t(1 / 6))
    torch.testing.assert_close(learner_N_T.grad, _t([[-1 / 3, 1 / 6, 0.0]]))


@pytest.mark.parametrize(
    ("aggregation", "expected"),
    [
        # per-token loss = -A (r = 1, w = 1, beta = 0): row 0 has [-4], row 1 has [0, 0, 0],
        # row 2 has no token. token_mean: (-4 + 0 + 0 + 0) / 4 = -1.
        ("token_mean", -1.0),
        # sequence_mean: row means [-4, 0] over the 2 rows with tokens = -2 (not -4/3 over 3).
        ("sequence_mean", -2.0),
        # token_sum: (-4 + 0 + 0 + 0) / (3 rows * max_tokens 4) = -1/3; the empty row counts.
        ("token_sum", -1 / 3),
    ],
)
def test_aggregation_on_unequal_lengths(aggregation: str, expected: float) -> None:
    inputs, _ = _inputs(
        log_ratio=[[0.0, 0.0, 0.0]] * 3,
        advantages=[4.0, 0.0, 7.0],
        mask=[[True, False, False], [True, True, True], [False, False, False]],
    )
    out = grpo_loss(inputs, LossConfig(beta=0.0, aggregation=aggregation), max_tokens=4)
    torch.testing.assert_close(out.loss, _t(expected))
    assert out.num_tokens == 4


@pytest.mark.parametrize(
    ("aggregation", "grad"),
    [
        # r = 1, A = 1, beta = 0: per-token loss -r, d/dlogp = -1 before aggregation. Rows of 1
        # and 3 tokens, max_tokens 4.
        # token_mean (DAPO): every token weighs 1 / 4 tokens in the batch.
        ("token_mean", [[-1 / 4, 0.0, 0.0], [-1 / 4, -1 / 4, -1 / 4]]),
        # sequence_mean (GRPO): 1 / (2 rows * its length): the short row's token weighs 3x more.
        ("sequence_mean", [[-1 / 2, 0.0, 0.0], [-1 / 6, -1 / 6, -1 / 6]]),
        # token_sum (Dr. GRPO): 1 / (2 rows * max_tokens 4), a constant: lengths change nothing.
        ("token_sum", [[-1 / 8, 0.0, 0.0], [-1 / 8, -1 / 8, -1 / 8]]),
    ],
)
def test_token_weight_by_aggregation(aggregation: str, grad: list) -> None:
    inputs, learner_N_T = _inputs(
        log_ratio=[[0.0, 0.0, 0.0]] * 2,
        advantages=[1.0, 1.0],
        mask=[[True, False, False], [True, True, True]],
    )
    out = grpo_loss(inputs, LossConfig(beta=0.0, aggregation=aggregation), max_tokens=4)
    out.loss.backward()
    torch.testing.assert_close(learner_N_T.grad, _t(grad))


def test_token_sum_needs_max_tokens_at_least_every_length() -> None:
    # No normaliser given, or a completion longer than max_tokens (the constant would be wrong).
    for max_tokens in (None, 2):
        inputs, _ = _inputs(log_ratio=[[0.0, 0.0, 0.0]], advantages=[1.0])
        with pytest.raises(AssertionError):
            grpo_loss(inputs, LossConfig(aggregation="token_sum"), max_tokens=max_tokens)


@pytest.mark.parametrize(
    ("tis_cap", "weights"),
    [
        (2.0, [2.0, 1.5]),  # exp(ln3) = 3 is capped at 2; exp(ln1.5) = 1.5 is under the cap
        (None, [3.0, 1.5]),  # no cap: the raw importance weights
    ],
)
def test_token_truncate_importance_weight(tis_cap: float | None, weights: list[float]) -> None:
    # r = 1, A = 1, beta = 0: per-token loss = -w; loss = -mean(w); grad = -w / 2 (w is constant).
    gaps = [math.log(3.0), math.log(1.5)]
    inputs, learner_N_T = _inputs(log_ratio=[[0.0, 0.0]], advantages=[1.0], old_minus_sampler=[gaps])
    out = grpo_loss(inputs, LossConfig(beta=0.0, tis_cap=tis_cap, importance_sampling="token_truncate"))
    out.loss.backward()
    torch.testing.assert_close(out.loss, _t(-sum(weights) / 2))
    torch.testing.assert_close(out.is_weight_mean, sum(weights) / 2)
    torch.testing.assert_close(out.sampler_gap, sum(gaps) / 2)
    torch.testing.assert_close(learner_N_T.grad, _t([[-w / 2 for w in weights]]))


def test_token_mask_importance_weight() -> None:
    # The tokens of test_token_truncate_importance_weight, cap 2: exp(ln3) = 3 > 2 is set to 0 (not
    # to 2), 1.5 is kept. r = 1, A = 1, beta = 0: loss = -(0 + 1.5) / 2 = -0.75, grad = -w / 2.
    gaps = [math.log(3.0), math.log(1.5)]
    inputs, learner_N_T = _inputs(log_ratio=[[0.0, 0.0]], advantages=[1.0], old_minus_sampler=[gaps])
    out = grpo_loss(inputs, LossConfig(beta=0.0, tis_cap=2.0, importance_sampling="token_mask"))
    out.loss.backward()
    torch.testing.assert_close(out.loss, _t(-0.75))
    torch.testing.assert_close(out.is_weight_M, _t([0.0, 1.5]))
    torch.testing.assert_close(learner_N_T.grad, _t([[0.0, -0.75]]))


# Three sequences of two completion tokens each; the third position is padding, and row 0's holds a
# gap of 50 that must not enter its sum. Sequence log-ratios, sum of old - sampler over the tokens:
#   row 0: ln1.5 + ln1.2 = ln1.8   -> 1.8 (under the cap 2)
#   row 1: ln3 - ln2     = ln1.5   -> 1.5 (token-level, its first token alone would be 3, over the cap)
#   row 2: ln2 + ln2     = ln4     -> 4   (over the cap)
SEQUENCE_GAPS = [[math.log(1.5), math.log(1.2), 50.0], [math.log(3.0), -LN2, 0.0], [LN2, LN2, 0.0]]
SEQUENCE_MASK = [[True, True, False]] * 3


def test_sequence_truncate_importance_weight() -> None:
    # Each sequence's weight, capped at 2, on each of its tokens: [1.8, 1.5, 2]. r = 1, A = 1,
    # beta = 0: per-token loss = -w; token_mean over 6 tokens: -(2*1.8 + 2*1.5 + 2*2) / 6 = -10.6 / 6,
    # grad = -w / 6.
    inputs, learner_N_T = _inputs(
        log_ratio=[[0.0] * 3] * 3, advantages=[1.0] * 3, old_minus_sampler=SEQUENCE_GAPS, mask=SEQUENCE_MASK
    )
    out = grpo_loss(inputs, LossConfig(beta=0.0, tis_cap=2.0, importance_sampling="sequence_truncate"))
    out.loss.backward()
    torch.testing.assert_close(out.loss, _t(-10.6 / 6))
    torch.testing.assert_close(out.is_weight_M, _t([1.8, 1.8, 1.5, 1.5, 2.0, 2.0]))
    torch.testing.assert_close(
        learner_N_T.grad, _t([[-w / 6 for w in (1.8, 1.8, 0.0)], [-1.5 / 6] * 2 + [0.0]] + [[-2 / 6] * 2 + [0.0]])
    )


def test_sequence_mask_importance_weight_is_the_default() -> None:
    # TRL's default (vllm_importance_sampling_mode="sequence_mask"): a sequence whose weight is over
    # the cap (2, the default) gets weight 0 on all its tokens: [1.8, 1.5, 0]. loss =
    # -(2*1.8 + 2*1.5 + 0) / 6 = -1.1; row 2 gets no gradient.
    inputs, learner_N_T = _inputs(
        log_ratio=[[0.0] * 3] * 3, advantages=[1.0] * 3, old_minus_sampler=SEQUENCE_GAPS, mask=SEQUENCE_MASK
    )
    out = grpo_loss(inputs, LossConfig(beta=0.0))
    out.loss.backward()
    torch.testing.assert_close(out.loss, _t(-1.1))
    torch.testing.assert_close(out.is_weight_M, _t([1.8, 1.8, 1.5, 1.5, 0.0, 0.0]))
    torch.testing.assert_close(learner_N_T.grad, _t([[-1.8 / 6] * 2 + [0.0], [-1.5 / 6] * 2 + [0.0], [0.0] * 3]))


def test_sequence_log_ratio_is_clamped_and_counted() -> None:
    # Tokens of gap 15 are under max_log_ratio 20 one by one, but their sum, 30, is not: the
    # sequence's log-ratio is clamped to 20 (w = e^20, no cap), and both its tokens counted.
    # r = 1, A = 1, beta = 0: loss = -e^20 (the mean of two tokens of weight e^20).
    inputs, _ = _inputs(log_ratio=[[0.0, 0.0]], advantages=[1.0], old_minus_sampler=[[15.0, 15.0]])
    out = grpo_loss(inputs, LossConfig(beta=0.0, tis_cap=None, importance_sampling="sequence_truncate"))
    assert out.clamped_tokens == 2
    torch.testing.assert_close(out.loss, _t(-math.exp(20.0)))


def test_rejects_mismatched_shapes() -> None:
    inputs, _ = _inputs(log_ratio=[[0.0, 0.0]], advantages=[1.0])
    bad_advantages = dataclasses.replace(inputs, advantages_N=_t([1.0, 2.0]))
    bad_ref = dataclasses.replace(inputs, ref_logprobs_N_T=_t([[0.0, 0.0, 0.0]]))
    float_mask = dataclasses.replace(inputs, mask_N_T=_t([[1.0, 1.0]]))
    for bad in (bad_advantages, bad_ref, float_mask):
        with pytest.raises(AssertionError):
            grpo_loss(bad, LossConfig())


def test_extreme_log_ratios_are_clamped_and_counted() -> None:
    # Token 0: ref - logp = 100 would give k3 = exp(100) - 101 (~2.7e43; exp(800) in float32 is inf).
    # Clamped to 20: k3 = exp(20) - 20 - 1. Token 1: old - sampler = -50, clamped to -20, so
    # w = exp(-20). Token 2: nothing extreme. Two tokens clamped out of three.
    inputs, _ = _inputs(
        log_ratio=[[0.0, 0.0, 0.0]],
        advantages=[1.0],
        ref_minus_learner=[[100.0, 0.0, 0.0]],
        old_minus_sampler=[[0.0, -50.0, 0.0]],
    )
    out = grpo_loss(
        inputs, LossConfig(beta=1.0, tis_cap=None, max_log_ratio=20.0, importance_sampling="token_truncate")
    )
    assert out.clamped_tokens == 2
    k3 = math.exp(20.0) - 21.0
    # loss_t = -w * r * A + k3_t with r = 1, A = 1: (-1 + k3) + (-exp(-20)) + (-1), over 3 tokens
    torch.testing.assert_close(out.loss, _t((k3 - 2.0 - math.exp(-20.0)) / 3))
    torch.testing.assert_close(out.is_weight_M, _t([1.0, math.exp(-20.0), 1.0]))
    torch.testing.assert_close(out.sampler_gap_M, _t([0.0, 50.0, 0.0]))  # the gap itself is not clamped


def test_clamping_keeps_float32_finite() -> None:
    inputs, _ = _inputs(log_ratio=[[0.0, 0.0]], advantages=[1.0], ref_minus_learner=[[800.0, 0.0]])
    inputs = dataclasses.replace(
        inputs,
        **{f.name: getattr(inputs, f.name).float() for f in dataclasses.fields(inputs) if f.name != "mask_N_T"},
    )
    out = grpo_loss(inputs, LossConfig(beta=1.0))
    assert torch.isfinite(out.loss) and out.clamped_tokens == 1


def test_kl_keeps_its_gradient_far_above_the_reference() -> None:
    # Policy 21 and 25 nats above the reference: x = ref - logp = [-21, -25]. k3 = e^x - x - 1
    # cannot overflow for x < 0 (e^x <= 1), so nothing is clamped there:
    #   k3 = [e^-21 + 20, e^-25 + 24], mean (with beta 1, A 0: also the loss) = 22 + (e^-21 + e^-25) / 2.
    # d k3 / d logp = (e^x - 1) * dx/dlogp = 1 - e^x, over 2 tokens: [(1 - e^-21) / 2, (1 - e^-25) / 2],
    # pulling logp back down toward the reference (a clamp at -20 would make it 0 and the KL 19).
    inputs, learner_N_T = _inputs(log_ratio=[[0.0, 0.0]], advantages=[0.0], ref_minus_learner=[[-21.0, -25.0]])
    out = grpo_loss(inputs, LossConfig(beta=1.0, max_log_ratio=20.0))
    out.loss.backward()
    kl = 22.0 + (math.exp(-21.0) + math.exp(-25.0)) / 2
    torch.testing.assert_close(out.loss, _t(kl))
    torch.testing.assert_close(out.kl_mean, kl)
    torch.testing.assert_close(learner_N_T.grad, _t([[(1 - math.exp(-21.0)) / 2, (1 - math.exp(-25.0)) / 2]]))
    assert out.clamped_tokens == 0
