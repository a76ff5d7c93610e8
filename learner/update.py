"""One GRPO policy update: micro-batched forward/backward, gradient accumulation, one step."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from peft import PeftModel
from torch import Tensor

from learner.distributed import Distributed
from learner.logprobs import Sequence, scored_logprobs, scored_mask
from learner.loss import LossInputs, grpo_loss
from learner.quantiles import quantiles
from learner.reference import reference_weights
from shared.config import LearnerConfig


@dataclass(frozen=True)
class UpdateStats:
    """Batch-level figures of one update (token-weighted means over micro-batches)."""

    loss: float
    kl: float
    clip_fraction: float
    is_weight: float
    sampler_gap: float
    """Mean |learner - sampler| log-probability of the sampled tokens."""
    sampler_gap_p50: float
    """Median over the batch's tokens of |learner - sampler| log-probability."""
    sampler_gap_p99: float
    """99th percentile of the same: the tail a mean hides."""
    is_weight_p50: float
    """Median truncated importance weight."""
    is_weight_p99: float
    """99th percentile truncated importance weight."""
    is_masked: float
    """Fraction of tokens whose importance weight is 0: masked (loss.importance_sampling *_mask),
    as over the cap. Near 1, the sampler and the learner disagree and almost nothing trains."""
    clamped_tokens: int
    """Tokens whose log-ratios were clamped before exp (see LossConfig.max_log_ratio)."""
    grad_norm: float
    skipped: bool
    """True when a loss (on any rank) or the gradient norm was NaN/inf and no step was taken. After
    a non-finite loss, loss and grad_norm are not finite and the other figures cover the
    micro-batches done until then."""


AdvantagesFor = Callable[[slice, Tensor, Tensor], Tensor]
"""advantages_B of the micro-batch `part` of the N sequences, from its policy log-probabilities
(detached, [B, T]) and their mask: how rewards computed from the update's own forward join it."""


def policy_update(
    model: PeftModel,
    optimizer: torch.optim.Optimizer,
    prompt_ids_N: list[list[int]],
    completion_ids_N: list[list[int]],
    sampler_logprobs_N: list[list[float]],
    advantages_N: Tensor | AdvantagesFor,
    cfg: LearnerConfig,
    *,
    pad_id: int,
    ranks: Distributed = Distributed(),
) -> UpdateStats:
    """Accumulate the GRPO loss over micro-batches of the N sampled sequences and step once.

    `advantages_N` is given, or computed per micro-batch from the policy's log-probabilities of
    that micro-batch (`AdvantagesFor`; see learner.learn). Each micro-batch's loss is weighted by
    its share of the batch's normaliser (tokens for token_mean, non-empty sequences for
    sequence_mean, sequences for token_sum), so the accumulated gradient is that of the loss over
    the whole batch. A non-finite loss or gradient norm skips the step and leaves the weights as
    they were.

    Under torchrun, `ranks` says which rank this is and the N sequences are its shard of the
    step's (`ranks.shard` of the prompts, expanded to their groups). The normaliser is then the
    whole step's (summed over ranks), and the LoRA gradients are summed over ranks once, before
    clipping: every rank takes the step one process would take on the whole batch, and returns the
    whole batch's figures. A non-finite loss on any rank skips the step on every rank.
    """
    advantages_for = advantages_N if callable(advantages_N) else lambda part, *_: advantages_N[part]
    sequences = [Sequence.continuation(p, c) for p, c in zip(prompt_ids_N, completion_ids_N, strict=True)]
    mask_N_T = scored_mask(sequences)
    sampler_N_T = torch.zeros(mask_N_T.shape)
    sampler_N_T[mask_N_T] = torch.tensor([lp for row in sampler_logprobs_N for lp in row], dtype=torch.float32)
    tokens_global, units_global = ranks.sum_ints(
        [int(mask_N_T.sum()), _normaliser_units(mask_N_T, cfg.loss.aggregation)]
    )
    num_tokens = max(tokens_global, 1)
    total = max(units_global, 1)
    device = next(model.parameters()).device
    kwargs = {"temperature": cfg.sampling.temperature, "chunk_size": cfg.logprob_chunk_size, "pad_id": pad_id}

    optimizer.zero_grad(set_to_none=True)
    # Each rank's shares of the whole batch's figures: their sums over ranks are the batch's.
    sums = {"loss": 0.0, "kl": 0.0, "clip_fraction": 0.0, "is_weight": 0.0, "sampler_gap": 0.0}
    gaps_M, is_weights_M, clamped, finite = [], [], 0, True
    for start in range(0, len(sequences), cfg.micro_batch_size):
        part = slice(start, start + cfg.micro_batch_size)
        with torch.no_grad(), reference_weights(model):
            ref_logprobs_B_T = scored_logprobs(model, sequences[part], **kwargs)
        learner_logprobs_B_T = scored_logprobs(model, sequences[part], **kwargs)
        width = learner_logprobs_B_T.shape[1]
        out = grpo_loss(
            LossInputs(
                learner_logprobs_N_T=learner_logprobs_B_T,
                old_logprobs_N_T=learner_logprobs_B_T.detach(),  # one update per batch: ratio 1
                ref_logprobs_N_T=ref_logprobs_B_T,
                sampler_logprobs_N_T=sampler_N_T[part, :width].to(device),
                advantages_N=advantages_for(part, learner_logprobs_B_T.detach(), mask_N_T[part, :width]).to(device),
                mask_N_T=mask_N_T[part, :width].to(device),
            ),
            cfg.loss,
            max_tokens=cfg.sampling.max_tokens,
        )
        gaps_M.append(out.sampler_gap_M.float().cpu())
        is_weights_M.append(out.is_weight_M.float().cpu())
        clamped += out.clamped_tokens
        share = _normaliser_units(mask_N_T[part], cfg.loss.aggregation) / total
        weight = out.num_tokens / num_tokens  # diagnostics are token means
        sums["loss"] += out.loss.item() * share
        sums["kl"] += out.kl_mean * weight
        sums["clip_fraction"] += out.clip_fraction * weight
        sums["is_weight"] += out.is_weight_mean * weight
        sums["sampler_gap"] += out.sampler_gap * weight
        if not torch.isfinite(out.loss):
            finite = False
            break  # no rank will step: the rest of this shard is not needed
        (out.loss * share).backward()

    # No collective inside the loop: a rank that stopped early meets the others here, and every
    # rank then decides on the same sums.
    figures = dict(zip(sums, ranks.sum_floats(list(sums.values())), strict=True))
    clamped, ranks_not_finite = ranks.sum_ints([clamped, int(not finite)])
    gap_p50, gap_p99 = _percentiles(ranks.gather(_cat(gaps_M)))
    all_is_weights_M = ranks.gather(_cat(is_weights_M))
    is_p50, is_p99 = _percentiles(all_is_weights_M)
    is_masked = (all_is_weights_M == 0).float().mean().item() if all_is_weights_M.numel() else math.nan
    grad_norm = math.nan
    if ranks_not_finite == 0:
        params = [p for p in model.parameters() if p.requires_grad]
        _sum_gradients(params, ranks)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
    skipped = not math.isfinite(grad_norm)  # every rank has the same summed gradients, so decides the same
    if not skipped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return UpdateStats(
        **figures,
        sampler_gap_p50=gap_p50,
        sampler_gap_p99=gap_p99,
        is_weight_p50=is_p50,
        is_weight_p99=is_p99,
        is_masked=is_masked,
        clamped_tokens=clamped,
        grad_norm=grad_norm,
        skipped=skipped,
    )


def _sum_gradients(params: list[torch.nn.Parameter], ranks: Distributed) -> None:
    """Replace each parameter's gradient by its sum over the ranks, in one collective (nothing
    when alone). A rank whose shard gave a parameter no gradient adds zeros."""
    if ranks.world_size == 1:
        return
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
    summed_D = ranks.sum(torch.cat([g.flatten() for g in grads]))
    for p, piece in zip(params, summed_D.split([p.numel() for p in params]), strict=True):
        p.grad = piece.view_as(p).to(p.dtype)


def _normaliser_units(mask_B_T: Tensor, aggregation: str) -> int:
    """What `grpo_loss` divides a micro-batch's sum by, in units that add up over micro-batches:
    tokens (token_mean), non-empty sequences (sequence_mean), sequences (token_sum, whose
    max_tokens factor is the same in every micro-batch)."""
    if aggregation == "token_mean":
        return int(mask_B_T.sum())
    if aggregation == "sequence_mean":
        return int(mask_B_T.any(dim=1).sum())
    return mask_B_T.shape[0]


def _cat(pieces_M: list[Tensor]) -> Tensor:
    return torch.cat(pieces_M) if pieces_M else torch.zeros(0)


def _percentiles(values_M: Tensor) -> tuple[float, float]:
    """p50 and p99 of the token values (NaN when there are none): exact at any token count, where
    torch.quantile raises above 2^24."""
    p50, p99 = quantiles(values_M, [0.5, 0.99])
    return p50, p99
