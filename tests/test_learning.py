"""Learning happens where it should: GRPO against the real server on the warmed tiny model.

Measured on 2 CPU cores (figures in the assertions' comments): with true answers, held-out
answer likelihood and exact match rise in each seed while a shuffled-answer control collapses;
unsupervised self-distillation lowers completion NLL within a KL bound fixed in advance.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from learner import loop
from learner.data import load_rows
from learner.model import load_policy
from learner.prompts import SupervisedRow
from learner.rollout_client import RolloutClient
from learner.tiny_model import addition_rows, evaluate_addition
from shared.config import LearnerConfig
from tests.servers import served_client

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HELDOUT = addition_rows(0, 200, split="heldout")
TRAIN = [SupervisedRow(**row) for row in addition_rows(0, 256, split="train")]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("learning")


@pytest.fixture(scope="module")
def client(warm_model_dir: Path, run_dir: Path) -> Iterator[RolloutClient]:
    with served_client(warm_model_dir, run_dir) as client:
        yield client


def grpo_supervised(model_dir: Path, run_dir: Path, client: RolloutClient, rows: list, seed: int, name: str):
    cfg = LearnerConfig(
        mode="supervised",
        reward="answer_perplexity",
        output_dir=run_dir,
        adapter_name=name,
        steps=60,
        prompts_per_step=8,
        micro_batch_size=64,
        learning_rate=1e-3,
        seed=seed,
        sample_every=0,
        save_steps=0,  # the runs share run_dir (the server's adapter root); checkpoints are one run's
        sampling={"n": 8, "max_tokens": 4, "seed": seed, "stop": ["="]},
    )
    policy, tokenizer = load_policy(str(model_dir), cfg)
    with torch.no_grad():
        before = evaluate_addition(policy, tokenizer, HELDOUT)
    loop.run(cfg, rows, policy, tokenizer, [client])
    with torch.no_grad():
        after = evaluate_addition(policy, tokenizer, HELDOUT)
    return before, after


def test_supervised_grpo_raises_answer_likelihood_and_shuffled_answers_do_not(
    warm_model_dir: Path, run_dir: Path, client: RolloutClient
) -> None:
    gains = {}
    for seed in (0, 1):
        before, after = grpo_supervised(warm_model_dir, run_dir, client, TRAIN, seed, f"true{seed}")
        gains[seed] = (after.mean_answer_prob - before.mean_answer_prob, after.exact_match - before.exact_match)
    answers = [row.answer for row in TRAIN]
    random.Random(0).shuffle(answers)
    shuffled = [SupervisedRow(prompt=row.prompt, answer=a) for row, a in zip(TRAIN, answers, strict=True)]
    before, after = grpo_supervised(warm_model_dir, run_dir, client, shuffled, 0, "shuffled")
    control = (after.mean_answer_prob - before.mean_answer_prob, after.exact_match - before.exact_match)
    print(f"held-out (answer prob, exact match) gains: true {gains}, shuffled {control}")

    # Measured here (2 cores, fixed seeds; the runs are deterministic on one machine), with every
    # completion of a run on its own sampling stream (seeds strided by n; before, streams overlapped
    # across prompts and steps, and the figures were +0.104/+0.108, +0.040/+0.085, -0.401/-0.430):
    #   answer prob gains  true +0.089, +0.105 (spread 0.016)   shuffled -0.101
    #   exact match gains  true +0.020, +0.025                  shuffled -0.170
    # The likelihood margin is safe: the floor 0.05 is over half the measured gain and 3x the
    # spread, and the control lands 0.19 below. Exact match moves by whole rows of 200 (0.005
    # each), so its gain is asserted as a direction, with the control far below.
    spread = abs(gains[0][0] - gains[1][0])
    assert all(gain > 0.05 for gain, _ in gains.values())
    assert min(g for g, _ in gains.values()) > 3 * spread
    assert control[0] < 0
    assert all(em > 0 for _, em in gains.values())
    assert control[1] < -0.1


def test_unsupervised_grpo_lowers_completion_nll_within_a_kl_bound(
    warm_model_dir: Path, run_dir: Path, client: RolloutClient
) -> None:
    cfg = LearnerConfig(
        mode="unsupervised",
        data=Path("examples/unsupervised.jsonl"),
        output_dir=run_dir,  # the server's adapter root is run_dir/adapters
        adapter_name="unsupervised",
        steps=20,
        prompts_per_step=4,
        micro_batch_size=32,
        learning_rate=5e-4,
        sample_every=0,
        save_steps=0,  # run_dir is shared with the supervised runs
        sampling={"n": 8, "max_tokens": 12, "seed": 0},
    )
    policy, tokenizer = load_policy(str(warm_model_dir), cfg)
    loop.run(cfg, load_rows(cfg.data, cfg.mode), policy, tokenizer, [client])
    lines = (cfg.output_dir / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines[-cfg.steps :]]  # this run's steps
    first = sum(r["reward_mean"] for r in rows[:5]) / 5
    last = sum(r["reward_mean"] for r in rows[-5:]) / 5
    max_kl = max(r["kl"] for r in rows)
    print(f"unsupervised reward (minus completion NLL): first 5 steps {first:.3f}, last 5 {last:.3f}, KL {max_kl:.3f}")
    assert last > first + 0.1  # completion NLL falls by more than 0.1 nats/token
    assert max_kl < 1.0  # bound fixed before the run: KL to the base stays small
