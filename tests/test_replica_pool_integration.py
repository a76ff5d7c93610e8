"""Two real rollout replicas (real vLLM on CPU, 127.0.0.1) behind one ServerLink: a version is
published to both or to none, both then sample it alike, and one killed and restarted mid-run is
re-synced before it samples again, the run losing no step."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
from peft import PeftModel

from learner.model import load_adapter_weights, load_policy
from learner.rollout_client import RolloutClient
from learner.server_link import ServerLink, logprob_canary
from shared.adapter_hash import adapter_sha256
from shared.config import LearnerConfig
from shared.errors import AdapterPublishError, RolloutServerError
from shared.schemas import RolloutRequest, SampleRecord
from tests.peft_adapters import random_adapter
from tests.servers import ReplicaServers, is_alive

pytestmark = pytest.mark.integration

REPLICAS = 2
PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
CANARY_PROMPT = [3, 4, 5, 6]


@pytest.fixture(scope="module")
def pool(replica_servers: ReplicaServers) -> Iterator[Pool]:
    """The session's two replicas (max LoRA ranks 16 and 8, conftest.REPLICA_MAX_LORA_RANKS), a
    client each. Adapters go under names of their own ('pool-v*'): the learner's are 'v000001'..."""
    clients = [RolloutClient(url) for url in replica_servers.urls()]
    try:
        yield Pool(replica_servers, clients)
    finally:
        for client in clients:
            client.close()


@dataclass(frozen=True)
class Pool:
    servers: ReplicaServers
    clients: list[RolloutClient]

    @property
    def adapter_root(self) -> Path:
        return self.servers.adapter_root

    def link(self) -> ServerLink:
        return ServerLink(self.clients, LearnerConfig(), canary=lambda *_: 0.0)


def greedy(client: RolloutClient, adapter: str | None, version: int) -> list[list[int]]:
    request = RolloutRequest(
        prompt_token_ids=PROMPTS,
        n=1,
        max_tokens=8,
        temperature=0,
        adapter=adapter,
        version=version if adapter else None,
    )
    return [r.completions[0].token_ids for r in client.generate(request, expected_version=version).results]


def test_every_replica_serves_the_published_version_alike(pool: Pool, tiny_model_dir: Path) -> None:
    link = pool.link()
    adapter = random_adapter(tiny_model_dir, pool.adapter_root / "pool-v1", seed=1)
    base = greedy(pool.clients[0], None, 0)
    link.publish(adapter, 1)

    cards = [client.served("policy") for client in pool.clients]
    assert [(c.version, c.sha256) for c in cards] == [(1, adapter_sha256(adapter))] * REPLICAS
    completions = [greedy(client, "policy", 1) for client in pool.clients]
    assert completions[0] == completions[1], "replicas sample the same version differently"
    assert completions[0] != base, "the adapter changes nothing: the test cannot tell versions apart"
    response = link.rollout(RolloutRequest(prompt_token_ids=PROMPTS, n=2, max_tokens=4, adapter=link.adapter))
    assert response.policy_version == 1 and len(response.results) == len(PROMPTS)


def test_a_version_one_replica_refuses_is_served_by_none(pool: Pool, tiny_model_dir: Path) -> None:
    link = pool.link()
    link.publish(random_adapter(tiny_model_dir, pool.adapter_root / "pool-v11", seed=2), 11)
    wide = random_adapter(tiny_model_dir, pool.adapter_root / "pool-v12", seed=3, rank=16)

    with pytest.raises(AdapterPublishError, match=r"127\.0\.0\.1:\d+ did not take adapter version 12"):
        link.publish(wide, 12)

    assert [client.served_version("policy") for client in pool.clients] == [11] * REPLICAS
    for client in pool.clients:
        with pytest.raises(RolloutServerError) as refused:
            greedy(client, "policy", 12)
        assert refused.value.status_code == 409  # nothing is stamped with version 12
    request = RolloutRequest(prompt_token_ids=PROMPTS, n=1, max_tokens=2, adapter=link.adapter)
    assert link.rollout(request).policy_version == 11


def test_a_replica_killed_and_restarted_is_resynced_before_it_samples_and_no_step_is_lost(
    pool: Pool, tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = pool.clients
    cfg = LearnerConfig()
    policy, tokenizer = load_policy(str(tiny_model_dir), cfg)  # the learner's: the canary scores with it
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    canary = partial(logprob_canary, policy=policy, prompt_ids=CANARY_PROMPT, cfg=cfg, pad_id=pad_id)
    link = ServerLink(pool.clients, cfg, canary)
    caplog.set_level(logging.INFO, logger="grpo-learner")

    # Step 1: version 21 on both replicas.
    link.publish(next_version(policy, tiny_model_dir, pool.adapter_root / "pool-v21", seed=4), 21)
    request = RolloutRequest(prompt_token_ids=PROMPTS, n=2, max_tokens=4, seed=0, adapter=link.adapter)
    assert link.rollout(request).policy_version == 21

    # B's whole process group (the server, its engine core and worker) killed by pid, and B started
    # again in the background, on its port with its flags.
    killed = pool.servers.kill(1)
    assert len(killed) >= 2, "no engine core below the server: the group kill is not tested"
    deadline = time.monotonic() + 30
    while any(is_alive(pid) for pid in killed):
        assert time.monotonic() < deadline, f"still alive after SIGKILL: {[p for p in killed if is_alive(p)]}"
        time.sleep(0.1)
    pool.servers.restart(1)

    # Step 2, B down: its prompts go to A, and version 22 is published to A alone.
    step_2 = link.rollout(request)
    assert step_2.policy_version == 21 and [len(r.completions) for r in step_2.results] == [2] * len(PROMPTS)
    assert f"{b.base_url} taken out of rotation" in caplog.text
    v22 = next_version(policy, tiny_model_dir, pool.adapter_root / "pool-v22", seed=5)
    link.publish(v22, 22)
    assert a.served_version("policy") == 22

    # B back (same port, /health answers): it serves no adapter, and a rollout pinned to the live
    # version is refused, not sampled from the base model.
    pool.servers.urls()
    assert b.served("policy") is None
    with pytest.raises(RolloutServerError) as refused:
        greedy(b, "policy", 22)
    assert refused.value.status_code == 409

    # Step 3: the link re-pushes version 22 to B (its hash checked), runs the canary there, puts
    # B back in rotation, and then samples from both replicas.
    seen = {client.base_url: {r.rollout_id for r in samples(client)} for client in pool.clients}
    caplog.clear()
    step_3 = link.rollout(request)
    assert step_3.policy_version == 22 and [len(r.completions) for r in step_3.results] == [2] * len(PROMPTS)
    resynced = rf"after re-loading version 22: {re.escape(b.base_url)} serves version 22 \(canary gap (\S+) nats"
    (gap,) = re.findall(resynced, caplog.text)
    assert float(gap) < 1e-3  # float32 on both sides; another adapter or the base is off by whole nats
    new = {
        client.base_url: [r for r in samples(client) if r.rollout_id not in seen[client.base_url]]
        for client in pool.clients
    }
    canary_records = [r for r in new[b.base_url] if r.results[0].prompt_token_ids == CANARY_PROMPT]
    assert [(r.adapter, r.policy_version) for r in canary_records] == [("policy", 22)]
    prompts_of = {
        url: [r.results[0].prompt_token_ids for r in records if r not in canary_records] for url, records in new.items()
    }
    assert all(prompts_of.values()), f"step 3 was not spread over both replicas: {prompts_of}"
    assert sorted(prompts_of[a.base_url] + prompts_of[b.base_url]) == sorted(PROMPTS)  # one request per prompt

    cards = [client.served("policy") for client in pool.clients]
    assert [(c.version, c.sha256) for c in cards] == [(22, adapter_sha256(v22))] * REPLICAS
    assert greedy(b, "policy", 22) == greedy(a, "policy", 22)


def next_version(policy: PeftModel, model_dir: Path, adapter_dir: Path, *, seed: int) -> Path:
    """A random adapter saved at `adapter_dir`, now also `policy`'s LoRA (as a learner's update
    leaves the policy holding the version it saves)."""
    random_adapter(model_dir, adapter_dir, seed=seed)
    load_adapter_weights(policy, adapter_dir)
    return adapter_dir


def samples(client: RolloutClient) -> list[SampleRecord]:
    """Every rollout the server still records, newest first."""
    return client.recent_samples(limit=1000).samples
