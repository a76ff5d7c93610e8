"""ServerLink against scripted rollout servers: routing over replicas, the publish protocol, and
recovery from restarts landing at chosen calls."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from learner.server_link import ServerLink
from shared.adapter_hash import adapter_sha256
from shared.config import LearnerConfig
from shared.errors import AdapterPublishError, RetiredVersionError, StaleAdapterError
from shared.schemas import RolloutRequest, SampleScores
from tests.scripted_servers import ScriptedServer, link, pool, save


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


def test_a_replica_holding_other_files_fails_a_publish_told_the_root_is_shared(tmp_path: Path) -> None:
    """With --adapter-transfer shared (auto uploads instead: test_adapter_upload.py)."""
    first, second = ScriptedServer("http://replica-0", tmp_path), ScriptedServer("http://replica-1", tmp_path)
    server_link = link([first, second], LearnerConfig(adapter_transfer="shared"))
    v1 = save(tmp_path, 1, b"one")
    second.root = tmp_path / "elsewhere"  # its adapter root holds another copy of v000001
    save(second.root, 1, b"corrupt")
    with pytest.raises(AdapterPublishError, match="sha256 .*--adapter-transfer upload"):
        server_link.publish(v1, 1)
    assert first.card is None and second.card is None and server_link.version == 0 and server_link.adapter is None


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


def test_a_rollout_pinned_to_a_replaced_version_is_retired_and_no_replica_taken_out(tmp_path: Path) -> None:
    # A rollout asked for ahead (learner.overlap) whose prompts reach the replicas after a publish.
    link, servers = pool(tmp_path, 2)
    link.publish(save(tmp_path, 1, b"one"), 1)
    pinned = link.pinned(request(link))
    assert (pinned.adapter, pinned.version) == ("policy", 1)
    for server in servers:
        server.release.clear()
    outcome: list[BaseException] = []
    thread = threading.Thread(target=lambda: _catch(outcome, lambda: link.rollout(pinned)))
    thread.start()
    link.publish(save(tmp_path, 2, b"two"), 2)
    for server in servers:
        server.release.set()
    thread.join(timeout=30)
    assert len(outcome) == 1 and isinstance(outcome[0], RetiredVersionError), outcome
    assert "version 2 replaced it" in str(outcome[0])
    # Both replicas serve version 2 and stay in rotation: the next rollout reaches both, nothing re-pushed.
    loads = [s.calls.count("load_adapter") for s in servers]
    for server in servers:
        server.rollouts.clear()
    assert link.rollout(request(link)).policy_version == 2
    assert all(s.rollouts for s in servers) and [s.calls.count("load_adapter") for s in servers] == loads


def test_versions_since_counts_versions_gone_live_not_their_numbers(tmp_path: Path) -> None:
    link, _ = pool(tmp_path, 1)
    assert link.versions_since(0) == 0
    link.publish(save(tmp_path, 5, b"five"), 5)  # a run whose first directory is v000005
    link.publish(save(tmp_path, 6, b"six"), 6)
    assert [link.versions_since(v) for v in (0, 5, 6)] == [2, 1, 0]


def _catch(outcome: list[BaseException], call) -> None:
    try:
        call()
    except BaseException as e:  # noqa: BLE001 - handed to the test's thread
        outcome.append(e)


def test_the_learner_releases_its_cached_gpu_memory_before_each_wake(tmp_path: Path) -> None:
    """The waking server maps its weights and KV cache back into memory the learner's allocator
    may still hold: the release comes first, and only before a call that wakes a sleeping server."""
    _, (server,) = pool(tmp_path, 1)
    link = ServerLink([server], LearnerConfig(), canary=lambda *_: 0.0, before_wake=lambda: server.calls.append("free"))
    link.publish(save(tmp_path, 1, b"one"), 1)  # awake: nothing to release
    link.sleep()
    link.rollout(request(link))
    link.sleep()
    link.publish(save(tmp_path, 2, b"two"), 2)
    assert [c for c in server.calls if c in ("free", "wake_up", "sleep")] == [
        "sleep",
        "free",
        "wake_up",
        "sleep",
        "free",
        "wake_up",
    ]


@pytest.mark.parametrize(("gap", "stops"), [(0.0, False), (5.0, True)])
def test_the_first_version_loaded_after_a_wake_is_checked_by_the_canary(
    tmp_path: Path, gap: float, stops: bool
) -> None:
    """A vLLM issue reported LoRA silently ignored after a level-1 wake: the run's first load into a
    woken server is checked, once, as a restarted one is."""
    _, (server,) = pool(tmp_path, 1)
    checked: list[int] = []

    def canary(client, adapter, version) -> float:
        checked.append(version)
        return gap

    link = ServerLink([server], LearnerConfig(), canary=canary)
    link.publish(save(tmp_path, 1, b"one"), 1)  # no server woken yet: nothing to check
    assert checked == []
    link.sleep()
    if stops:
        with pytest.raises(StaleAdapterError, match="after the run's first wake and the load of version 2"):
            link.publish(save(tmp_path, 2, b"two"), 2)
        return
    link.publish(save(tmp_path, 2, b"two"), 2)
    link.sleep()
    link.publish(save(tmp_path, 3, b"three"), 3)
    assert checked == [2]  # once per run
