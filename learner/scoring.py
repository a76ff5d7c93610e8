"""Rewards of sampled completions, computed under the current policy without gradients.

Completion tokens reach here without their trailing end-of-sequence token: a reward judges the
text, and "the completion is empty" must mean no text (the policy update, in contrast, trains
every sampled token, end-of-sequence included).
"""

from __future__ import annotations

import torch
from peft import PeftModel
from torch import Tensor

from learner.logprobs import Sequence, micro_batched_logprobs
from learner.rewards import answer_perplexity_rewards, completion_cross_entropy_rewards, unsupervised_rewards
from shared.config import LearnerConfig


def score(
    model: PeftModel,
    prompt_ids_P: list[list[int]],
    completion_ids_P_G: list[list[list[int]]],
    answer_ids_P: list[list[int]] | None,
    cfg: LearnerConfig,
    *,
    pad_id: int,
) -> Tensor:
    """rewards_P_G of every completion (text tokens only) under the policy, at temperature 1."""
    P, G = len(completion_ids_P_G), len(completion_ids_P_G[0])
    flat = [(p, c) for p in range(P) for c in completion_ids_P_G[p]]
    if cfg.mode == "unsupervised":
        sequences = [Sequence.continuation(prompt_ids_P[p], c) for p, c in flat]
    else:
        assert answer_ids_P is not None, "supervised scoring needs the answers"
        if cfg.reward == "answer_perplexity":
            # prompt ++ completion ++ answer, scored on the answer only.
            sequences = [Sequence.continuation(prompt_ids_P[p] + c, answer_ids_P[p]) for p, c in flat]
        else:
            # prompt ++ completion; the logits that predicted completion token t score answer token t.
            sequences = [Sequence.aligned(prompt_ids_P[p], c, answer_ids_P[p]) for p, c in flat]
    logprobs_N_T, mask_N_T = micro_batched_logprobs(
        model,
        sequences,
        temperature=1.0,
        chunk_size=cfg.logprob_chunk_size,
        pad_id=pad_id,
        micro_batch_size=cfg.micro_batch_size,
    )
    nll_N_T = -logprobs_N_T
    if cfg.mode == "unsupervised":
        rewards_N = unsupervised_rewards(nll_N_T, mask_N_T, empty_reward=cfg.empty_completion_reward)
    else:
        answer_lens_N = torch.tensor([len(answer_ids_P[p]) for p, _ in flat])
        if cfg.reward == "answer_perplexity":
            completion_lens_N = torch.tensor([len(c) for _, c in flat])
            rewards_N = answer_perplexity_rewards(
                nll_N_T, mask_N_T, completion_lens_N, answer_lens_N, score=cfg.answer_score
            )
        else:
            rewards_N = completion_cross_entropy_rewards(nll_N_T, mask_N_T, answer_lens_N, score=cfg.answer_score)
    return rewards_N.view(P, G)
