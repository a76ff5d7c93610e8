"""Log-probabilities and rewards are read at the right positions: checked against a plain
full-logits computation, with an off-by-one variant that must disagree."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from learner import scoring
from learner.logprobs import Sequence, micro_batched_logprobs, scored_logprobs, scored_mask
from learner.model import load_policy
from shared.config import LearnerConfig


def test_continuation_reads_each_token_from_the_previous_position() -> None:
    s = Sequence.continuation([10, 11], [12, 13])
    # positions: 0:10 1:11 2:12 3:13; logits at 1 predict 12, at 2 predict 13, at 3 nothing.
    assert s.token_ids == [10, 11, 12, 13]
    assert [t for t, m in zip(s.targets, s.scored, strict=True) if m] == [12, 13]
    assert s.scored == [False, True, True, False]


def test_aligned_scores_labels_where_the_completion_was_predicted() -> None:
    s = Sequence.aligned([10, 11], [12, 13, 14], [7, 8])
    # completion token t is predicted at position 1 + t; only t < min(3, 2) = 2 count.
    assert s.scored == [False, True, True, False, False]
    assert s.targets[1:3] == [7, 8]
    assert Sequence.aligned([10], [], [7]).scored == [False]  # empty completion covers nothing


def test_scored_mask_packs_counts_left() -> None:
    seqs = [Sequence.continuation([1], [2, 3, 4]), Sequence.continuation([1, 2], [3])]
    assert scored_mask(seqs).tolist() == [[True, True, True], [True, False, False]]


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()


def naive_logprobs(model, ids: list[int], temperature: float = 1.0) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t >= 1, from full logits: the reference computation."""
    with torch.no_grad():
        logits_L_V = model(torch.tensor([ids])).logits[0].float() / temperature
    return logits_L_V[:-1].log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


@pytest.mark.parametrize("chunk_size", [1, 3, 1024])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_scored_logprobs_match_full_logits_for_any_chunking(model, chunk_size: int, temperature: float) -> None:
    prompts, completions = [[5, 6, 7], [8]], [[9, 10], [11, 12, 13, 14]]
    seqs = [Sequence.continuation(p, c) for p, c in zip(prompts, completions, strict=True)]
    with torch.no_grad():
        got_N_T = scored_logprobs(model, seqs, temperature=temperature, chunk_size=chunk_size, pad_id=0)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        want = naive_logprobs(model, p + c, temperature)[len(p) - 1 :]  # completion tokens only
        torch.testing.assert_close(got_N_T[i, : len(c)], want)
        assert (got_N_T[i, len(c) :] == 0).all()


def test_gradients_flow_through_chunked_checkpointed_logprobs(tiny_model_dir: Path) -> None:
    policy, _ = load_policy(str(tiny_model_dir), LearnerConfig())
    seqs = [Sequence.continuation([5, 6], [7, 8, 9])]
    scored_logprobs(policy, seqs, temperature=1.0, chunk_size=2, pad_id=0).sum().backward()
    lora_grads = [p.grad for n, p in policy.named_parameters() if "lora_B" in n]
    assert lora_grads and all(g is not None for g in lora_grads)
    assert any(g.abs().sum() > 0 for g in lora_grads)
    assert all(p.grad is None for n, p in policy.named_parameters() if "lora_" not in n)


def test_an_all_empty_micro_batch_backpropagates_a_zero_gradient(tiny_model_dir: Path) -> None:
    # No completion has a token: nothing is scored, so the [2, 0] result must still hang off the
    # forward (the loss promises an all-masked batch backpropagates), and every LoRA gradient is
    # exactly zero: no scored position, so no path from any weight to the (empty) output.
    policy, _ = load_policy(str(tiny_model_dir), LearnerConfig())
    seqs = [Sequence.continuation([5, 6], []), Sequence.continuation([7], [])]
    logprobs_N_T = scored_logprobs(policy, seqs, temperature=1.0, chunk_size=2, pad_id=0)
    assert logprobs_N_T.shape == (2, 0) and logprobs_N_T.requires_grad
    logprobs_N_T.sum().backward()
    lora_grads = [p.grad for n, p in policy.named_parameters() if "lora_" in n]
    assert lora_grads and all(g is not None and torch.equal(g, torch.zeros_like(g)) for g in lora_grads)


def _policy(tiny_model_dir: Path, **cfg):
    cfg = LearnerConfig(**cfg)
    policy, _ = load_policy(str(tiny_model_dir), cfg)
    return policy.eval(), cfg


def test_unsupervised_reward_is_minus_mean_nll_of_completion_tokens_only(tiny_model_dir: Path) -> None:
    policy, cfg = _policy(tiny_model_dir, mode="unsupervised")
    prompt, completion = [5, 6, 7], [9, 10, 11]
    rewards_P_G = scoring.score(policy, [prompt], [[completion, []]], None, cfg, pad_id=0)
    full = naive_logprobs(policy, prompt + completion)  # logprob of ids[1:]
    want = full[len(prompt) - 1 :].mean()  # completion tokens: ids 3..5, predicted at 2..4
    off_by_one = full[len(prompt) - 2 : -1].mean()  # would count the last prompt token instead
    torch.testing.assert_close(rewards_P_G[0, 0], want)
    assert abs(float(want - off_by_one)) > 1e-3
    # No tokens: the group's worst non-empty reward (here the only one) minus the margin.
    assert rewards_P_G[0, 1] == rewards_P_G[0, 0] - cfg.empty_completion_margin


def test_unsupervised_all_empty_group_gets_equal_rewards(tiny_model_dir: Path) -> None:
    # No non-empty completion to floor against: every one gets empty_completion_reward, all
    # equal, so zero advantage; the other group is floored against its own worst reward.
    policy, cfg = _policy(tiny_model_dir, mode="unsupervised")
    rewards_P_G = scoring.score(policy, [[5, 6], [7, 8]], [[[], []], [[9], []]], None, cfg, pad_id=0)
    assert rewards_P_G[0].tolist() == [cfg.empty_completion_reward] * 2
    assert rewards_P_G[1, 1] == rewards_P_G[1, 0] - cfg.empty_completion_margin


@pytest.mark.parametrize("mode", ["unsupervised", "supervised"])
def test_each_distinct_pair_is_scored_once_and_duplicates_share_their_reward(tiny_model_dir: Path, mode: str) -> None:
    # Two prompts with the same ids, two completions each repeated across micro-batches of 2.
    # Unsupervised: 3 distinct (prompt, completion) pairs. Supervised: the prompts' answers
    # differ, so equal ids are still different questions: 2 prompts x 2 completions = 4 pairs.
    policy, cfg = _policy(tiny_model_dir, mode=mode, micro_batch_size=2)
    prompt, a, b = [5, 6, 7], [9, 10, 11], [12]
    answers = [[20], [21]] if mode == "supervised" else None
    rows_seen = []
    decoder = policy.get_base_model().get_decoder()
    hook = decoder.register_forward_pre_hook(
        lambda _, args, kwargs: rows_seen.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    try:
        rewards_P_G = scoring.score(policy, [prompt, prompt], [[a, b, a, []], [b, a, a, b]], answers, cfg, pad_id=0)
    finally:
        hook.remove()
    if mode == "unsupervised":
        assert sum(rows_seen) == 3  # (prompt, a), (prompt, b), (prompt, [])
        assert rewards_P_G[0, 0] == rewards_P_G[0, 2] == rewards_P_G[1, 1] == rewards_P_G[1, 2]  # bit-equal
        assert rewards_P_G[0, 1] == rewards_P_G[1, 0] == rewards_P_G[1, 3]
    else:
        assert sum(rows_seen) == 5  # (prompt, answer, completion): 2 x {a, b} and (prompt, [20], [])
        assert rewards_P_G[0, 0] == rewards_P_G[0, 2] and rewards_P_G[1, 1] == rewards_P_G[1, 2]
        assert rewards_P_G[0, 0] != rewards_P_G[1, 1]  # same prompt ids, another answer
    # The same rewards as scoring each pair alone.
    alone = scoring.score(policy, [prompt], [[a]], answers and answers[:1], cfg, pad_id=0)
    torch.testing.assert_close(rewards_P_G[0, 0], alone[0, 0])


def test_answer_perplexity_scores_answer_after_prompt_and_completion(tiny_model_dir: Path) -> None:
    policy, cfg = _policy(tiny_model_dir, mode="supervised", reward="answer_perplexity")
    prompt, completion, answer = [5, 6], [9, 10, 11, 12], [20, 21]
    rewards_P_G = scoring.score(policy, [prompt], [[completion, [9]]], [answer], cfg, pad_id=0)
    full = naive_logprobs(policy, prompt + completion + answer)
    start = len(prompt) + len(completion) - 1
    want = full[start:].exp().mean()  # coverage 1: mean token probability of the answer
    off_by_one = full[start - 1 : -1].exp().mean()
    torch.testing.assert_close(rewards_P_G[0, 0], want)
    assert not torch.isclose(want, off_by_one, rtol=1e-2)  # random weights: p ~ 1/vocab, compare relatively
    short = naive_logprobs(policy, prompt + [9] + answer)[len(prompt) :].exp().mean() * 0.5  # coverage 1/2
    torch.testing.assert_close(rewards_P_G[0, 1], short)


def test_completion_cross_entropy_scores_answer_token_t_at_completion_position_t(tiny_model_dir: Path) -> None:
    policy, cfg = _policy(tiny_model_dir, mode="supervised", reward="completion_cross_entropy")
    prompt, completion, answer = [5, 6], [9, 10, 11], [20, 21]
    rewards_P_G = scoring.score(policy, [prompt], [[completion, []]], [answer], cfg, pad_id=0)
    with torch.no_grad():
        logprobs_L_V = policy(torch.tensor([prompt + completion])).logits[0].float().log_softmax(-1)
    # completion token t is predicted at position len(prompt) - 1 + t; score answer token t there.
    p = [logprobs_L_V[len(prompt) - 1 + t, answer[t]].exp() for t in range(2)]
    want = (p[0] + p[1]) / 2
    off = [logprobs_L_V[len(prompt) + t, answer[t]].exp() for t in range(2)]
    torch.testing.assert_close(rewards_P_G[0, 0], want)
    assert not torch.isclose(want, (off[0] + off[1]) / 2, rtol=1e-2)
    assert rewards_P_G[0, 1] == 0  # empty completion: coverage 0


def test_micro_batching_does_not_change_logprobs(model) -> None:
    seqs = [Sequence.continuation([5 + i], list(range(10, 10 + i))) for i in range(1, 6)]
    whole, mask = micro_batched_logprobs(model, seqs, temperature=1.0, chunk_size=4, pad_id=0, micro_batch_size=5)
    split, _ = micro_batched_logprobs(model, seqs, temperature=1.0, chunk_size=4, pad_id=0, micro_batch_size=2)
    torch.testing.assert_close(whole, split)
    assert mask.sum() == sum(range(1, 6))
