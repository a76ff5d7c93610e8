"""The policy update moves the LoRA weights the right way, skips non-finite steps, and saves atomically."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from learner.logprobs import Sequence, scored_logprobs
from learner.model import load_policy, next_version, save_adapter
from learner.update import policy_update
from shared.config import LearnerConfig

PROMPT, GOOD, BAD = [5, 6, 7], [9, 10, 0], [11, 12, 0]


def completion_logprob(policy, completion: list[int]) -> float:
    with torch.no_grad():
        seqs = [Sequence.continuation(PROMPT, completion)]
        return scored_logprobs(policy, seqs, temperature=1.0, chunk_size=8, pad_id=0).sum().item()


def update(policy, optimizer, cfg, advantages: list[float]):
    sampler = [[completion_logprob(policy, c) / 3] * 3 for c in (GOOD, BAD)]
    return policy_update(
        policy, optimizer, [PROMPT, PROMPT], [GOOD, BAD], sampler, torch.tensor(advantages), cfg, pad_id=0
    )


@pytest.fixture
def setup(tiny_model_dir: Path):
    cfg = LearnerConfig(learning_rate=1e-3, micro_batch_size=1, loss={"beta": 0.0})
    policy, _ = load_policy(str(tiny_model_dir), cfg)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.learning_rate)
    return policy, optimizer, cfg


def test_positive_advantage_raises_its_completion_and_negative_lowers_its(setup) -> None:
    policy, optimizer, cfg = setup
    good_before, bad_before = completion_logprob(policy, GOOD), completion_logprob(policy, BAD)
    for _ in range(3):
        stats = update(policy, optimizer, cfg, [1.0, -1.0])
        assert not stats.skipped and stats.grad_norm > 0
    assert completion_logprob(policy, GOOD) > good_before
    assert completion_logprob(policy, BAD) < bad_before


def test_non_finite_loss_skips_the_step_and_leaves_the_weights(setup) -> None:
    policy, optimizer, cfg = setup
    before = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    stats = update(policy, optimizer, cfg, [float("nan"), 1.0])
    assert stats.skipped
    assert all(torch.equal(p, before[n]) for n, p in policy.named_parameters() if p.requires_grad)
    assert all(p.grad is None for p in policy.parameters())


def test_adapters_are_saved_as_new_versions_never_over_an_old_one(setup, tmp_path: Path) -> None:
    policy, _, _ = setup
    root = tmp_path / "adapters"
    assert next_version(root) == 1
    first = save_adapter(policy, root, next_version(root))
    second = save_adapter(policy, root, next_version(root))
    assert (first.name, second.name) == ("v000001", "v000002")
    assert (second / "adapter_model.safetensors").is_file() and (second / "adapter_config.json").is_file()
    with pytest.raises(OSError):
        save_adapter(policy, root, 1)
    assert sorted(p.name for p in root.iterdir()) == ["v000001", "v000002"]  # no temp dir left behind


def sgd_steps_by_micro_batch(
    tiny_model_dir: Path, completions: list[list[int]], aggregation: str
) -> tuple[list[torch.Tensor], list[float]]:
    """One update of 3 completions with advantages 1, -0.5, 2, in micro-batches of 1 and then of 3,
    each from the same fresh policy: the LoRA weight changes and losses of both. Plain SGD without
    clipping, so a weight change is -lr * gradient, scale included."""
    deltas, losses = [], []
    for micro_batch_size in (1, 3):
        cfg = LearnerConfig(
            micro_batch_size=micro_batch_size,
            max_grad_norm=1e9,
            loss={"beta": 0.1, "aggregation": aggregation},
            sampling={"max_tokens": 8},
        )
        policy, _ = load_policy(str(tiny_model_dir), cfg)
        optimizer = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=1.0)
        before = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
        sampler = [[completion_logprob(policy, c) / len(c)] * len(c) if c else [] for c in completions]
        stats = policy_update(
            policy, optimizer, [PROMPT] * 3, completions, sampler, torch.tensor([1.0, -0.5, 2.0]), cfg, pad_id=0
        )
        assert not stats.skipped
        after = dict(policy.named_parameters())
        deltas.append(torch.cat([(after[n].detach() - p).flatten() for n, p in before.items()]))
        losses.append(stats.loss)
    assert deltas[0].abs().max() > 0
    return deltas, losses


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean", "token_sum"])
def test_micro_batches_accumulate_to_the_whole_batch_gradient(tiny_model_dir: Path, aggregation: str) -> None:
    # Completions of 1, 3 and 5 tokens, split into micro-batches of 1 or taken whole: each part's
    # loss is normalised over the part, so only weighting it by its share of the batch's
    # normaliser (tokens, non-empty sequences, or sequences times max_tokens) gives the same step.
    deltas, losses = sgd_steps_by_micro_batch(tiny_model_dir, [[9], [10, 11, 0], [12, 13, 14, 15, 0]], aggregation)
    torch.testing.assert_close(deltas[0], deltas[1], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean", "token_sum"])
def test_an_all_empty_micro_batch_adds_nothing(tiny_model_dir: Path, aggregation: str) -> None:
    # The middle completion is empty: with micro-batches of 1 it is a micro-batch with no scored
    # token, whose loss is 0 with a zero gradient, so the step is that of the whole batch of 3 in
    # one micro-batch (where the empty row is only padding).
    deltas, _ = sgd_steps_by_micro_batch(tiny_model_dir, [[9], [], [10, 11, 0]], aggregation)
    # The deltas reach ~0.5; the padded whole batch and the separate micro-batches sum in other
    # orders, ~1e-7 apart in float32 (measured up to 4.8e-7), so atol 1e-6 (2e-6 of the largest).
    torch.testing.assert_close(deltas[0], deltas[1], rtol=1e-4, atol=1e-6)


def test_a_batch_of_empty_completions_steps_with_a_zero_gradient(setup) -> None:
    # Every completion is empty: loss 0, gradient exactly 0, a finite (zero) norm, so the step is
    # taken, and plain SGD moves nothing (the fixture's AdamW would still apply its weight decay).
    policy, _, cfg = setup
    optimizer = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=1.0)
    before = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    stats = policy_update(
        policy, optimizer, [PROMPT, PROMPT], [[], []], [[], []], torch.tensor([1.0, -1.0]), cfg, pad_id=0
    )
    assert not stats.skipped and stats.grad_norm == 0.0 and stats.loss == 0.0
    assert all(torch.equal(p, before[n]) for n, p in policy.named_parameters() if p.requires_grad)


def test_the_masked_fraction_counts_the_tokens_importance_sampling_masked(setup) -> None:
    """sequence_mask (TRL's default): a completion whose sampler log-probabilities sum to more than
    ln(tis_cap) below the learner's gets weight 0 on all its tokens; is_masked reports it."""
    policy, optimizer, cfg = setup
    learner = [completion_logprob(policy, c) / 3 for c in (GOOD, BAD)]
    # GOOD sampled as the learner scores it (weight 1); BAD 1 nat per token lower: exp(3) > 2, masked
    sampler = [[learner[0]] * 3, [learner[1] - 1.0] * 3]
    stats = policy_update(
        policy, optimizer, [PROMPT, PROMPT], [GOOD, BAD], sampler, torch.tensor([1.0, -1.0]), cfg, pad_id=0
    )
    assert stats.is_masked == pytest.approx(0.5)  # 3 of the 6 tokens
