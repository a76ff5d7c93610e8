"""The `openai` client against the real server (real vLLM on CPU, the tiny model, an API key):
both OpenAI-compatible routes, the base model and an adapter, answer what POST /v1/rollouts answers
for the same greedy request, and are recorded as samples."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import KEYED_SERVER_KEY, KeyedServer

pytestmark = pytest.mark.integration

KEY = KEYED_SERVER_KEY
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPTS = ["12+7=", "the cat"]
CONVERSATION = [{"role": "user", "content": "3+4="}]


@pytest.fixture(scope="module")
def server(keyed_server: KeyedServer) -> str:
    """The shared real server with the API key set, serving the adapter 'policy' (version 1)."""
    return keyed_server.url


def greedy_rollout(url: str, prompts: list, adapter: str | None) -> list[dict]:
    """Each prompt's one greedy completion from POST /v1/rollouts."""
    body = {"prompts": prompts, "n": 1, "max_tokens": 6, "temperature": 0, "adapter": adapter}
    r = httpx.post(f"{url}/v1/rollouts", json=body, headers=AUTH, timeout=120)
    assert r.status_code == 200, r.text
    return [result["completions"][0] for result in r.json()["results"]]


def test_the_openai_client_samples_the_base_and_the_adapter(server: str, tiny_model_dir: Path) -> None:
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)
    base = tiny_model_dir.name
    assert {m.id for m in client.models.list()} == {base, "policy"}
    answered: dict[str, tuple[str, int]] = {}  # response id -> (model, policy_version)
    for model, adapter, version in [(base, None, 0), ("policy", "policy", 1)]:
        completion = client.completions.create(model=model, prompt=PROMPTS, max_tokens=6, temperature=0, logprobs=0)
        expected = greedy_rollout(server, PROMPTS, adapter)
        assert completion.object == "text_completion" and completion.model == model
        assert completion.model_dump()["policy_version"] == version
        assert [c.text for c in completion.choices] == [e["text"] for e in expected]
        assert [c.finish_reason for c in completion.choices] == [e["finish_reason"] for e in expected]
        for choice, e in zip(completion.choices, expected, strict=True):
            assert len(choice.logprobs.tokens) == len(e["token_ids"])
            # The same greedy tokens, so the same sampler logprobs (up to batching in float32).
            assert choice.logprobs.token_logprobs == pytest.approx(e["logprobs"], abs=1e-4)
        assert completion.usage.completion_tokens == sum(len(e["token_ids"]) for e in expected)
        answered[completion.id] = (model, version)

        reply = client.chat.completions.create(
            model=model, messages=CONVERSATION, max_tokens=6, temperature=0, logprobs=True
        )
        (expected_turn,) = greedy_rollout(server, [CONVERSATION], adapter)
        (choice,) = reply.choices
        assert reply.object == "chat.completion" and choice.message.role == "assistant"
        assert choice.message.content == expected_turn["text"]
        assert [t.logprob for t in choice.logprobs.content] == pytest.approx(expected_turn["logprobs"], abs=1e-4)
        assert reply.model_dump()["policy_version"] == version
        answered[reply.id] = (model, version)

    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="nope", messages=CONVERSATION, max_tokens=2)
    assert missing.value.code == "model_not_found"

    # Each answer is in the sample log under its id, stamped with its adapter and version.
    samples = httpx.get(f"{server}/v1/samples?limit=50", headers=AUTH).json()["samples"]
    recorded = {s["rollout_id"]: (s["adapter"], s["policy_version"]) for s in samples}
    for response_id, (model, version) in answered.items():
        rollout_id = response_id.removeprefix("chatcmpl-").removeprefix("cmpl-")
        assert recorded[rollout_id] == (None if model == base else model, version)
