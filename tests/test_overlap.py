"""One-step-off overlap (learner.overlap) over scripted rollout servers: what each step trains on,
how far behind it is, what is dropped, and where a checkpoint leaves the data."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from pydantic import ValidationError
from transformers import AutoTokenizer

from learner import loop
from learner.model import load_policy
from learner.overlap import Rollouts
from learner.prompts import PromptEncoder, PromptSampler, UnsupervisedRow
from learner.server_link import ServerLink
from shared.config import LearnerConfig
from tests.scripted_servers import ScriptedServer, save

ROWS = [UnsupervisedRow(text=f"document number {i} opens here") for i in range(8)]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def rollouts_over(
    tmp_path: Path, tokenizer, *, overlap: bool, steps: int = 4, **cfg
) -> tuple[Rollouts, ServerLink, list]:
    cfg = LearnerConfig(
        overlap=overlap,
        sleep_server=False,
        steps=steps,
        prompts_per_step=2,
        sampling={"n": 2, "max_tokens": 1, "seed": 7},
        **cfg,
    )
    servers = [ScriptedServer(f"http://replica-{i}", tmp_path) for i in range(2)]
    link = ServerLink(servers, cfg, canary=lambda client, adapter, version: 0.0)
    return Rollouts(link, PromptSampler(ROWS, 2, cfg.seed), PromptEncoder(tokenizer, cfg), cfg), link, servers


def wait_for_requests(servers: list[ScriptedServer], count: int) -> None:
    """Until the scripted servers hold `count` prompts' requests in all (the rollout asked for ahead)."""
    deadline = time.monotonic() + 10
    while sum(len(s.rollouts) for s in servers) < count:
        assert time.monotonic() < deadline, f"{count} requests expected, {sum(len(s.rollouts) for s in servers)} came"
        time.sleep(0.01)


def test_each_step_trains_on_the_version_before_the_last_update_with_the_prompts_and_seeds_of_sync(
    tmp_path: Path, tokenizer
) -> None:
    sync, sync_link, _ = rollouts_over(tmp_path / "sync", tokenizer, overlap=False)
    ahead, link, servers = rollouts_over(tmp_path / "ahead", tokenizer, overlap=True)
    taken = []
    for step in range(1, 5):
        want = sync.take(step)
        got = ahead.take(step)
        wait_for_requests(servers, 2 * (step + (step < 4)))  # step + 1's two prompts went out (not after the last)
        taken.append((got.rollout.policy_version, got.staleness, got.stale_dropped))
        # The same prompts, and completions drawn with the same seeds, as the synchronous loop's.
        assert got.rows == want.rows and got.prompt_ids_P == want.prompt_ids_P
        seeds = [[c.token_ids[0] for c in r.completions] for r in got.rollout.results]
        assert seeds == [[c.token_ids[0] for c in r.completions] for r in want.rollout.results]
        for each, root in ((link, tmp_path / "ahead"), (sync_link, tmp_path / "sync")):
            each.publish(save(root, step, f"v{step}".encode()), step)  # step's update goes live
    # Step 1 samples the base on its own; step t > 1 was asked for during step t - 1, from version t - 2.
    assert taken == [(0, 0, 0), (0, 1, 0), (1, 1, 0), (2, 1, 0)]
    pinned = [(r.adapter, r.version) for s in servers for r in s.rollouts]
    assert sorted(pinned, key=str) == sorted([(None, None)] * 4 + [("policy", 1)] * 2 + [("policy", 2)] * 2, key=str)


def test_a_rollout_whose_version_was_replaced_in_flight_is_dropped_and_sampled_again(tmp_path: Path, tokenizer) -> None:
    rollouts, link, servers = rollouts_over(tmp_path, tokenizer, overlap=True)
    link.publish(save(tmp_path, 1, b"one"), 1)
    rollouts.take(1)
    wait_for_requests(servers, 4)
    for server in servers:
        server.release.clear()  # step 3's prompts, asked for during step 2, reach the servers late
    link.publish(save(tmp_path, 2, b"two"), 2)
    assert rollouts.take(2).staleness == 1
    link.publish(save(tmp_path, 3, b"three"), 3)
    for server in servers:
        server.release.set()  # they arrive after version 3 replaced version 2: 409
    third = rollouts.take(3)
    assert (third.stale_dropped, third.rollout.policy_version, third.staleness) == (4, 3, 0)
    assert all(s.calls.count("load_adapter") == 3 for s in servers)  # no replica was taken out and re-synced


def test_a_checkpoint_holds_the_data_position_of_the_last_step_taken_not_of_the_batch_ahead(
    tmp_path: Path, tokenizer
) -> None:
    rollouts, _, servers = rollouts_over(tmp_path, tokenizer, overlap=True)
    rollouts.take(1)
    wait_for_requests(servers, 4)
    resumed = PromptSampler(ROWS, 2, seed=123)  # the seed is overwritten by the state
    resumed.load_state_dict(rollouts.state_dict())
    assert resumed.next_batch() == rollouts.take(2).rows  # the batch that was in flight comes next


def overlap_run(model_dir: Path, output_dir: Path, **cfg) -> tuple[list[tuple[int, int]], list[int]]:
    """Steps 1-4 of an overlap run over two scripted servers sharing its adapter folder, a checkpoint
    after each: the (step, version) every prompt was sampled from, and each step's staleness logged."""
    cfg = LearnerConfig(
        overlap=True,
        sleep_server=False,
        steps=4,
        prompts_per_step=2,
        sampling={"n": 2, "max_tokens": 1, "seed": 7},
        output_dir=output_dir,
        save_steps=1,
        save_total_limit=4,
        sample_every=0,
        **cfg,
    )
    policy, tokenizer = load_policy(str(model_dir), cfg)
    servers = [ScriptedServer(f"http://replica-{i}", output_dir / "adapters") for i in range(2)]
    loop.run(cfg, ROWS, policy, tokenizer, servers)
    stride = cfg.prompts_per_step * cfg.sampling.n  # seeds per step: a request's seed tells its step
    sampled = [(1 + (r.seed - 7) // stride, r.version or 0) for s in servers for r in s.rollouts]
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return sorted(sampled), [row["staleness"] for row in rows if "staleness" in row]


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list, list[int]]:
    """An overlap run of 4 steps, never stopped: its output_dir, what it sampled, its staleness."""
    output_dir = tmp_path_factory.mktemp("uninterrupted")
    return output_dir, *overlap_run(tiny_model_dir, output_dir)


@pytest.mark.parametrize("resumed_after", [1, 2])
def test_a_resumed_run_samples_the_step_that_was_in_flight_from_the_version_the_uninterrupted_run_did(
    tiny_model_dir: Path, tmp_path: Path, uninterrupted: tuple[Path, list, list[int]], resumed_after: int
) -> None:
    first_run, sampled, staleness = uninterrupted
    # Step t + 1 was asked for during step t from version t - 1 (0: the base, for steps 1 and 2).
    assert sampled == [(1, 0), (1, 0), (2, 0), (2, 0), (3, 1), (3, 1), (4, 2), (4, 2)]
    assert staleness == [0, 1, 1, 1]
    output_dir = tmp_path / "run"
    shutil.copytree(first_run, output_dir)  # killed after step 4: the resume rolls it back
    # What retention keeps and a resume serves first: the version the step in flight was pinned to.
    checkpointed = output_dir / "checkpoints" / f"step-{resumed_after:06d}"
    pinned = json.loads((checkpointed / "trainer_state.json").read_text())["overlap_sampled_adapter"]
    assert pinned == (None if resumed_after == 1 else f"v{resumed_after - 1:06d}")

    resumed, staleness = overlap_run(tiny_model_dir, output_dir, resume=str(checkpointed))

    assert resumed == [sample for sample in sampled if sample[0] > resumed_after]
    assert staleness == [0, 1, 1, 1]  # the rows kept, then the resumed run's, as the uninterrupted run's


def test_overlap_refuses_a_server_put_to_sleep() -> None:
    with pytest.raises(ValidationError, match="sleep_server false"):
        LearnerConfig(overlap=True)


def test_overlap_refuses_uncapped_importance_weights() -> None:
    # One version behind, exp(old - sampler) is no longer near 1: uncapped, one sequence could weigh e^20.
    with pytest.raises(ValidationError, match="tis_cap"):
        LearnerConfig(overlap=True, sleep_server=False, loss={"tis_cap": None})
    assert LearnerConfig(sleep_server=False, loss={"tis_cap": None}).loss.tis_cap is None  # on-policy: allowed


def test_there_is_no_staleness_bound_to_set() -> None:
    # One step ahead, a rollout is at most one version behind when its step starts (staleness 0 or
    # 1, logged): a bound of 1 or more never dropped anything, and 0 would drop every rollout.
    with pytest.raises(ValidationError, match="max_staleness"):
        LearnerConfig(overlap=True, sleep_server=False, max_staleness=1)
