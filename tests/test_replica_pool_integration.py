"""Two real rollout replicas (real vLLM on CPU, 127.0.0.1) behind one ServerLink: a version is
published to both or to none, and both then sample it alike."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from learner.local_server import local_rollout_server
from learner.rollout_client import RolloutClient
from learner.server_link import ServerLink
from shared.adapter_hash import adapter_sha256
from shared.config import LearnerConfig
from shared.errors import AdapterPublishError, RolloutServerError
from shared.schemas import RolloutRequest
from tests.peft_adapters import random_adapter
from tests.servers import started_together

pytestmark = pytest.mark.integration

REPLICAS = 2
PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]


MAX_LORA_RANKS = [16, 8]  # replica 1 refuses an adapter of rank 16: a version one replica cannot take


@pytest.fixture(scope="module")
def replicas(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    """Two servers of the tiny model sharing one adapter root (as replicas on a shared volume do),
    started together, with a client each."""
    root = tmp_path_factory.mktemp("replicas")
    servers = [
        lambda i=i: local_rollout_server(
            str(tiny_model_dir),
            root / "adapters",
            log_path=root / f"server-{i}.log",
            extra_args=["--dtype", "float32", "--max-lora-rank", str(MAX_LORA_RANKS[i])],
            env={"ROLLOUT_API_KEY": ""},
        )
        for i in range(REPLICAS)
    ]
    with started_together(servers) as urls:
        clients = [RolloutClient(url) for url in urls]
        try:
            yield Replicas(root / "adapters", clients)
        finally:
            for client in clients:
                client.close()


@dataclass(frozen=True)
class Replicas:
    adapter_root: Path
    clients: list[RolloutClient]

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


def test_every_replica_serves_the_published_version_alike(replicas: Replicas, tiny_model_dir: Path) -> None:
    link = replicas.link()
    adapter = random_adapter(tiny_model_dir, replicas.adapter_root / "pool-v1", seed=1)
    base = greedy(replicas.clients[0], None, 0)
    link.publish(adapter, 1)

    cards = [client.served("policy") for client in replicas.clients]
    assert [(c.version, c.sha256) for c in cards] == [(1, adapter_sha256(adapter))] * REPLICAS
    completions = [greedy(client, "policy", 1) for client in replicas.clients]
    assert completions[0] == completions[1], "replicas sample the same version differently"
    assert completions[0] != base, "the adapter changes nothing: the test cannot tell versions apart"
    response = link.rollout(RolloutRequest(prompt_token_ids=PROMPTS, n=2, max_tokens=4, adapter=link.adapter))
    assert response.policy_version == 1 and len(response.results) == len(PROMPTS)


def test_a_version_one_replica_refuses_is_served_by_none(replicas: Replicas, tiny_model_dir: Path) -> None:
    link = replicas.link()
    link.publish(random_adapter(tiny_model_dir, replicas.adapter_root / "pool-v11", seed=2), 11)
    wide = random_adapter(tiny_model_dir, replicas.adapter_root / "pool-v12", seed=3, rank=16)

    with pytest.raises(AdapterPublishError, match=r"127\.0\.0\.1:\d+ did not take adapter version 12"):
        link.publish(wide, 12)

    assert [client.served_version("policy") for client in replicas.clients] == [11] * REPLICAS
    for client in replicas.clients:
        with pytest.raises(RolloutServerError) as refused:
            greedy(client, "policy", 12)
        assert refused.value.status_code == 409  # nothing is stamped with version 12
    request = RolloutRequest(prompt_token_ids=PROMPTS, n=1, max_tokens=2, adapter=link.adapter)
    assert link.rollout(request).policy_version == 11
