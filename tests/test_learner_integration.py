"""A few GRPO steps of each mode against the real server process (real vLLM, real HTTP)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from learner import loop
from learner.model import load_policy
from learner.prompts import load_rows
from learner.rollout_client import RolloutClient
from shared.config import LearnerConfig
from tests.servers import served_client

pytestmark = pytest.mark.integration

STEPS = 2


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("run")


@pytest.fixture(scope="module")
def client(tiny_model_dir: Path, run_dir: Path) -> Iterator[RolloutClient]:
    with served_client(tiny_model_dir, run_dir) as client:
        yield client


@pytest.mark.parametrize(
    ("mode", "reward", "data"),
    [
        ("unsupervised", "answer_perplexity", "examples/unsupervised.jsonl"),
        ("supervised", "answer_perplexity", "examples/supervised.jsonl"),
        ("supervised", "completion_cross_entropy", "examples/supervised.jsonl"),
    ],
)
def test_steps_train_lora_only_and_the_server_serves_the_saved_version(
    tiny_model_dir: Path, run_dir: Path, client: RolloutClient, mode: str, reward: str, data: str
) -> None:
    cfg = LearnerConfig(
        mode=mode,
        reward=reward,
        data=Path(data),
        output_dir=run_dir,
        steps=STEPS,
        prompts_per_step=2,
        micro_batch_size=3,  # 8 sequences: micro-batches of 3, 3, 2
        learning_rate=1e-2,
        sample_every=0,
        sampling={"n": 4, "max_tokens": 6, "seed": 0},
    )
    policy, tokenizer = load_policy(str(tiny_model_dir), cfg)
    base_before = {n: p.detach().clone() for n, p in policy.named_parameters() if "lora_" not in n}
    lora_before = {n: p.detach().clone() for n, p in policy.named_parameters() if "lora_" in n}
    version_before = client.served_version(cfg.adapter_name) or 0

    last = loop.run(cfg, load_rows(cfg.data, mode), policy, tokenizer, client)

    params = dict(policy.named_parameters())
    assert all(torch.equal(params[n], p) for n, p in base_before.items()), "a base weight moved"
    moved = [n for n, p in lora_before.items() if not torch.equal(params[n], p)]
    assert len(moved) == len(lora_before), "every LoRA matrix should have moved"
    assert last is not None and (last / "adapter_model.safetensors").is_file()
    assert client.served_version(cfg.adapter_name) == version_before + STEPS

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-STEPS:]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert rows[-1]["policy_version"] == version_before + STEPS
    for row in rows:
        assert row["skipped"] is False and row["kl"] >= 0
        assert row["sampler_gap"] < 0.05  # vLLM and the learner agree on the sampled tokens' logprobs
        if mode == "supervised":
            assert 0 <= row["reward_mean"] <= 1
    # the server shows the rewards the learner computed, on the rollout they belong to
    scores = client.recent_samples(limit=1).samples[0].scores
    assert scores is not None and scores.step == STEPS and len(scores.rewards) == 2
