"""ServerLink against scripted rollout servers: routing over replicas, the publish protocol, and
recovery from restarts landing at chosen calls."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import pytest

from learner.server_link import ServerLink
from shared.adapter_hash import adapter_sha256
from shared.config import LearnerConfig
from shared.errors import AdapterPublishError, RolloutServerError
from shared.schemas import Completion, PromptRollout, RolloutRequest, RolloutResponse, SampleScores


class ScriptedServer:
    """The client of one rollout server under the adapter root `root`. A server that dies comes
    back fresh (awake, no adapter) at the next /health probe, as a supervisor would restart it."""

    def __init__(self, url: str, root: Path) -> None:
        self.base_url, self.root = url, root
        self.alive, self.sleeping, self.card = True, False, None
        self.calls: list[str] = []
        self.die_before: str | None = None  # the next call of this name finds the server dead
        self.refuse_loads = False
        self.rollouts: list[RolloutRequest] = []
        self.posted: list[tuple[str, SampleScores]] = []

    def _enter(self, name: str) -> None:
        self.calls.append(name)
        if self.die_before == name:
            self.die_before, self.alive = None, False
        if not self.alive:
            raise RolloutServerError(0, "connection refused")

    def is_healthy(self, timeout_s: float = 2.0) -> bool:
        self.calls.append("is_healthy")
        if not self.alive:
            self.alive, self.sleeping, self.card = True, False, None
        return True

    def wake_up(self) -> None:
        self._enter("wake_up")
        self.sleeping = False

    def wake_up_on_exit(self) -> None:
        self.wake_up()

    def sleep(self, level: int = 1, lease_s: float | None = None) -> None:
        self._enter("sleep")
        self.sleeping = True

    def served(self, name: str):
        self._enter("served")
        return self.card

    def load_adapter(self, name: str, path: str, *, version: int | None = None):
        self._enter("load_adapter")
        if self.sleeping:
            raise RolloutServerError(503, "the server is asleep")
        if self.refuse_loads:
            raise RolloutServerError(400, f"cannot read {path}")
        self.card = SimpleNamespace(version=version, sha256=adapter_sha256(self.root / path))
        return self.card

    def unload_adapter(self, name: str) -> None:
        self._enter("unload_adapter")
        self.card = None

    def generate(self, request: RolloutRequest, *, expected_version: int) -> RolloutResponse:
        self._enter("generate")
        served = self.card.version if self.card else None
        if request.version is not None and served != request.version:
            raise RolloutServerError(409, f"serves version {served}, not {request.version}")
        self.rollouts.append(request)
        (ids,) = request.prompt_token_ids
        completions = [
            Completion(text="", token_ids=[request.seed + j], logprobs=[-1.0], finish_reason="length")
            for j in range(request.n)
        ]
        return RolloutResponse(
            rollout_id=f"{self.base_url}-{len(self.rollouts)}",
            adapter=request.adapter,
            policy_version=served or 0,
            results=[PromptRollout(prompt=None, prompt_token_ids=ids, completions=completions)],
            created_at=datetime.now(UTC),
        )

    def post_scores(self, rollout_id: str, scores: SampleScores) -> None:
        self.posted.append((rollout_id, scores))


def save(root: Path, version: int, content: bytes) -> Path:
    adapter = root / f"v{version:06d}"
    adapter.mkdir(parents=True)
    (adapter / "adapter_model.safetensors").write_bytes(content)
    return adapter


def pool(tmp_path: Path, count: int) -> tuple[ServerLink, list[ScriptedServer]]:
    servers = [ScriptedServer(f"http://replica-{i}", tmp_path) for i in range(count)]
    return ServerLink(servers, LearnerConfig(), canary=lambda client, adapter, version: 0.0), servers


def request(link: ServerLink, prompts: int = 4, n: int = 2) -> RolloutRequest:
    return RolloutRequest(
        prompt_token_ids=[[i + 1] for i in range(prompts)], n=n, max_tokens=1, seed=100, adapter=link.adapter
    )


def test_a_server_restarted_under_a_sleep_call_is_woken_before_the_next_load(tmp_path: Path) -> None:
    link, (server,) = pool(tmp_path, 1)
    link.publish(save(tmp_path, 1, b"one"), 1)
    server.die_before = "sleep"
    link.sleep()  # the server dies: the link waits, re-pushes v1, and sleeps the new server
    assert server.sleeping and server.card.version == 1
    server.calls.clear()
    link.publish(save(tmp_path, 2, b"two"), 2)
    assert server.card.version == 2 and not server.sleeping
    # The sleep that followed the re-push is known: v2 goes out after one wake, with no second recovery.
    assert server.calls == ["wake_up", "load_adapter"]


def test_prompts_spread_over_replicas_with_the_seeds_of_one_request(tmp_path: Path) -> None:
    link, servers = pool(tmp_path, 2)
    link.publish(save(tmp_path, 1, b"one"), 1)
    response = link.rollout(request(link))
    assert all(server.rollouts for server in servers)  # both replicas served prompts
    assert [r.prompt_token_ids for r in response.results] == [[1], [2], [3], [4]]  # in prompt order
    # Prompt i samples with seeds 100 + 2i, 100 + 2i + 1, wherever it went; pinned to version 1.
    assert [[c.token_ids[0] for c in r.completions] for r in response.results] == [
        [100, 101],
        [102, 103],
        [104, 105],
        [106, 107],
    ]
    assert {r.version for s in servers for r in s.rollouts} == {1} and response.policy_version == 1
    # Scores go to the replica that made each prompt's part, one prompt's row each.
    scores = SampleScores(rewards=[[float(i), 0.0] for i in range(4)], advantages=[[0.0, 0.0]] * 4, step=1)
    link.post_scores(response.rollout_id, scores, 1)
    posted = sorted((rewards, s.base_url) for s in servers for _, sc in s.posted for rewards in sc.rewards)
    assert [rewards[0] for rewards, _ in posted] == [0.0, 1.0, 2.0, 3.0]


def test_a_version_one_replica_refuses_is_served_by_none(tmp_path: Path) -> None:
    link, (first, second) = pool(tmp_path, 2)
    v1 = save(tmp_path, 1, b"one")
    link.publish(v1, 1)
    second.refuse_loads = True
    with pytest.raises(AdapterPublishError, match="http://replica-1 did not take adapter version 2"):
        link.publish(save(tmp_path, 2, b"two"), 2)
    # The replica that took version 2 went back to version 1: nobody serves 2, rollouts ask for 1.
    assert (first.card.version, first.card.sha256) == (1, adapter_sha256(v1))
    assert second.card.version == 1 and link.version == 1
    assert link.rollout(request(link)).policy_version == 1


def test_a_replica_holding_other_files_fails_the_publish(tmp_path: Path) -> None:
    link, (first, second) = pool(tmp_path, 2)
    v1 = save(tmp_path, 1, b"one")
    second.root = tmp_path / "elsewhere"  # its adapter root holds another copy of v000001
    save(second.root, 1, b"corrupt")
    with pytest.raises(AdapterPublishError, match="sha256"):
        link.publish(v1, 1)
    assert first.card is None and second.card is None and link.version == 0 and link.adapter is None


def test_a_replica_that_restarts_is_taken_out_then_resynced_and_put_back(tmp_path: Path) -> None:
    link, (first, second) = pool(tmp_path, 2)
    v1 = save(tmp_path, 1, b"one")
    link.publish(v1, 1)
    second.die_before = "generate"
    response = link.rollout(request(link))  # the dead replica's prompts go to the other one
    assert [r.prompt_token_ids for r in response.results] == [[1], [2], [3], [4]]
    assert {r.prompt_token_ids[0][0] for r in first.rollouts} == {1, 2, 3, 4}
    # The next rollout finds it healthy again (restarted, empty): re-pushed v1, checked, back in rotation.
    link.rollout(request(link))
    assert (second.card.version, second.card.sha256) == (1, adapter_sha256(v1))
    assert second.rollouts, "the re-synced replica serves again"


def test_a_replica_that_fell_behind_answers_409_and_is_resynced(tmp_path: Path) -> None:
    link, (first, second) = pool(tmp_path, 2)
    link.publish(save(tmp_path, 1, b"one"), 1)
    second.card = None  # it lost the adapter (an operator unloaded it, say) without restarting
    link.rollout(request(link))  # its 409s take it out of rotation; the other replica serves every prompt
    assert second.calls.count("load_adapter") == 1 and not second.rollouts  # the publish's load
    link.rollout(request(link))  # re-pushed before this one
    assert second.calls.count("load_adapter") == 2 and second.card.version == 1 and second.rollouts


def test_a_follower_pins_the_version_another_link_published_and_resyncs_with_it(tmp_path: Path) -> None:
    # Two torchrun ranks' links over the same replicas: rank 0's publishes, rank 1's follows.
    publisher, servers = pool(tmp_path, 2)
    follower = ServerLink(servers, LearnerConfig(), canary=lambda client, adapter, version: 0.0)
    v1 = save(tmp_path, 1, b"one")
    publisher.publish(v1, 1)
    loads = [s.calls.count("load_adapter") for s in servers]
    follower.follow(v1, 1)
    assert (follower.adapter, follower.version) == ("policy", 1)
    assert [s.calls.count("load_adapter") for s in servers] == loads  # nothing loaded twice
    assert follower.rollout(request(follower)).policy_version == 1
    assert {r.version for s in servers for r in s.rollouts} == {1}  # pinned, on both replicas
    # A replica that restarts under the follower gets the followed version, with its hash checked.
    servers[1].die_before = "generate"
    follower.rollout(request(follower))
    follower.rollout(request(follower))
    assert (servers[1].card.version, servers[1].card.sha256) == (1, adapter_sha256(v1))
