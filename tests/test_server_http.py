"""The HTTP layer and the service's bookkeeping, over a fake engine (real vLLM: test_server_integration)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from rollout_server.app import build_app
from rollout_server.engine import LoraHandle
from rollout_server.service import RolloutService
from shared.adapter_hash import adapter_sha256
from shared.config import ServerConfig
from shared.schemas import LoadLoraAdapterRequest, RolloutRequest
from tests.fakes import FakeEngine, fake_server_config, write_fake_adapter


@pytest.fixture
def cfg(tmp_path: Path) -> ServerConfig:
    return fake_server_config(tmp_path, samples_capacity=3, samples_path=tmp_path / "samples.jsonl")


@pytest.fixture
def engine(cfg: ServerConfig) -> FakeEngine:
    return FakeEngine(max_model_len=cfg.max_model_len)


@pytest.fixture
def client(cfg: ServerConfig, engine: FakeEngine):
    with TestClient(build_app(cfg, api_key="", engine_factory=lambda _: engine)) as c:
        yield c


def rollout(client: TestClient, **body) -> dict:
    r = client.post("/v1/rollouts", json={"prompts": ["hi"], "n": 2, "max_tokens": 3, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_rollout_returns_n_completions_per_prompt_with_base_version(client: TestClient) -> None:
    body = rollout(client, prompts=["ab", "c"], n=3, seed=10)
    assert body["adapter"] is None and body["policy_version"] == 0
    assert [r["prompt_token_ids"] for r in body["results"]] == [[97, 98], [99]]
    assert [len(r["completions"]) for r in body["results"]] == [3, 3]
    # prompt i gets seed + i * n, so vLLM's children (seed + j, j < n) of two prompts never meet
    assert [r["completions"][0]["token_ids"][2] for r in body["results"]] == [10, 13]


def test_the_server_generates_once_before_it_answers_anything(cfg: ServerConfig) -> None:
    """The warm-up: vLLM-CPU compiles at its first request, and in a container without a compiler
    the engine died there, after /health had answered ok (a learner then started against it)."""
    engine = FakeEngine(max_model_len=cfg.max_model_len)
    with TestClient(build_app(cfg, api_key="", engine_factory=lambda _: engine)) as client:
        ((prompt_token_ids, request),) = engine.requests  # before any request of ours
        assert prompt_token_ids == list(b"Hello") and (request.n, request.max_tokens) == (1, 2)
        assert client.get("/health").status_code == 200
        assert client.get("/v1/samples").json()["samples"] == []  # not a rollout anyone asked for


def test_a_server_whose_warm_up_fails_does_not_start(cfg: ServerConfig) -> None:
    engine = FakeEngine(max_model_len=cfg.max_model_len)
    engine.fail_prompt = list(b"Hello")
    app = build_app(cfg, api_key="", engine_factory=lambda _: engine)
    with pytest.raises(RuntimeError, match="engine failure on request warm-up"), TestClient(app):
        pass


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"n": 17}, "max_n=16"),  # over the server's bound
        ({"max_tokens": 33}, "max_tokens=32"),
        ({"prompts": ["a"] * 5}, "max_prompts=4"),
        ({"prompts": ["x" * 101]}, "max_prompt_chars=100"),
        ({"prompts": ["x" * 40], "max_tokens": 30}, "max_model_len=64"),  # 40 + 30 > 64
        ({"prompts": []}, "no prompt"),
        ({"prompt_token_ids": [[1]]}, "exactly one"),  # both kinds given
        ({"n": 0}, "greater than or equal to 1"),  # schema bound
        ({"version": 3}, "no 'adapter' is given"),  # a version of the base: only 0
        ({"adapter": "policy", "version": 0}, "versions start at 1"),  # 0 is the base's
        # A conversation ends with a turn to answer (user, tool) or to continue (an assistant prefill).
        ({"prompts": [[{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]]}, "role is 'system'"),
        ({"chat_template_kwargs": {"x": 1}}, "no prompt is a conversation"),  # nothing to render
        ({"prompts": [[{"role": "user", "content": "a"}]], "chat_template_kwargs": {"tokenize": True}}, "'tokenize'"),
    ],
)
def test_out_of_bounds_requests_get_a_clear_422(client: TestClient, body: dict, needle: str) -> None:
    r = client.post("/v1/rollouts", json={"prompts": ["hi"], "max_tokens": 3, **body})
    assert r.status_code == 422
    assert needle in r.text


def test_conversations_are_rendered_with_the_requests_chat_template_kwargs(
    client: TestClient, engine: FakeEngine
) -> None:
    conversation = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]  # a prefill
    rollout(client, prompts=["hi", conversation], chat_template_kwargs={"enable_thinking": False})
    assert engine.rendered[-2:] == [("hi", {"enable_thinking": False}), (conversation, {"enable_thinking": False})]


def test_length_bound_is_the_engines_when_the_config_leaves_it_to_the_model(cfg: ServerConfig) -> None:
    # max_model_len None: the engine's own limit (vLLM derives it from the model) bounds requests.
    cfg = cfg.model_copy(update={"max_model_len": None})
    with TestClient(build_app(cfg, api_key="", engine_factory=lambda _: FakeEngine(max_model_len=32))) as client:
        r = client.post("/v1/rollouts", json={"prompts": ["x" * 30], "max_tokens": 3, "n": 1})
        assert r.status_code == 422 and "max_model_len=32" in r.text  # 30 + 3 > 32
        assert client.post("/v1/rollouts", json={"prompts": ["x" * 29], "max_tokens": 3, "n": 1}).status_code == 200


def test_adapter_versions_swap_and_old_version_is_removed(
    client: TestClient, cfg: ServerConfig, engine: FakeEngine
) -> None:
    write_fake_adapter(cfg.adapter_root / "v1")
    write_fake_adapter(cfg.adapter_root / "v2")
    r1 = client.post("/v1/load_lora_adapter", json={"lora_name": "policy", "lora_path": "v1"}).json()
    assert r1["version"] == 1
    assert rollout(client, adapter="policy")["policy_version"] == 1
    r2 = client.post("/v1/load_lora_adapter", json={"lora_name": "policy", "lora_path": "v2"}).json()
    assert r2["version"] == 2
    body = rollout(client, adapter="policy")
    assert body["policy_version"] == 2
    assert body["results"][0]["completions"][0]["token_ids"][0] == 2  # engine int_id of v2
    assert engine.removed == [1]  # v1 dropped: nobody used it any more
    models = client.get("/v1/models").json()["data"]
    assert [(m["id"], m["kind"], m["version"]) for m in models] == [
        (Path(cfg.model).name, "base", 0),  # the directory's name: no host path
        ("policy", "lora", 2),
    ]


@pytest.mark.parametrize(
    ("make", "lora_path", "needle"),
    [
        (lambda root: None, "missing", "no such adapter directory"),
        (lambda root: None, "../base", "outside the adapter root"),
        (lambda root: write_fake_adapter(root / "big", rank=16), "big", "max_lora_rank=8"),
        (lambda root: write_fake_adapter(root / "other", hidden=24), "other", "another base model"),
        (lambda root: write_fake_adapter(root / "pickle", fmt="bin"), "pickle", "only safetensors"),
    ],
)
def test_bad_adapter_is_refused_and_old_one_keeps_serving(
    client: TestClient, cfg: ServerConfig, make, lora_path: str, needle: str
) -> None:
    write_fake_adapter(cfg.adapter_root / "good")
    make(cfg.adapter_root)
    assert client.post("/v1/load_lora_adapter", json={"lora_name": "policy", "lora_path": "good"}).status_code == 200
    r = client.post("/v1/load_lora_adapter", json={"lora_name": "policy", "lora_path": lora_path})
    assert r.status_code == 400 and needle in r.json()["detail"], r.text
    assert rollout(client, adapter="policy")["policy_version"] == 1


def test_a_load_answers_and_models_list_the_sha256_of_the_adapters_files(client: TestClient, cfg: ServerConfig) -> None:
    v1 = write_fake_adapter(cfg.adapter_root / "v1")
    v2 = write_fake_adapter(cfg.adapter_root / "v2", value=2.0)
    first = client.post("/v1/load_lora_adapter", json={"lora_name": "policy", "lora_path": "v1"}).json()
    assert first["sha256"] == adapter_sha256(v1)
    second = client.post("/v1/load_lora_adapter", json={"lora_name": "policy", "lora_path": "v2"}).json()
    assert second["sha256"] == adapter_sha256(v2) != first["sha256"]
    models = client.get("/v1/models").json()["data"]
    assert [(m["kind"], m["sha256"]) for m in models] == [("base", None), ("lora", second["sha256"])]


class RewritingEngine(FakeEngine):
    """Rewrites the adapter directory `rewrite` (once) just before reading an adapter: a learner
    saving over a directory while a server loads it."""

    rewrite: Path | None = None

    async def add_lora(self, lora: LoraHandle) -> None:
        if self.rewrite is not None:
            write_fake_adapter(self.rewrite, value=3.0)
            self.rewrite = None
        await super().add_lora(lora)


def test_an_adapter_rewritten_while_the_engine_reads_it_is_refused_and_dropped(cfg: ServerConfig) -> None:
    engine = RewritingEngine(max_model_len=cfg.max_model_len)
    with TestClient(build_app(cfg, api_key="", engine_factory=lambda _: engine)) as client:
        write_fake_adapter(cfg.adapter_root / "v1")
        v2 = write_fake_adapter(cfg.adapter_root / "v2", value=2.0)
        assert client.post("/v1/load_lora_adapter", json={"lora_name": "policy", "lora_path": "v1"}).status_code == 200
        engine.rewrite = v2
        r = client.post("/v1/load_lora_adapter", json={"lora_name": "policy", "lora_path": "v2"})
        assert r.status_code == 400 and "'v2' changed while it was loaded" in r.json()["detail"], r.text
        assert list(engine.loras) == [1] and engine.removed == [2]  # what the engine read is dropped
        assert rollout(client, adapter="policy")["policy_version"] == 1  # v1 serves on
        # Left as it is, the rewritten directory loads, as the next version, with its new hash.
        again = client.post("/v1/load_lora_adapter", json={"lora_name": "policy", "lora_path": "v2"}).json()
        assert (again["version"], again["sha256"]) == (2, adapter_sha256(v2))


def test_a_rollout_pinned_to_a_version_not_served_is_409_and_generates_nothing(
    client: TestClient, cfg: ServerConfig, engine: FakeEngine
) -> None:
    write_fake_adapter(cfg.adapter_root / "v1")
    client.post("/v1/load_lora_adapter", json={"lora_name": "policy", "lora_path": "v1", "version": 5})
    assert rollout(client, adapter="policy", version=5)["policy_version"] == 5
    assert rollout(client, version=0)["policy_version"] == 0  # the base, pinned
    generated = len(engine.requests)
    for adapter, version, serves in [
        ("policy", 4, "version 5"),
        ("policy", 6, "version 5"),
        ("other", 1, "no version"),
    ]:
        r = client.post(
            "/v1/rollouts", json={"prompts": ["a"], "max_tokens": 3, "adapter": adapter, "version": version}
        )
        assert r.status_code == 409, r.text
        assert f"{adapter!r} version {version}, this server serves {serves}" in r.json()["detail"]
    assert len(engine.requests) == generated
    # Unpinned, an adapter the server does not hold is a wrong name: 404 as before.
    assert client.post("/v1/rollouts", json={"prompts": ["a"], "max_tokens": 3, "adapter": "other"}).status_code == 404


def test_unknown_adapter_is_404_and_unload_stops_serving(client: TestClient, cfg: ServerConfig) -> None:
    assert client.post("/v1/rollouts", json={"prompts": ["a"], "max_tokens": 3, "adapter": "nope"}).status_code == 404
    write_fake_adapter(cfg.adapter_root / "a")
    client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "a"})
    assert client.post("/v1/unload_lora_adapter", json={"lora_name": "x"}).status_code == 200
    assert client.post("/v1/rollouts", json={"prompts": ["a"], "max_tokens": 3, "adapter": "x"}).status_code == 404


def test_sleep_refuses_rollouts_with_503_and_is_idempotent(client: TestClient, engine: FakeEngine) -> None:
    assert client.get("/is_sleeping").json()["is_sleeping"] is False
    for _ in range(2):
        state = client.post("/sleep?level=1").json()
        assert state["is_sleeping"] is True and state["level"] == 1
    assert engine.sleep_calls == [1]  # the second sleep did nothing
    assert "nothing" in state["released"]  # the fake says it is a CPU engine
    r = client.post("/v1/rollouts", json={"prompts": ["a"], "max_tokens": 3})
    assert r.status_code == 503 and "asleep" in r.json()["detail"]
    assert client.get("/health").json() == {
        "status": "ok",
        "is_sleeping": True,
        "device": "cpu",
        "model_runner": "fake",
    }
    for _ in range(2):
        assert client.post("/wake_up").json()["is_sleeping"] is False
    rollout(client)
    assert client.post("/sleep?level=3").status_code == 422


def test_api_key_guards_every_route_but_health(cfg: ServerConfig, engine: FakeEngine) -> None:
    with TestClient(build_app(cfg, api_key="s3cret", engine_factory=lambda _: engine)) as c:
        assert c.get("/health").status_code == 200
        for method, path in [
            ("get", "/v1/models"),
            ("get", "/v1/samples"),
            ("get", "/is_sleeping"),
            ("get", "/metrics"),
        ]:
            assert getattr(c, method)(path).status_code == 401
            assert getattr(c, method)(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert getattr(c, method)(path, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        r = c.post("/v1/rollouts", json={"prompts": ["a"]})
        assert r.status_code == 401


def test_samples_are_recent_first_bounded_scored_and_persisted(client: TestClient, cfg: ServerConfig) -> None:
    ids = [rollout(client, prompts=[f"p{i}"])["rollout_id"] for i in range(4)]
    samples = client.get("/v1/samples?limit=10").json()["samples"]
    assert [s["rollout_id"] for s in samples] == ids[::-1][:3]  # capacity 3: the oldest is gone
    scores = {"rewards": [[0.5, 1.0]], "advantages": [[-1.0, 1.0]], "step": 7}
    assert client.post(f"/v1/samples/{ids[-1]}/scores", json=scores).status_code == 200
    assert client.get("/v1/samples?limit=1").json()["samples"][0]["scores"] == {
        **scores,
        "answers": None,
        "components": {},
    }
    assert client.post(f"/v1/samples/{ids[0]}/scores", json=scores).status_code == 404  # evicted
    bad = {"rewards": [[0.5]], "advantages": [[1.0]]}
    assert client.post(f"/v1/samples/{ids[-1]}/scores", json=bad).status_code == 422
    events = [json.loads(line)["event"] for line in cfg.samples_path.read_text().splitlines()]
    assert events == ["rollout"] * 4 + ["scores"]


def test_metrics_count_requests_and_tokens(client: TestClient) -> None:
    rollout(client, prompts=["a", "b"], n=3)
    text = client.get("/metrics").text
    assert 'rollout_requests_total{outcome="ok"} 1.0' in text
    assert "rollout_completions_total 6.0" in text
    assert "rollout_generated_tokens_total 18.0" in text  # 6 completions x 3 fake tokens
    assert "rollout_sleeping 0.0" in text


def test_in_flight_rollout_finishes_on_old_version_and_sleep_waits_for_it(
    cfg: ServerConfig,
) -> None:
    async def scenario() -> None:
        engine = FakeEngine()
        service = RolloutService(cfg, engine)
        write_fake_adapter(cfg.adapter_root / "v1")
        write_fake_adapter(cfg.adapter_root / "v2")
        await service.load_adapter(LoadLoraAdapterRequest(lora_name="p", lora_path="v1"))
        engine.gate = asyncio.Event()
        running = asyncio.create_task(service.rollout(RolloutRequest(prompts=["a"], n=1, max_tokens=3, adapter="p")))
        await asyncio.sleep(0)
        await service.load_adapter(LoadLoraAdapterRequest(lora_name="p", lora_path="v2"))
        assert engine.removed == []  # v1 still in use by the running request
        sleeping = asyncio.create_task(service.sleep(1))
        await asyncio.sleep(0)
        assert engine.sleep_calls == []  # sleep waits for the running request
        engine.gate.set()
        old = await running
        await sleeping
        assert old.policy_version == 1 and old.results[0].completions[0].token_ids[0] == 1
        assert engine.removed == [1] and engine.sleep_calls == [1]

    asyncio.run(scenario())
