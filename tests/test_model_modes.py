"""Train/eval modes and gradient checkpointing: scoring is deterministic, checkpointing recomputes."""

from __future__ import annotations

from pathlib import Path

import torch

from learner import scoring
from learner.logprobs import Sequence, scored_logprobs
from learner.model import load_policy
from learner.update import policy_update
from shared.config import LearnerConfig

PROMPT, COMPLETIONS = [5, 6, 7, 8], [[9, 10, 11], [12, 13, 14]]


def test_scoring_twice_gives_identical_rewards_with_lora_dropout(tiny_model_dir: Path) -> None:
    """With dropout 0.5 on the LoRA input, a scoring pass in train mode drew a fresh mask each time
    (the same input scored twice differed by 0.56 before); in eval mode it is a function."""
    cfg = LearnerConfig(lora={"dropout": 0.5}, micro_batch_size=2)
    policy, _ = load_policy(str(tiny_model_dir), cfg)
    with torch.no_grad():  # a LoRA that is not a no-op, so dropout on its input changes the output
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    args = ([PROMPT], [COMPLETIONS], None, cfg)
    first = scoring.score(policy, *args, pad_id=0)
    second = scoring.score(policy, *args, pad_id=0)
    assert torch.equal(first, second)
    # ...while the policy pass (with gradients) is in train mode, where dropout applies.
    seqs = [Sequence.continuation(PROMPT, c) for c in COMPLETIONS]
    a = scored_logprobs(policy, seqs, temperature=1.0, chunk_size=8, pad_id=0)
    b = scored_logprobs(policy, seqs, temperature=1.0, chunk_size=8, pad_id=0)
    assert policy.training and not torch.equal(a, b)


def count_layer_forwards(tiny_model_dir: Path, *, checkpointing: bool) -> int:
    cfg = LearnerConfig(gradient_checkpointing=checkpointing, micro_batch_size=2, loss={"beta": 0.0})
    policy, _ = load_policy(str(tiny_model_dir), cfg)
    layers = policy.get_base_model().get_decoder().layers
    calls = [0]

    def count(*_args) -> None:
        calls[0] += 1

    for layer in layers:
        layer.register_forward_pre_hook(count)
    optimizer = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=0.0)
    sampler = [[-1.0] * 3 for _ in COMPLETIONS]
    policy_update(policy, optimizer, [PROMPT] * 2, COMPLETIONS, sampler, torch.tensor([1.0, -1.0]), cfg, pad_id=0)
    return calls[0] // len(layers)


def test_gradient_checkpointing_recomputes_each_layer_in_backward(tiny_model_dir: Path) -> None:
    # One micro-batch: the reference pass (no grad) runs each layer once, the policy pass once,
    # and with checkpointing backward runs each layer's forward once more.
    assert count_layer_forwards(tiny_model_dir, checkpointing=False) == 2
    assert count_layer_forwards(tiny_model_dir, checkpointing=True) == 3
