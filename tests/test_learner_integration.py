"""A few GRPO steps of each mode against the real server process (real vLLM, real HTTP)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from learner import loop
from learner.data import load_data, load_rows
from learner.model import load_policy
from learner.prompts import PromptSampler
from learner.rollout_client import RolloutClient
from shared.adapter_hash import adapter_sha256
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

    last = loop.run(cfg, load_rows(cfg.data, mode), policy, tokenizer, [client])

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
    # the server shows the rewards the learner computed on the rollouts they belong to: one per prompt
    records = client.recent_samples(limit=2).samples
    assert all(r.scores is not None and r.scores.step == STEPS and len(r.scores.rewards) == 1 for r in records)


def test_reward_functions_reach_the_metrics_and_the_sample_log(
    tiny_model_dir: Path, run_dir: Path, client: RolloutClient
) -> None:
    cfg = LearnerConfig(
        mode="supervised",
        data=Path("examples/supervised.jsonl"),
        reward_funcs=["answer_perplexity", "tests/reward_fns/exact_match.py:exact_match"],
        reward_weights=[1.0, 0.5],
        output_dir=run_dir,
        steps=1,
        prompts_per_step=2,
        sample_every=0,
        sampling={"n": 4, "max_tokens": 6, "seed": 0},
    )
    policy, tokenizer = load_policy(str(tiny_model_dir), cfg)
    loop.run(cfg, load_rows(cfg.data, cfg.mode), policy, tokenizer, [client])

    row = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0 <= row["rewards/answer_perplexity/mean"] <= 1 and 0 <= row["rewards/exact_match/mean"] <= 1
    # The step's rollout, scored (the canary after the run's first wake sampled after it, unscored).
    (scores,) = [s.scores for s in client.recent_samples(limit=2).samples if s.scores is not None]
    assert list(scores.components) == ["answer_perplexity", "exact_match"]
    perplexity, exact = scores.components["answer_perplexity"], scores.components["exact_match"]
    for p, rewards_G in enumerate(scores.rewards):
        assert all(e in (0.0, 1.0) for e in exact[p])  # every row has an answer: no None
        want_G = [a + 0.5 * e for a, e in zip(perplexity[p], exact[p], strict=True)]
        assert rewards_G == pytest.approx(want_G, rel=1e-6, abs=1e-7)


def test_evaluation_runs_before_the_first_step_and_every_eval_steps(
    tiny_model_dir: Path, run_dir: Path, client: RolloutClient
) -> None:
    cfg = LearnerConfig(
        mode="supervised",
        data=Path("examples/supervised.jsonl"),
        eval_fraction=0.1,
        eval_steps=1,
        output_dir=run_dir,  # the server's adapter root
        steps=2,
        prompts_per_step=2,
        sample_every=0,
        sampling={"n": 4, "max_tokens": 6, "seed": 0},
    )
    data = load_data(cfg)
    policy, tokenizer = load_policy(str(tiny_model_dir), cfg)
    metrics = run_dir / "metrics.jsonl"  # shared with the module's other runs
    before = len(metrics.read_text().splitlines()) if metrics.exists() else 0
    loop.run(cfg, data.train, policy, tokenizer, [client], eval_rows=data.eval)

    rows = [json.loads(line) for line in metrics.read_text().splitlines()[before:]]
    evals = [r for r in rows if "eval/reward_mean" in r]
    assert [r["step"] for r in evals] == [0, 1, 2]
    for r in evals:
        assert r["eval/completions"] == len(data.eval)  # greedy: one completion per held-out row
        assert 0 <= r["eval/reward_mean"] <= 1 and 0 <= r["eval/exact_match"] <= 1
    # step 0 evaluated the base, later ones the version served after their step
    assert evals[0]["eval/reward_mean"] != evals[-1]["eval/reward_mean"]


def without_earlier_runs(run_dir: Path) -> Path:
    """`run_dir` without the earlier tests' run outputs, for the CLI, which takes one run per output
    directory (their adapter versions stay: the module's server serves them)."""
    for name in ("samples", "tensorboard", "checkpoints"):
        shutil.rmtree(run_dir / name, ignore_errors=True)
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    return run_dir


def test_the_cli_trains_on_parquet_chat_prompts_with_a_reward_function_by_path_and_tensorboard(
    tiny_model_dir: Path, run_dir: Path, client: RolloutClient
) -> None:
    """What a new user does: chat prompts in a Parquet file, their own TRL-style reward function
    by path beside a built-in, TensorBoard, evaluation; the console script's own entry point."""
    datasets = pytest.importorskip("datasets")
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from learner.cli import main

    data = run_dir / "chat.parquet"
    rows = [
        {"prompt": [{"role": "user", "content": f"{a}+{b}="}], "answer": str(a + b), "level": a % 2}
        for a in range(6)
        for b in range(3)
    ]
    datasets.Dataset.from_list(rows).to_parquet(str(data))
    out = without_earlier_runs(run_dir)  # the server's adapter root is out/adapters
    main(
        [
            *("--mode", "supervised", "--data", str(data), "--model", str(tiny_model_dir)),
            *("--server-url", str(client._http.base_url), "--output-dir", str(out), "--steps", "2"),
            *("--prompts-per-step", "2", "--sampling-n", "4", "--sampling-max-tokens", "6", "--sample-every", "0"),
            *("--reward-funcs", "answer_perplexity", "tests/reward_fns/exact_match.py:exact_match"),
            *("--reward-weights", "1", "0.5", "--report-to", "tensorboard"),
            *("--eval-fraction", "0.2", "--eval-steps", "2"),
        ]
    )

    rows_out = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows_out if "reward_mean" in r]
    assert [r["step"] for r in train] == [1, 2]
    assert all(0 <= r["rewards/exact_match/mean"] <= 1 for r in train)
    assert [r["step"] for r in rows_out if "eval/reward_mean" in r] == [0, 2]
    record = json.loads((out / "samples" / "step_000002.jsonl").read_text())
    assert record["results"][0]["prompt"][0]["role"] == "user"  # the chat prompt, as the file gave it
    assert set(record["scores"]["components"]) == {"answer_perplexity", "exact_match"}
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert {"reward_mean", "eval/reward_mean", "rewards/exact_match/mean"} <= set(events.Tags()["scalars"])


def test_one_step_off_overlap_trains_each_step_one_version_behind(
    tiny_model_dir: Path, run_dir: Path, client: RolloutClient
) -> None:
    """--overlap: step t + 1 samples during step t (from the version before its update), while
    evaluation rollouts run beside it; a checkpoint taken meanwhile keeps the step's data position."""
    from learner.cli import main

    out = without_earlier_runs(run_dir)  # the server's adapter root is out/adapters
    metrics = out / "metrics.jsonl"
    version_before = client.served_version("policy") or 0
    try:
        main(
            [
                *("--mode", "supervised", "--data", "examples/supervised.jsonl", "--model", str(tiny_model_dir)),
                *("--server-url", str(client._http.base_url), "--output-dir", str(out), "--steps", "3"),
                *("--overlap", "--no-sleep-server", "--save-steps", "2", "--learning-rate", "1e-2"),
                *("--prompts-per-step", "2", "--sampling-n", "4", "--sampling-max-tokens", "6", "--sample-every", "0"),
                *("--eval-fraction", "0.2", "--eval-steps", "1"),
            ]
        )
        state = json.loads((out / "checkpoints" / "step-000002" / "trainer_state.json").read_text())
    finally:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)  # the module's later runs start fresh here

    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    train = [r for r in rows if "reward_mean" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    # Step 1 samples the base on its own; steps 2 and 3 were sampled during the step before, one version behind.
    assert [r["staleness"] for r in train] == [0, 1, 1] and all(r["stale_dropped"] == 0 for r in train)
    assert [r["policy_version"] for r in train] == [version_before + s for s in (1, 2, 3)]
    for row in train:
        assert row["skipped"] is False and row["is_weight"] > 0 and row["is_weight_p99"] > 0
    assert [r["step"] for r in rows if "eval/reward_mean" in r] == [0, 1, 2, 3]
    # Resuming at step 3 draws step 3's prompts again: the checkpoint is at step 2's position, not step 3's.
    samples_3 = json.loads((out / "samples" / "step_000003.jsonl").read_text())
    sampler = PromptSampler(
        load_data(LearnerConfig(mode="supervised", eval_fraction=0.2, data=Path("examples/supervised.jsonl"))).train,
        2,
        0,
    )
    sampler.load_state_dict(state["prompts"])
    assert [row.prompt for row in sampler.next_batch()] == [r["prompt"] for r in samples_3["results"]]


def test_a_learner_that_does_not_share_the_servers_adapter_root_uploads_each_version(
    tiny_model_dir: Path, client: RolloutClient, tmp_path: Path
) -> None:
    """Issue 20's first finding: a server started with one adapter root (the module's run_dir) and
    a learner writing its versions elsewhere; each version goes over HTTP (adapter_transfer auto).
    With keep_adapters 0 (issue 21: bounded disk) the run keeps only the live version and the one
    before it."""
    cfg = LearnerConfig(
        output_dir=tmp_path / "elsewhere",
        adapter_name="uploaded",
        keep_adapters=0,
        steps=3,
        prompts_per_step=2,
        sample_every=0,
        sampling={"n": 2, "max_tokens": 4, "seed": 0},
    )
    policy, tokenizer = load_policy(str(tiny_model_dir), cfg)
    last = loop.run(cfg, load_rows(cfg.data, cfg.mode), policy, tokenizer, [client])
    card = client.served("uploaded")
    assert (card.version, card.sha256) == (3, adapter_sha256(last))
    assert card.root == f"uploads/{card.sha256}"  # relative to the server's root: not the learner's folder
    assert sorted(p.name for p in (cfg.output_dir / "adapters").iterdir()) == ["v000002", "v000003"]
