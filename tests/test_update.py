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
