"""One rank of tests/test_distributed.py: two policy updates on its shard of recorded rollouts.

    torchrun --nproc_per_node=2 -m tests.ddp_worker MODEL_DIR OUT_DIR

runs every scenario on each rank; rank 0 alone writes OUT_DIR/<scenario>/ (the adapter after the
two steps, and the steps' figures). The test runs `train` in its own process, as the only rank on
the whole batch, for the weights every rank must end with.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model_state_dict

from learner.advantages import group_normalize
from learner.distributed import Distributed
from learner.model import load_policy, save_adapter
from learner.tiny_model import VOCAB_SIZE
from learner.update import UpdateStats, policy_update
from shared.config import LearnerConfig

P, G = 4, 3
"""Prompts per step and completions per prompt: 2 groups per rank with 2 ranks."""

SCENARIOS = ["token_mean", "sequence_mean", "token_sum", "nan_on_rank_1"]
"""One per loss aggregation (each normalises the batch differently), and one whose first step has a
NaN advantage in the last group only (rank 1's shard of 2): every rank must skip that step."""


@dataclasses.dataclass(frozen=True)
class Rollouts:
    """A step's recorded rollouts, flattened prompt-major (sequence p * G + g)."""

    prompt_ids_N: list[list[int]]
    completion_ids_N: list[list[int]]
    sampler_logprobs_N: list[list[float]]
    advantages_N: torch.Tensor


def recorded_rollouts(step: int, *, nan_in_last_group: bool = False) -> Rollouts:
    """Synthetic but fixed rollouts of `step`: prompts of 2-5 tokens, completions of 0-6 (one
    empty, so sequence_mean's count of non-empty sequences differs from the sequence count),
    sampler log-probabilities near the tiny model's (~ -log 1024) and group-normalized advantages."""
    gen = torch.Generator().manual_seed(1000 + step)
    prompt_lengths_P = torch.randint(2, 6, (P,), generator=gen).tolist()
    prompt_ids_P = [torch.randint(3, VOCAB_SIZE, (n,), generator=gen).tolist() for n in prompt_lengths_P]
    lengths_N = torch.randint(1, 7, (P * G,), generator=gen).tolist()
    lengths_N[4] = 0
    completion_ids_N = [torch.randint(3, VOCAB_SIZE, (n,), generator=gen).tolist() for n in lengths_N]
    sampler_logprobs_N = [(-6.9 + 0.3 * torch.randn(n, generator=gen)).tolist() for n in lengths_N]
    advantages_P_G = group_normalize(torch.rand(P, G, generator=gen), eps=1e-4, scale_rewards="group")
    if nan_in_last_group:
        advantages_P_G[-1, 0] = torch.nan
    prompt_ids_N = [prompt_ids_P[p] for p in range(P) for _ in range(G)]
    return Rollouts(prompt_ids_N, completion_ids_N, sampler_logprobs_N, advantages_P_G.flatten())


def config(scenario: str) -> LearnerConfig:
    """4 sequences per micro-batch: 2 micro-batches of 4 and 2 on each of 2 ranks, 3 of 4 alone.
    Clipping is off except in the NaN scenario, so that a wrong gradient scale shows."""
    aggregation = "token_mean" if scenario == "nan_on_rank_1" else scenario
    return LearnerConfig(
        micro_batch_size=4,
        learning_rate=0.1,
        max_grad_norm=0.1 if scenario == "nan_on_rank_1" else 1e9,
        loss={"aggregation": aggregation},
        sampling={"max_tokens": 8},
    )


def train(model_dir: Path, scenario: str, ranks: Distributed) -> tuple[PeftModel, list[UpdateStats]]:
    """Load the seeded policy and take 2 SGD updates on this rank's shard of each step's rollouts."""
    cfg = config(scenario)
    policy, _ = load_policy(str(model_dir), cfg)
    # Plain SGD: the weight change is -lr * gradient, scale included (AdamW would hide a wrong
    # scale, and near-zero gradients at its first step amplify rounding by lr / eps).
    optimizer = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=cfg.learning_rate)
    stats = []
    for step in (1, 2):
        rollouts = recorded_rollouts(step, nan_in_last_group=scenario == "nan_on_rank_1" and step == 1)
        mine_N = [p * G + g for p in ranks.shard(range(P)) for g in range(G)]
        stats.append(
            policy_update(
                policy,
                optimizer,
                [rollouts.prompt_ids_N[i] for i in mine_N],
                [rollouts.completion_ids_N[i] for i in mine_N],
                [rollouts.sampler_logprobs_N[i] for i in mine_N],
                rollouts.advantages_N[mine_N],
                cfg,
                pad_id=0,
                ranks=ranks,
            )
        )
    return policy, stats


def lora_weights_D(policy: PeftModel) -> torch.Tensor:
    """Every LoRA weight, flattened in the state dict's order."""
    return torch.cat([t.flatten() for t in get_peft_model_state_dict(policy).values()])


def main(model_dir: Path, out_dir: Path) -> None:
    torch.set_num_threads(1)  # one core per rank
    with Distributed.from_env() as ranks:
        for scenario in SCENARIOS:
            policy, stats = train(model_dir, scenario, ranks)
            weights_D = lora_weights_D(policy)
            every_rank_D = ranks.gather(weights_D)  # collective: every rank calls it
            if ranks.is_main:
                spread = (every_rank_D.view(ranks.world_size, -1) - weights_D).abs().max().item()
                save_adapter(policy, out_dir / scenario, 1)
                figures = {"rank": ranks.rank, "ranks": ranks.world_size, "spread_between_ranks": spread}
                figures["steps"] = [dataclasses.asdict(s) for s in stats]
                (out_dir / scenario / "stats.json").write_text(json.dumps(figures))
        ranks.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
