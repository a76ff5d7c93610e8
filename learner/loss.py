"""The GRPO loss: clipped surrogate, importance sampling against the sampler, k3 KL to the reference.

One pure function of tensors. N sequences, T completion positions; every [N, T] tensor holds the
log-probability of the sampled token at that position, and mask_N_T marks completion tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from shared.config import LossConfig


@dataclass(frozen=True)
class LossInputs:
    """Per-token log-probabilities of the sampled completions, and one advantage per sequence."""

    learner_logprobs_N_T: Tensor
    """From the PEFT model now, with grad."""
    old_logprobs_N_T: Tensor
    """Learner logprobs at rollout time, detached; with one update per batch they equal
    learner_logprobs_N_T.detach()."""
    ref_logprobs_N_T: Tensor
    """From the reference: the base model with the adapter disabled."""
    sampler_logprobs_N_T: Tensor
    """From vLLM, which sampled the tokens."""
    advantages_N: Tensor
    """Group-normalized advantage of each sequence."""
    mask_N_T: Tensor
    """Bool, True at completion tokens."""


@dataclass(frozen=True)
class LossOutputs:
    """The loss to backpropagate and detached diagnostics (token means over masked tokens)."""

    loss: Tensor
    """Scalar, with grad."""
    kl_mean: float
    """Mean k3 KL to the reference."""
    clip_fraction: float
    """Fraction of tokens where the clipped term was strictly smaller and so was taken."""
    is_weight_mean: float
    """Mean importance weight over the masked tokens (a sequence-level weight counts once per token)."""
    sampler_gap: float
    """Mean |old - sampler| log-probability."""
    sampler_gap_M: Tensor
    """|old - sampler| at each of the M masked tokens, detached (for percentiles)."""
    is_weight_M: Tensor
    """The importance weight at each masked token, detached (for percentiles)."""
    clamped_tokens: int
    """Masked tokens where a log-ratio was clamped to +-max_log_ratio before exp."""
    num_tokens: int
    """Masked tokens in the batch (to weight micro-batches when accumulating)."""


def _check_shapes(inputs: LossInputs) -> None:
    shape = inputs.learner_logprobs_N_T.shape
    assert len(shape) == 2, f"logprobs must be [N, T], got {tuple(shape)}"
    others = {
        "old_logprobs_N_T": inputs.old_logprobs_N_T,
        "ref_logprobs_N_T": inputs.ref_logprobs_N_T,
        "sampler_logprobs_N_T": inputs.sampler_logprobs_N_T,
        "mask_N_T": inputs.mask_N_T,
    }
    for name, other in others.items():
        assert other.shape == shape, f"{name} is {tuple(other.shape)}, learner_logprobs_N_T is {tuple(shape)}"
    assert inputs.advantages_N.shape == shape[:1], (
        f"advantages_N is {tuple(inputs.advantages_N.shape)}, expected ({shape[0]},)"
    )
    assert inputs.mask_N_T.dtype == torch.bool, f"mask must be bool, got {inputs.mask_N_T.dtype}"


def grpo_loss(inputs: LossInputs, cfg: LossConfig, *, max_tokens: int | None = None) -> LossOutputs:
    """GRPO loss over the masked completion tokens.

    Per token, with r = exp(logp - old) and A the sequence's advantage:
      surrogate = min(r * A, clip(r, 1 - clip_eps_low, 1 + clip_eps_high) * A)
      w         = the importance weight, detached: corrects for vLLM's sampler differing from the
                  learner's rollout-time policy (and, with overlap, for the version it sampled).
                  cfg.importance_sampling, as TRL's vllm_importance_sampling_mode: token_*
                  exp(old - sampler) per token; sequence_* exp(sum of the sequence's old - sampler)
                  on each of its tokens; *_truncate min(weight, tis_cap); *_mask 0 where the weight
                  is above tis_cap. No bound when tis_cap is None.
      kl        = exp(ref - logp) - (ref - logp) - 1   (k3: >= 0, unbiased for KL(policy, ref))
    The log-ratios logp - old and old - sampler (and a sequence's sum of the latter, clamped per
    token) are clamped to +-max_log_ratio first, ref - logp only from above: k3's exp can overflow
    only there, and below (policy far above the reference) k3 ~ -(ref - logp) - 1 and its
    gradient 1 - exp(ref - logp) stay finite and must not vanish.
      loss_t    = -w * surrogate + beta * kl
    Aggregation (see LossConfig.aggregation): "token_mean" (DAPO) divides the sum over all masked
    tokens by their number; "sequence_mean" (GRPO) takes each sequence's masked mean, then the mean
    over sequences with at least one token; "token_sum" (Dr. GRPO) divides the sum over all masked
    tokens by the constant N * max_tokens, so no token's weight depends on any completion's
    length. A batch with no masked token gives a loss of exactly 0 that still backpropagates
    (zero gradient). Values at masked-out positions are never read, so padding may hold anything.

    Args:
        inputs: Log-probabilities, advantages and mask, shapes asserted here.
        cfg: Clip range, KL weight, aggregation, importance sampling mode and its cap.
        max_tokens: The longest completion the sampler could return (sampling.max_tokens), the
            constant of "token_sum", which needs it; the other aggregations ignore it.

    Returns:
        The loss and its diagnostics.
    """
    _check_shapes(inputs)
    mask_N_T = inputs.mask_N_T
    # Zero the padding before any exp: an inf there would turn into NaN in the gradient even
    # behind a mask (0 * inf). where() passes no gradient to the replaced positions.
    learner_N_T = torch.where(mask_N_T, inputs.learner_logprobs_N_T, 0.0)
    # Old, reference and sampler logprobs are constants of the objective.
    old_N_T = torch.where(mask_N_T, inputs.old_logprobs_N_T.detach(), 0.0)
    ref_N_T = torch.where(mask_N_T, inputs.ref_logprobs_N_T.detach(), 0.0)
    sampler_N_T = torch.where(mask_N_T, inputs.sampler_logprobs_N_T.detach(), 0.0)
    advantages_N_1 = inputs.advantages_N.detach().unsqueeze(1)

    # Log-ratios are clamped before exp: one overflow would make the loss inf and skip the step.
    # The KL's only from above: a clamp below would zero its gradient on the tokens that have
    # drifted furthest above the reference, where exp(ref - logp) -> 0 cannot overflow.
    bound = cfg.max_log_ratio
    log_ratio_N_T = learner_N_T - old_N_T
    log_is_N_T = old_N_T - sampler_N_T
    log_ratio_ref_N_T = ref_N_T - learner_N_T
    clamped_N_T = (log_ratio_N_T.abs() > bound) | (log_is_N_T.abs() > bound) | (log_ratio_ref_N_T > bound)
    log_ratio_N_T, log_is_N_T = (x.clamp(-bound, bound) for x in (log_ratio_N_T, log_is_N_T))
    log_ratio_ref_N_T = log_ratio_ref_N_T.clamp(max=bound)

    ratio_N_T = torch.exp(log_ratio_N_T)
    unclipped_N_T = ratio_N_T * advantages_N_1
    clipped_N_T = ratio_N_T.clamp(1 - cfg.clip_eps_low, 1 + cfg.clip_eps_high) * advantages_N_1
    surrogate_N_T = torch.minimum(unclipped_N_T, clipped_N_T)

    if cfg.importance_sampling in ("sequence_truncate", "sequence_mask"):
        # Padding holds 0, so the sum is over the completion's tokens. Clamped again: tokens within
        # the bound one by one can sum past it; the whole sequence then counts as clamped.
        log_is_N_1 = log_is_N_T.sum(dim=1, keepdim=True)
        clamped_N_T = clamped_N_T | (log_is_N_1.abs() > bound)
        log_is_N_T = log_is_N_1.clamp(-bound, bound).expand_as(log_is_N_T)
    is_weight_N_T = torch.exp(log_is_N_T)
    if cfg.tis_cap is not None and cfg.importance_sampling in ("token_truncate", "sequence_truncate"):
        is_weight_N_T = is_weight_N_T.clamp(max=cfg.tis_cap)
    elif cfg.tis_cap is not None:
        is_weight_N_T = torch.where(is_weight_N_T > cfg.tis_cap, 0.0, is_weight_N_T)

    kl_N_T = torch.exp(log_ratio_ref_N_T) - log_ratio_ref_N_T - 1

    per_token_N_T = torch.where(mask_N_T, -is_weight_N_T * surrogate_N_T + cfg.beta * kl_N_T, 0.0)
    tokens_N = mask_N_T.sum(dim=1)
    num_tokens = int(tokens_N.sum())
    if cfg.aggregation == "token_mean":
        loss = per_token_N_T.sum() / max(num_tokens, 1)
    elif cfg.aggregation == "token_sum":
        assert max_tokens is not None, "token_sum divides by N * max_tokens: give LossInputs.max_tokens"
        assert not bool((tokens_N > max_tokens).any()), f"a completion is longer than max_tokens={max_tokens}"
        loss = per_token_N_T.sum() / max(tokens_N.shape[0] * max_tokens, 1)
    else:
        sequence_means_N = per_token_N_T.sum(dim=1) / tokens_N.clamp(min=1)
        loss = sequence_means_N.sum() / max(int((tokens_N > 0).sum()), 1)
    # The clipped term differs from the unclipped one and the min took it: no gradient flows there.
    clipped_taken_N_T = (clipped_N_T < unclipped_N_T).to(kl_N_T.dtype)
    return LossOutputs(
        loss=loss,
        kl_mean=_token_mean(kl_N_T, mask_N_T),
        clip_fraction=_token_mean(clipped_taken_N_T, mask_N_T),
        is_weight_mean=_token_mean(is_weight_N_T, mask_N_T),
        sampler_gap=_token_mean((old_N_T - sampler_N_T).abs(), mask_N_T),
        sampler_gap_M=(old_N_T - sampler_N_T).abs()[mask_N_T].detach(),
        is_weight_M=is_weight_N_T[mask_N_T].detach(),
        clamped_tokens=int((clamped_N_T & mask_N_T).sum()),
        num_tokens=num_tokens,
    )


def _token_mean(values_N_T: Tensor, mask_N_T: Tensor) -> float:
    """Detached mean over the masked tokens; 0.0 when there are none."""
    total = float(torch.where(mask_N_T, values_N_T.detach(), 0.0).sum())
    return total / max(int(mask_N_T.sum()), 1)
