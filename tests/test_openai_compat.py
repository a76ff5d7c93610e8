"""The OpenAI-compatible routes over a fake engine: translation to and from rollouts, the service's
guards (404 model, 503 asleep, 409 merged, bounds), OpenAI's error shape, and the `openai` client
parsing the answers (real vLLM: test_openai_compat_integration.py)."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
from fastapi.testclient import TestClient

from rollout_server.app import build_app
from shared.config import ServerConfig
from shared.schemas import ChatMessage, OpenAIErrorResponse
from tests.fakes import FakeEngine, fake_server_config, write_fake_adapter

KEY = "s3cret"


@pytest.fixture
def cfg(tmp_path: Path) -> ServerConfig:
    return fake_server_config(tmp_path)


@pytest.fixture
def engine(cfg: ServerConfig) -> FakeEngine:
    return FakeEngine(max_model_len=cfg.max_model_len)


@pytest.fixture
def client(cfg: ServerConfig, engine: FakeEngine):
    with TestClient(build_app(cfg, api_key="", engine_factory=lambda _: engine), raise_server_exceptions=False) as c:
        yield c


def complete(client: TestClient, **body) -> dict:
    r = client.post("/v1/completions", json={"model": "base", "prompt": "hi", "max_tokens": 3, **body})
    assert r.status_code == 200, r.text
    return r.json()


def chat(client: TestClient, **body) -> dict:
    messages = [{"role": "user", "content": "hi"}]
    r = client.post("/v1/chat/completions", json={"model": "base", "messages": messages, "max_tokens": 3, **body})
    assert r.status_code == 200, r.text
    return r.json()


def openai_error(r, status: int, *needles: str) -> dict:
    """The `error` object of an answer in OpenAI's shape, whose message names every needle."""
    assert r.status_code == status, r.text
    error = OpenAIErrorResponse.model_validate_json(r.content).error
    for needle in needles:
        assert needle in error.message, error.message
    return error.model_dump()


def load_policy(client: TestClient, cfg: ServerConfig) -> None:
    write_fake_adapter(cfg.adapter_root / "v1")
    r = client.post("/v1/load_lora_adapter", json={"lora_name": "policy", "lora_path": "v1"})
    assert r.status_code == 200, r.text


def test_completions_of_the_base_in_openais_shape(client: TestClient, engine: FakeEngine) -> None:
    body = complete(client, prompt=["ab", "c"], n=2, seed=10)
    assert body["object"] == "text_completion" and body["model"] == "base" and body["policy_version"] == 0
    # index = prompt * n + completion; the fake's texts say adapter int_id 0 (the base) and j.
    assert [(c["index"], c["text"], c["finish_reason"]) for c in body["choices"]] == [
        (0, "v0-0", "length"),
        (1, "v0-1", "length"),
        (2, "v0-0", "length"),
        (3, "v0-1", "length"),
    ]
    assert all(c["logprobs"] is None for c in body["choices"])  # not asked for
    # prompts "ab" and "c" are 2 + 1 byte tokens, each counted once; 4 completions x 3 fake tokens
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 12, "total_tokens": 15}
    assert [ids for ids, _ in engine.requests[1:]] == [[97, 98], [99]]  # after the start's warm-up
    assert isinstance(body["created"], int)


def test_sampling_fields_reach_the_engine_as_a_rollout(client: TestClient, engine: FakeEngine) -> None:
    complete(client, n=3, max_tokens=5, temperature=0.7, top_p=0.9, seed=4, stop="\n")
    _, request = engine.requests[1]  # after the start's warm-up
    assert (request.n, request.max_tokens, request.temperature, request.top_p) == (3, 5, 0.7, 0.9)
    assert (request.seed, request.stop, request.adapter) == (4, ["\n"], None)
    chat(client, stop=["a", "b"], max_tokens=4, max_completion_tokens=6)
    _, request = engine.requests[-1]
    assert request.stop == ["a", "b"]
    assert request.max_tokens == 6  # max_completion_tokens, OpenAI's newer name, wins
    assert request.prompts == [[ChatMessage(role="user", content="hi")]]
    complete(client)
    _, request = engine.requests[-1]
    assert (request.n, request.max_tokens, request.temperature, request.stop) == (1, 3, 1.0, [])


def test_the_default_max_tokens_is_openais_16(client: TestClient, engine: FakeEngine) -> None:
    assert client.post("/v1/completions", json={"model": "base", "prompt": "hi"}).status_code == 200
    assert engine.requests[-1][1].max_tokens == 16


def test_an_adapter_is_named_by_model_and_answers_with_its_version(client: TestClient, cfg: ServerConfig) -> None:
    load_policy(client, cfg)
    body = complete(client, model="policy")
    assert body["policy_version"] == 1 and body["model"] == "policy"
    assert body["choices"][0]["text"] == "v1-0"  # made with adapter int_id 1
    assert chat(client, model="policy")["choices"][0]["message"] == {"role": "assistant", "content": "v1-0"}


def test_chat_renders_the_conversation_and_answers_as_the_assistant(client: TestClient, engine: FakeEngine) -> None:
    body = chat(client, n=2, messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert [(c["index"], c["message"]["role"], c["message"]["content"]) for c in body["choices"]] == [
        (0, "assistant", "v0-0"),
        (1, "assistant", "v0-1"),
    ]
    # The fake renders a conversation as "role:content" per message: "system:be brief" + "user:hi"
    assert engine.requests[-1][0] == list(b"system:be briefuser:hi")
    assert body["usage"] == {"prompt_tokens": 22, "completion_tokens": 6, "total_tokens": 28}


def test_chat_template_kwargs_reach_the_template_as_vllms_do(client: TestClient, engine: FakeEngine) -> None:
    chat(client, chat_template_kwargs={"enable_thinking": False})
    assert engine.rendered[-1] == ([{"role": "user", "content": "hi"}], {"enable_thinking": False})
    # What the rendering itself sets is not a template keyword.
    r = client.post(
        "/v1/chat/completions",
        json={"model": "base", "messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"tools": []}},
    )
    openai_error(r, 422, "chat_template_kwargs", "'tools'")


def test_a_conversation_ends_with_a_turn_to_answer_or_an_assistant_prefill_to_continue(
    client: TestClient, engine: FakeEngine
) -> None:
    prefill = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure,"}]
    chat(client, messages=prefill)
    assert engine.rendered[-1] == (prefill, {})
    r = client.post(
        "/v1/chat/completions",
        json={"model": "base", "messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "x"}]},
    )
    openai_error(r, 422, "messages", "its role is 'system'")


def test_logprobs_are_the_sampler_logprobs_of_each_token(client: TestClient) -> None:
    # The fake's completion j has token ids [0, j, seed] with logprobs [-1, -2, -3]; its token texts
    # are "<id>", so the offsets are 0, 3 ("<0>"), 6 ("<0><0>").
    choice = complete(client, logprobs=0, seed=0)["choices"][0]
    assert choice["logprobs"] == {
        "tokens": ["<0>", "<0>", "<0>"],
        "token_logprobs": [-1.0, -2.0, -3.0],
        "top_logprobs": None,
        "text_offset": [0, 3, 6],
    }
    content = chat(client, logprobs=True, seed=5)["choices"][0]["logprobs"]["content"]
    assert [(t["token"], t["logprob"], t["bytes"]) for t in content] == [
        ("<0>", -1.0, [60, 48, 62]),
        ("<0>", -2.0, [60, 48, 62]),
        ("<5>", -3.0, [60, 53, 62]),
    ]
    assert all(t["top_logprobs"] == [] for t in content)
    assert chat(client)["choices"][0]["logprobs"] is None


def test_answers_are_recorded_as_samples_stamped_with_adapter_and_version(
    client: TestClient, cfg: ServerConfig
) -> None:
    load_policy(client, cfg)
    completion = complete(client, model="policy", prompt="ab")
    conversation = chat(client)
    newest, older = client.get("/v1/samples?limit=2").json()["samples"]
    assert conversation["id"] == f"chatcmpl-{newest['rollout_id']}"
    assert (newest["adapter"], newest["policy_version"]) == (None, 0)
    assert newest["results"][0]["prompt"] == [{"role": "user", "content": "hi"}]
    assert completion["id"] == f"cmpl-{older['rollout_id']}"
    assert (older["adapter"], older["policy_version"]) == ("policy", 1)
    assert older["results"][0]["prompt"] == "ab"
    assert [c["text"] for c in older["results"][0]["completions"]] == ["v1-0"]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_an_unknown_model_is_openais_404(client: TestClient, path: str) -> None:
    body = {"model": "nope", "prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}
    body.pop("messages" if path == "/v1/completions" else "prompt")
    error = openai_error(client.post(path, json=body), 404, "'nope'", "GET /v1/models")
    assert error["type"] == "not_found_error"
    assert (error["param"], error["code"]) == ("model", "model_not_found")


@pytest.mark.parametrize(
    ("body", "status", "needles"),
    [
        ({"stream": True}, 400, ["stream"]),  # no streaming
        ({"logprobs": 6}, 422, ["logprobs"]),  # at most 5 alternatives, as OpenAI
        ({"max_tokens": 0}, 400, ["echo=true"]),  # nothing to answer without the prompt's logprobs
        ({"prompt": [1, -1]}, 422, ["prompt"]),  # token ids are not negative
        ({"temperature": 0, "n": 2}, 422, ["greedy", "n=1"]),  # a rollout's own rule across fields
        ({"temperature": 0.001}, 422, ["0.01"]),
        ({"max_tokens": 33}, 422, ["max_tokens=32"]),  # the server's bound
        ({"n": 17}, 422, ["max_n=16"]),
        ({"prompt": ["a"] * 5}, 422, ["max_prompts=4"]),
        ({"prompt": "x" * 101}, 422, ["max_prompt_chars=100"]),
        ({"prompt": ""}, 422, ["prompt"]),
        ({"prompt": []}, 422, ["prompt"]),
        ({"stop": ["s"] * 17}, 422, ["stop"]),
        ({"temperature": 2.5}, 422, ["temperature"]),  # OpenAI's range is 0 .. 2
        ({"temperature": False}, 422, ["temperature"]),  # a number, not a bool or a string
        ({"top_p": "0.5"}, 422, ["top_p"]),
        ({"stream": 0}, 422, ["stream"]),
        # A parameter not served is refused, not ignored: a 400 saying what to do instead.
        ({"frequency_penalty": 0.5}, 400, ["'frequency_penalty' is not served: the learner scores the sampler's"]),
        ({"best_of": 3, "suffix": "x"}, 400, ["'best_of' is not served: ask for n", "'suffix' is not served"]),
        ({"frobnicate": 1}, 400, ["'frobnicate' is not a parameter of this route"]),
        ({"frequency_penalty": 0.5, "n": 0}, 422, ["n"]),  # with another fault, the schema's 422
    ],
)
def test_refusals_are_in_openais_shape(client: TestClient, body: dict, status: int, needles: list[str]) -> None:
    r = client.post("/v1/completions", json={"model": "base", "prompt": "hi", "max_tokens": 3, **body})
    error = openai_error(r, status, *needles)
    assert error["type"] == "invalid_request_error" and error["code"] is None


def test_chat_refuses_what_it_cannot_serve(client: TestClient) -> None:
    base = {"model": "base", "max_tokens": 3}
    r = client.post("/v1/chat/completions", json={**base, "messages": []})
    openai_error(r, 422, "messages")
    r = client.post(
        "/v1/chat/completions", json={**base, "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 6}
    )
    openai_error(r, 422, "top_logprobs")
    r = client.post(
        "/v1/chat/completions", json={**base, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    )
    openai_error(r, 400, "stream")


def test_a_body_that_is_not_json_is_openais_400(client: TestClient) -> None:
    r = client.post("/v1/completions", content=b'{"x": "\xff"}', headers={"Content-Type": "application/json"})
    assert openai_error(r, 400, "parsing the body")["type"] == "invalid_request_error"
    # The other routes keep their own body.
    r = client.post("/v1/rollouts", content=b'{"x": "\xff"}', headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "detail" in r.json()


def test_asleep_is_503_in_openais_shape(client: TestClient) -> None:
    assert client.post("/sleep").status_code == 200
    r = client.post("/v1/completions", json={"model": "base", "prompt": "hi", "max_tokens": 3})
    assert openai_error(r, 503, "asleep")["type"] == "server_error"
    assert client.post("/wake_up").status_code == 200
    complete(client)


def test_the_base_is_409_while_an_adapter_is_merged(cfg: ServerConfig, engine: FakeEngine) -> None:
    cfg = cfg.model_copy(update={"adapter_serving": "merged"})
    with TestClient(build_app(cfg, api_key="", engine_factory=lambda _: engine)) as client:
        load_policy(client, cfg)
        r = client.post("/v1/completions", json={"model": "base", "prompt": "hi", "max_tokens": 3})
        openai_error(r, 409, "'policy' is merged")
        assert complete(client, model="policy")["policy_version"] == 1


def test_the_api_key_guards_the_openai_routes(cfg: ServerConfig, engine: FakeEngine) -> None:
    with TestClient(build_app(cfg, api_key=KEY, engine_factory=lambda _: engine)) as c:
        body = {"model": "base", "prompt": "hi", "max_tokens": 3}
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            error = openai_error(c.post("/v1/completions", json=body, headers=headers), 401, "API key")
            assert error["type"] == "authentication_error"
        # ?key= is for the samples page only
        openai_error(c.post(f"/v1/completions?key={KEY}", json=body), 401, "API key")
        assert c.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_the_openai_client_parses_answers_and_errors(cfg: ServerConfig, engine: FakeEngine) -> None:
    with TestClient(build_app(cfg, api_key=KEY, engine_factory=lambda _: engine)) as http:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key=KEY, http_client=http, max_retries=0)
        completion = client.completions.create(model="base", prompt="hi", max_tokens=3, n=2, logprobs=0)
        assert [c.text for c in completion.choices] == ["v0-0", "v0-1"]
        assert completion.choices[0].logprobs.token_logprobs == [-1.0, -2.0, -3.0]
        assert completion.usage.total_tokens == 2 + 6
        reply = client.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert reply.choices[0].message.content == "v0-0" and reply.choices[0].finish_reason == "length"
        with pytest.raises(openai.NotFoundError) as missing:
            client.completions.create(model="nope", prompt="hi", max_tokens=3)
        assert missing.value.code == "model_not_found" and "'nope'" in missing.value.message
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(
                base_url="http://testserver/v1", api_key="wrong", http_client=http, max_retries=0
            ).models.list()


def test_null_fields_take_their_defaults_as_openais_api_does(client: TestClient, engine: FakeEngine) -> None:
    # the openai client sends null for an argument given as None
    complete(client, max_tokens=None, temperature=None, top_p=None, n=None, seed=None, stop=None, stream=None)
    _, request = engine.requests[-1]
    assert (request.n, request.max_tokens, request.temperature, request.top_p) == (1, 16, 1.0, 1.0)
    body = chat(client, logprobs=None, top_logprobs=None, max_completion_tokens=None, user="someone")
    assert body["choices"][0]["logprobs"] is None and engine.requests[-1][1].max_tokens == 3


def test_chat_content_as_text_parts_is_joined_and_other_parts_are_refused(
    client: TestClient, engine: FakeEngine
) -> None:
    parts = [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]
    chat(client, messages=[{"role": "user", "content": parts}])
    assert engine.requests[-1][0] == list(b"user:hi")
    image = [{"type": "image_url", "image_url": {"url": "data:,"}}]
    r = client.post("/v1/chat/completions", json={"model": "base", "messages": [{"role": "user", "content": image}]})
    openai_error(r, 422, "content")


def test_the_base_is_also_named_by_the_model_path_the_server_started_with(
    client: TestClient, cfg: ServerConfig
) -> None:
    body = complete(client, model=cfg.model)
    assert body["policy_version"] == 0 and body["choices"][0]["text"] == "v0-0"


def test_a_model_is_retrieved_by_id_and_an_unknown_one_answers_openais_404(
    client: TestClient, cfg: ServerConfig
) -> None:
    """It answered FastAPI's {"detail": "Not Found"}: OpenAI's clients showed no message."""
    load_policy(client, cfg)
    card = client.get("/v1/models/policy")
    assert card.status_code == 200 and (card.json()["id"], card.json()["version"]) == ("policy", 1)
    base = client.get("/v1/models").json()["data"][0]["id"]
    assert client.get(f"/v1/models/{base}").json()["kind"] == "base"
    missing = client.get("/v1/models/nope")
    assert missing.status_code == 404
    error = missing.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("not_found_error", "model", "model_not_found")
    assert "'nope' does not exist here" in error["message"]


def test_echo_scores_a_token_id_prompt_as_evaluation_harnesses_ask(client: TestClient, engine: FakeEngine) -> None:
    """lm-evaluation-harness's loglikelihood: token ids, echo, logprobs=1, max_tokens=1, greedy. The
    fake scores prompt token t at -t/100, with t + 1 half a nat likelier beside it."""
    body = complete(client, prompt=[[5, 6, 7]], echo=True, logprobs=1, max_tokens=1, temperature=0)
    (choice,) = body["choices"]
    _, request = engine.requests[-1]
    assert (request.prompt_token_ids, request.prompt_logprobs, request.logprobs) == ([[5, 6, 7]], 1, 1)
    logprobs = choice["logprobs"]
    # The prompt's 3 tokens (the first has no context: null), then the fake's 3 sampled ones.
    assert logprobs["tokens"] == ["<5>", "<6>", "<7>", "<0>", "<0>", "<0>"]
    assert logprobs["token_logprobs"] == [None, -0.06, -0.07, -1.0, -2.0, -3.0]
    assert logprobs["top_logprobs"][:3] == [None, {"<6>": -0.06, "<7>": 0.44}, {"<7>": -0.07, "<8>": 0.43}]
    assert logprobs["top_logprobs"][3] == {"<0>": -1.0, "<1>": -2.0}
    assert choice["text"] == "<5><6><7>v0-0"  # the prompt (decoded token by token), then the completion


def test_max_tokens_0_with_echo_answers_the_prompts_logprobs_only(client: TestClient) -> None:
    body = complete(client, prompt="ab", echo=True, logprobs=0, max_tokens=0)
    (choice,) = body["choices"]
    assert choice["text"] == "ab" and choice["logprobs"]["token_logprobs"] == [None, -0.98]  # b = 98
    assert choice["logprobs"]["top_logprobs"] is None  # logprobs=0: no alternatives
    assert body["usage"]["completion_tokens"] == 0


def test_chat_top_logprobs_are_the_alternatives_most_likely_first(client: TestClient) -> None:
    (choice,) = chat(client, logprobs=True, top_logprobs=2)["choices"]
    first = choice["logprobs"]["content"][0]
    assert [(t["token"], t["logprob"]) for t in first["top_logprobs"]] == [("<0>", -1.0), ("<1>", -2.0), ("<2>", -3.0)]
