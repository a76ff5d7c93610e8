"""Rewards read from the update's own forward: the same rewards, advantages and step as scoring
first, with one forward fewer per micro-batch, and only where the math allows it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from learner import reward_funcs
from learner.advantages import group_normalize
from learner.learn import learn_from, rewards_come_from_the_update
from learner.model import load_policy
from learner.prompts import UnsupervisedRow
from shared.config import LearnerConfig
from shared.schemas import Completion

EOS = 2
PROMPTS = [[5, 6, 7], [8, 9]]
# Two groups of four: a duplicate, an empty completion (EOS only), and completions of uneven length.
COMPLETIONS = [
    [[10, 11, EOS], [12, 13, 14, 15], [10, 11, EOS], [EOS]],
    [[16, EOS], [17, 18, 19, 20, 21], [22, 23, EOS], [24]],
]


def rollout() -> list[list[Completion]]:
    """The completions, with sampler log-probabilities (any finite values do)."""
    return [
        [Completion(text="", token_ids=c, logprobs=[-3.0] * len(c), finish_reason="stop") for c in g]
        for g in COMPLETIONS
    ]


def learned_with(tiny_model_dir: Path, **overrides):
    cfg = LearnerConfig(mode="unsupervised", learning_rate=1.0, **overrides)
    torch.manual_seed(0)
    policy, _ = load_policy(str(tiny_model_dir), cfg)
    with torch.no_grad():  # a LoRA that is not a no-op, so the policy differs from the reference
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    # SGD: the step is the gradient itself (Adam's first step is its sign, which rounding can flip).
    optimizer = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=cfg.learning_rate)
    rows = []
    hook = (
        policy.get_base_model()
        .get_decoder()
        .register_forward_hook(
            lambda _module, _args, kwargs, _out: rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True
        )
    )
    text_ids = [[[t for t in c if t != EOS] for c in group] for group in COMPLETIONS]
    learned = learn_from(
        policy,
        optimizer,
        PROMPTS,
        rollout(),
        text_ids,
        None,
        cfg,
        pad_id=0,
        reward_fns=reward_funcs.load(cfg),
        rows_P=[UnsupervisedRow(text="a"), UnsupervisedRow(text="b")],
        decode=str,
        step=1,
    )
    hook.remove()
    lora = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    return cfg, policy, learned, sum(rows), lora


def test_rewards_from_the_update_equal_scoring_first_and_so_does_the_step(tiny_model_dir: Path) -> None:
    cfg, policy, fused, fused_rows, fused_lora = learned_with(tiny_model_dir, micro_batch_size=4)
    apart_cfg, _, apart, apart_rows, apart_lora = learned_with(tiny_model_dir, micro_batch_size=3)
    assert rewards_come_from_the_update(policy, cfg, 4) and not rewards_come_from_the_update(policy, apart_cfg, 4)
    assert fused.score_s == 0.0 and apart.score_s > 0
    torch.testing.assert_close(fused.rewards_P_G, apart.rewards_P_G, rtol=0, atol=1e-5)
    torch.testing.assert_close(fused.advantages_P_G, apart.advantages_P_G, rtol=0, atol=1e-4)
    assert fused.rewards_P_G[0, 0] == fused.rewards_P_G[0, 2]  # the duplicate: one reward, exactly
    assert fused.rewards_P_G[0, 3] < fused.rewards_P_G[0, [0, 1]].min()  # the empty one: floored below
    for name, value in fused_lora.items():
        torch.testing.assert_close(value, apart_lora[name], rtol=0, atol=1e-5)
    # Rows run through the model: reference and policy passes over the 8 completions, plus a
    # scoring pass over the 7 distinct ones when the rewards are not read from the update.
    assert fused_rows == 8 + 8 and apart_rows == 8 + 8 + 7


@pytest.mark.parametrize(
    ("overrides", "fused"),
    [
        ({}, True),
        ({"micro_batch_size": 8}, True),
        ({"micro_batch_size": 6}, False),  # a group would span two micro-batches
        ({"sampling": {"temperature": 0.7}}, False),  # the update's log-probs are at 0.7, rewards at 1
        ({"lora": {"dropout": 0.1}}, False),  # the update's forward drops out; scoring's does not
        ({"mode": "supervised", "reward": "answer_perplexity"}, False),  # rewards score other tokens
        ({"reward_funcs": ["completion_log_likelihood"]}, True),  # the mode's own reward, named
        ({"reward_funcs": ["completion_log_likelihood"], "reward_weights": [2.0]}, False),  # scaled: scored apart
        ({"reward_funcs": ["completion_log_likelihood", "m:f"]}, False),  # a sum: scored apart
        ({"scale_rewards": "none"}, True),  # each group's advantages still need only its own rewards
        ({"scale_rewards": "batch"}, False),  # the batch's std needs every group's before the first step
    ],
)
def test_rewards_come_from_the_update_only_where_the_math_allows(
    tiny_model_dir: Path, overrides: dict, fused: bool
) -> None:
    cfg = LearnerConfig(**{"micro_batch_size": 16, **overrides})
    policy, _ = load_policy(str(tiny_model_dir), cfg)
    assert rewards_come_from_the_update(policy, cfg, 4) is fused


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_advantages_are_scaled_as_configured(tiny_model_dir: Path, scale_rewards: str) -> None:
    # Whatever path computed them (fused for "group" and "none", scored first for "batch"), the
    # advantages are group_normalize of the step's rewards with the configured scaling.
    cfg, _, learned, _, _ = learned_with(tiny_model_dir, micro_batch_size=4, scale_rewards=scale_rewards)
    want_P_G = group_normalize(learned.rewards_P_G, eps=cfg.advantage_eps, scale_rewards=scale_rewards)
    torch.testing.assert_close(learned.advantages_P_G, want_P_G)
    assert learned.advantages_P_G.abs().max() > 0.1
