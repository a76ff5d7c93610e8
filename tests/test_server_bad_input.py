"""Bad input to the rollout server (issue 8), over a fake engine: every case answers 4xx with a
`{"detail": "<what was wrong>"}` body, never 500, and the server keeps serving."""

from __future__ import annotations

import asyncio
import json
import os
import struct
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from safetensors.torch import save_file

from rollout_server.app import build_app
from rollout_server.engine import Generated
from rollout_server.guard import PUBLIC_PATHS
from rollout_server.http_errors import is_openai_path
from rollout_server.samples import SampleStore
from shared.config import ServerConfig
from shared.schemas import Completion, ErrorResponse, PromptRollout, RolloutRequest, SampleRecord, SampleScores
from tests.fakes import FakeEngine, fake_server_config, write_fake_adapter

KEY = "s3cret"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture
def cfg(tmp_path: Path) -> ServerConfig:
    return fake_server_config(tmp_path, samples_path=tmp_path / "samples.jsonl")


@pytest.fixture
def engine(cfg: ServerConfig) -> FakeEngine:
    return FakeEngine(max_model_len=cfg.max_model_len)


@pytest.fixture
def client(cfg: ServerConfig, engine: FakeEngine):
    # raise_server_exceptions=False: a 500 must show as a 500 here, as a real client would see it.
    app = build_app(cfg, api_key="", engine_factory=lambda _: engine)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def post_raw(client: TestClient, path: str, text: str):
    """POST `text` verbatim as JSON: json= cannot send NaN, Infinity or lone surrogates."""
    return client.post(path, content=text.encode(), headers={"Content-Type": "application/json"})


def assert_refused(r, status: int, *needles: str) -> str:
    """A 4xx answer whose JSON body is {"detail": "<text naming every needle>"}, and nothing else."""
    assert r.status_code == status, r.text
    detail = ErrorResponse.model_validate_json(r.content).detail
    for needle in needles:
        assert needle in detail, detail
    return detail


def rollout(client: TestClient, **body) -> dict:
    r = client.post("/v1/rollouts", json={"prompts": ["hi"], "n": 2, "max_tokens": 3, **body})
    assert r.status_code == 200, r.text
    return r.json()


# --- 1. answers that were 500s -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", "NaN"),  # NaN >= 0 is False, and the 422 echoed NaN, which JSON cannot hold: 500
        ("temperature", "Infinity"),  # passed ge=0
        ("temperature", "-Infinity"),
        ("top_p", "NaN"),
        ("top_p", "Infinity"),
        ("n", "NaN"),  # an int field given NaN: the error's echo of the input must serialize too
    ],
)
def test_non_finite_numbers_are_refused_with_a_message(client: TestClient, field: str, value: str) -> None:
    r = post_raw(client, "/v1/rollouts", f'{{"prompts": ["hi"], "n": 1, "max_tokens": 3, "{field}": {value}}}')
    assert_refused(r, 422, field)


@pytest.mark.parametrize("query", ["/sleep?lease_s=nan", "/sleep?lease_s=inf", "/v1/samples?limit=nan"])
def test_non_finite_query_numbers_are_refused(client: TestClient, query: str) -> None:
    method = client.post if query.startswith("/sleep") else client.get
    assert_refused(method(query), 422, query.split("?")[1].split("=")[0])
    assert client.get("/is_sleeping").json()["is_sleeping"] is False


def test_non_finite_scores_are_refused(client: TestClient) -> None:
    rollout_id = rollout(client)["rollout_id"]
    for bad in ("NaN", "Infinity", "-Infinity"):
        body = f'{{"rewards": [[{bad}, 1.0]], "advantages": [[0.0, 0.0]]}}'
        assert_refused(post_raw(client, f"/v1/samples/{rollout_id}/scores", body), 422, "rewards", "finite")
        body = f'{{"rewards": [[0.0, 1.0]], "advantages": [[{bad}, 0.0]]}}'
        assert_refused(post_raw(client, f"/v1/samples/{rollout_id}/scores", body), 422, "advantages", "finite")


def test_empty_prompt_text_is_refused(client: TestClient) -> None:
    # vLLM raises VLLMValidationError at generate time on a prompt with no token.
    r = client.post("/v1/rollouts", json={"prompts": ["ok", ""], "n": 1, "max_tokens": 3})
    assert_refused(r, 422, "empty")


@pytest.mark.parametrize("ids", [[[-1]], [[256]], [[1, 2], [3, 10**6]]])
def test_prompt_token_ids_outside_the_vocabulary_are_refused(client: TestClient, ids: list[list[int]]) -> None:
    r = client.post("/v1/rollouts", json={"prompt_token_ids": ids, "n": 1, "max_tokens": 3})
    assert_refused(r, 422, "vocab", "256")  # the fake's vocabulary: bytes


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"seed": 2**63}, "seed"),
        ({"seed": 2**64 + 5}, "seed"),
        ({"seed": -1}, "seed"),
        # completion (i, j) samples with seed + i * n + j: the last of 2 prompts x 2 is seed + 3
        ({"seed": 2**63 - 3, "prompts": ["a", "b"]}, "seed"),
        ({"top_k": 2**63}, "top_k"),
        ({"top_k": 2**31}, "top_k"),
    ],
)
def test_seed_and_top_k_are_bounded(client: TestClient, body: dict, needle: str) -> None:
    r = client.post("/v1/rollouts", json={"prompts": ["hi"], "n": 2, "max_tokens": 3, **body})
    assert_refused(r, 422, needle)


def test_largest_seed_whose_streams_fit_is_served(client: TestClient) -> None:
    # 2 prompts x n=2 use seeds seed .. seed + 3; seed + 3 = 2**63 - 1 is the largest int64.
    body = rollout(client, prompts=["a", "b"], seed=2**63 - 4)
    assert body["results"][1]["completions"][0]["token_ids"][2] == 2**63 - 4 + 2


@pytest.mark.parametrize(
    "body",
    [
        '{"prompts": ["\\ud800"], "n": 1, "max_tokens": 3}',
        '{"prompts": [[{"role": "user", "content": "a\\udfffb"}]], "n": 1, "max_tokens": 3}',
        '{"prompts": ["hi"], "n": 1, "max_tokens": 3, "stop": ["\\ud83d"]}',
        '{"prompts": ["hi"], "n": 1, "max_tokens": 3, "adapter": "\\ud800"}',
        '{"prompts": ["hi"], "n": 1, "max_tokens": 3, "\\ud800": 1}',  # an extra key is named in the error
    ],
)
def test_lone_surrogates_are_refused(client: TestClient, body: str) -> None:
    assert_refused(post_raw(client, "/v1/rollouts", body), 422)


def test_odd_bodies_get_a_short_4xx(client: TestClient) -> None:
    assert_refused(post_raw(client, "/v1/rollouts", "[" * 100_000), 400, "parsing the body")  # too deep
    r = post_raw(client, "/v1/rollouts", '{"prompts": ["hi"], "' + "k" * 100_000 + '": 1}')
    assert len(assert_refused(r, 422, "Extra inputs")) < 3000  # the key's name is echoed, cut short


def test_a_bad_request_does_not_break_the_next_one_on_the_same_connection(client: TestClient) -> None:
    # Behind uvicorn, a request after a 500 on the same keep-alive connection was reset.
    for bad in ('{"prompts": ["hi"], "n": 1, "temperature": NaN}', '{"prompts": ["\\ud800"], "n": 1}'):
        assert post_raw(client, "/v1/rollouts", bad).status_code == 422
        assert rollout(client)["policy_version"] == 0


# --- 1. loads that were 500s -------------------------------------------------------------------


def write_safetensors_header(path: Path, header: object) -> None:
    """A safetensors file with this JSON header and no data."""
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)


def symlink_loop(root: Path) -> str:
    root.mkdir(parents=True, exist_ok=True)
    (root / "loop").symlink_to(root / "loop")
    return "loop"


def malformed_weights(header: object):
    def make(root: Path) -> str:
        write_fake_adapter(root / "bad")
        write_safetensors_header(root / "bad" / "adapter_model.safetensors", header)
        return "bad"

    return make


def malformed_config(raw: bytes):
    def make(root: Path) -> str:
        write_fake_adapter(root / "bad")
        (root / "bad" / "adapter_config.json").write_bytes(raw)
        return "bad"

    return make


_Q = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (symlink_loop, "loop"),
        (lambda root: "good\x00/x", "NUL"),
        (malformed_weights([1, 2, 3]), "not a safetensors file"),  # a JSON list, not an object
        (malformed_weights({_Q: {"dtype": "F32", "data_offsets": [0, 0]}}), "not a safetensors file"),  # no shape
        (malformed_weights({_Q: {"dtype": "F32", "shape": "4x16", "data_offsets": [0, 0]}}), "not a safetensors"),
        (malformed_weights({_Q: {"dtype": "F32", "shape": [4, "x"], "data_offsets": [0, 0]}}), "not a safetensors"),
        (malformed_config(b"[1, 2]"), "not a JSON object"),
        (malformed_config(b'{"peft_type": "LORA", "r": 4, "x": "\xff\xfe"}'), "UTF-8"),
    ],
)
def test_malformed_adapter_is_refused_with_400_and_the_old_one_keeps_serving(
    client: TestClient, cfg: ServerConfig, make, needle: str
) -> None:
    write_fake_adapter(cfg.adapter_root / "good")
    assert client.post("/v1/load_lora_adapter", json={"lora_name": "p", "lora_path": "good"}).status_code == 200
    lora_path = make(cfg.adapter_root)
    r = client.post("/v1/load_lora_adapter", json={"lora_name": "p", "lora_path": lora_path})
    assert_refused(r, 400, needle)
    assert rollout(client, adapter="p")["policy_version"] == 1


def test_over_long_lora_path_is_refused(client: TestClient) -> None:
    r = client.post("/v1/load_lora_adapter", json={"lora_name": "p", "lora_path": "a/" * 2049})
    assert_refused(r, 422, "lora_path", "4096")


# --- 2. unbounded input, and auth before the body -----------------------------------------------


async def call_asgi(app: FastAPI, path: str, chunks: list[bytes], headers: dict[str, str]) -> tuple[int, dict, int]:
    """Drive the app with a request body in `chunks` (no Content-Length unless given: chunked);
    return the status, the JSON body, and how many chunks the app read."""
    read = 0
    messages: list[dict] = []

    async def receive() -> dict:
        nonlocal read
        if read < len(chunks):
            read += 1
            return {"type": "http.request", "body": chunks[read - 1], "more_body": read < len(chunks)}
        await asyncio.sleep(3600)  # no disconnect while the app answers
        raise AssertionError("unreachable")

    async def send(message: dict) -> None:
        messages.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 1),
        "server": ("testserver", 80),
        "state": {},
    }
    await asyncio.wait_for(app(scope, receive, send), 10)
    status = next(m["status"] for m in messages if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    return status, json.loads(body), read


def test_unauthenticated_body_is_refused_before_it_is_read(cfg: ServerConfig, engine: FakeEngine) -> None:
    app = build_app(cfg, api_key=KEY, engine_factory=lambda _: engine)
    chunks = [b'{"prompts": ["', b"x" * 1000, b'"]}']
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        status, body, read = asyncio.run(call_asgi(app, "/v1/rollouts", chunks, headers))
        assert (status, read) == (401, 0), (status, body, read)
        assert "API key" in body["detail"]


def test_body_over_max_body_bytes_is_413_by_content_length(cfg: ServerConfig, engine: FakeEngine) -> None:
    app = build_app(cfg.model_copy(update={"max_body_bytes": 1000}), api_key=KEY, engine_factory=lambda _: engine)
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.post("/v1/rollouts", json={"prompts": ["x" * 2000]}, headers=AUTH)
        assert_refused(r, 413, "1000")
        assert c.post("/v1/rollouts", json={"prompts": ["x"], "n": 1, "max_tokens": 3}, headers=AUTH).status_code == 200
    # The size check reads no byte of a body whose Content-Length is over the bound.
    chunks = [b"x" * 600, b"x" * 600]
    status, body, read = asyncio.run(call_asgi(app, "/v1/rollouts", chunks, {**AUTH, "Content-Length": "1200"}))
    assert (status, read) == (413, 0) and "max_body_bytes=1000" in body["detail"]


def test_chunked_body_growing_past_max_body_bytes_is_413(cfg: ServerConfig, engine: FakeEngine) -> None:
    app = build_app(cfg.model_copy(update={"max_body_bytes": 1000}), api_key=KEY, engine_factory=lambda _: engine)
    chunks = [b"x" * 400] * 10
    status, body, read = asyncio.run(call_asgi(app, "/v1/rollouts", chunks, AUTH))
    assert status == 413 and "max_body_bytes=1000" in body["detail"]
    assert read == 3  # stopped at the chunk that crossed the bound


def test_docs_and_openapi_need_the_key(cfg: ServerConfig, engine: FakeEngine) -> None:
    with TestClient(build_app(cfg, api_key=KEY, engine_factory=lambda _: engine)) as c:
        for path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"):
            assert_refused(c.get(path), 401, "API key")
            assert c.get(path, headers=AUTH).status_code == 200, path
        assert c.get("/health").status_code == 200


@pytest.mark.parametrize(
    ("stop", "needle"),
    [
        (["s"] * 17, "stop"),  # more than 16 strings
        (["x" * 257], "stop"),  # a string longer than 256 characters
        ([""], "stop"),  # an empty stop string
    ],
)
def test_stop_list_is_bounded(client: TestClient, stop: list[str], needle: str) -> None:
    r = client.post("/v1/rollouts", json={"prompts": ["hi"], "n": 1, "max_tokens": 3, "stop": stop})
    assert_refused(r, 422, needle)


# --- 3. adapters: each file under the root, finite weights ----------------------------------------


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "adapter_config.json"])
def test_adapter_file_linked_out_of_the_root_is_refused(
    client: TestClient, cfg: ServerConfig, tmp_path: Path, name: str
) -> None:
    outside = write_fake_adapter(tmp_path / "outside")
    adapter = write_fake_adapter(cfg.adapter_root / "linked")
    (adapter / name).unlink()
    (adapter / name).symlink_to(outside / name)
    r = client.post("/v1/load_lora_adapter", json={"lora_name": "p", "lora_path": "linked"})
    assert_refused(r, 400, name, "outside the adapter root")
    assert str(tmp_path) not in r.text


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), 2e4])
def test_adapter_with_non_finite_or_huge_weights_is_refused(client: TestClient, cfg: ServerConfig, bad: float) -> None:
    adapter = write_fake_adapter(cfg.adapter_root / "bad")
    b = torch.zeros(16, 4)
    b[3, 1] = bad
    save_file({_Q: torch.ones(4, 16), _Q.replace("lora_A", "lora_B"): b}, str(adapter / "adapter_model.safetensors"))
    r = client.post("/v1/load_lora_adapter", json={"lora_name": "p", "lora_path": "bad"})
    assert_refused(r, 400, "lora_B")
    assert client.get("/v1/models").json()["data"][1:] == []  # nothing was loaded


# --- 4. no host paths in answers; strict wire types ------------------------------------------------


def test_answers_and_errors_show_no_host_paths(client: TestClient, cfg: ServerConfig, tmp_path: Path) -> None:
    write_fake_adapter(cfg.adapter_root / "runs" / "v1")
    info = client.post("/v1/load_lora_adapter", json={"lora_name": "p", "lora_path": "runs/v1"}).json()
    assert info["lora_path"] == "runs/v1"
    models = client.get("/v1/models").json()["data"]
    assert [(m["id"], m["root"]) for m in models] == [("base", "base"), ("p", "runs/v1")]
    (cfg.adapter_root / "empty").mkdir()
    for lora_path in ("empty", "../base", "missing", str(cfg.adapter_root / "empty")):
        r = client.post("/v1/load_lora_adapter", json={"lora_name": "p", "lora_path": lora_path})
        detail = assert_refused(r, 400, repr(lora_path))
        assert str(cfg.adapter_root.resolve()) not in detail.replace(repr(lora_path), "")
    assert str(tmp_path) not in client.get("/v1/models").text


@pytest.mark.parametrize("field", ["n", "max_tokens", "top_k", "seed"])
def test_wire_ints_are_strict(client: TestClient, field: str) -> None:
    r = client.post("/v1/rollouts", json={"prompts": ["hi"], "n": 1, "max_tokens": 3, field: "2"})
    assert_refused(r, 422, field)
    r = client.post("/v1/rollouts", json={"prompts": ["hi"], "n": 1, "max_tokens": 3, field: 2.0})
    assert_refused(r, 422, field)


def test_empty_adapter_name_is_refused(client: TestClient) -> None:
    # "" was falsy in the service, so it sampled from the base model.
    r = client.post("/v1/rollouts", json={"prompts": ["hi"], "n": 1, "max_tokens": 3, "adapter": ""})
    assert_refused(r, 422, "adapter")


@pytest.mark.parametrize("n", [1, 2])
def test_temperature_below_vllms_floor_is_refused(client: TestClient, n: int) -> None:
    # vLLM raises 0 < t < 0.01 to 0.01 (logging a warning): the logprobs would be at another temperature.
    r = client.post("/v1/rollouts", json={"prompts": ["hi"], "n": n, "max_tokens": 3, "temperature": 1e-3})
    assert_refused(r, 422, "temperature", "0.01")
    rollout(client, n=n, temperature=0.01)


# --- 5. the sample log ---------------------------------------------------------------------------


def record(rollout_id: str, prompts: int = 1, n: int = 2, tokens: int = 3, logprob: float = -1.0) -> SampleRecord:
    completions = [
        Completion(text="x" * tokens, token_ids=[7] * tokens, logprobs=[logprob] * tokens, finish_reason="length")
        for _ in range(n)
    ]
    return SampleRecord(
        rollout_id=rollout_id,
        created_at=datetime.now(UTC),
        adapter=None,
        policy_version=0,
        results=[PromptRollout(prompt="p", prompt_token_ids=[1, 2], completions=completions) for _ in range(prompts)],
    )


def store_cfg(cfg: ServerConfig, **update) -> ServerConfig:
    return ServerConfig.model_validate({**cfg.model_dump(), **update})


def test_sample_log_is_bounded_in_bytes(cfg: ServerConfig) -> None:
    async def scenario() -> None:
        size = len(record("r0").model_dump_json())
        store = SampleStore(store_cfg(cfg, samples_capacity=100, samples_max_bytes=3 * size + size // 2))
        for i in range(10):
            await store.add(record(f"r{i}"))
        assert [r.rollout_id for r in store.recent(100)] == ["r9", "r8", "r7"]  # 3 fit, not 100
        assert store.size_bytes <= 3 * size + size // 2
        await store.close()

    asyncio.run(scenario())


def test_a_record_over_the_byte_budget_is_kept_truncated_and_can_be_scored(cfg: ServerConfig) -> None:
    async def scenario() -> None:
        small = len(record("s").model_dump_json())
        store = SampleStore(store_cfg(cfg, samples_max_bytes=8 * small))
        await store.add(record("s"))
        await store.add(record("big", prompts=2, n=2, tokens=2000))  # ~50 kB of JSON
        big, s = store.recent(2)
        assert (big.rollout_id, big.truncated, s.rollout_id, s.truncated) == ("big", True, "s", False)
        assert [len(r.completions) for r in big.results] == [2, 2]  # the shape scores are checked against
        assert all(c.token_ids == [] and len(c.text) <= 256 for r in big.results for c in r.completions)
        assert store.size_bytes <= 8 * small
        scored = await store.attach_scores("big", SampleScores(rewards=[[1.0, 0.0]] * 2, advantages=[[1.0, -1.0]] * 2))
        assert scored.scores is not None and store.recent(1)[0].scores == scored.scores
        await store.close()

    asyncio.run(scenario())


def test_sample_file_rotates_past_its_size_bound(cfg: ServerConfig) -> None:
    async def scenario() -> None:
        line = len(record("r00").model_dump_json()) + 30
        store = SampleStore(store_cfg(cfg, samples_file_max_bytes=5 * line))
        for i in range(12):
            await store.add(record(f"r{i:02d}"))
        await store.close()
        path = cfg.samples_path
        old = Path(f"{path}.1")
        assert old.exists() and not Path(f"{path}.2").exists()  # one old file kept
        for p in (path, old):
            assert p.stat().st_size <= 5 * line
        ids = [json.loads(x)["rollout_id"] for p in (old, path) for x in p.read_text().splitlines()]
        assert ids == [f"r{i:02d}" for i in range(12)][-len(ids) :]  # in order, the newest last

    asyncio.run(scenario())


class NanEngine(FakeEngine):
    """Completions whose logprobs are NaN and -inf (a broken model)."""

    async def generate(self, *args, **kwargs) -> Generated:
        completions, prompt_logprobs = await super().generate(*args, **kwargs)
        broken = [c.model_copy(update={"logprobs": [float("nan"), float("-inf"), -1.0]}) for c in completions]
        return Generated(broken, prompt_logprobs)


def test_sample_file_holds_null_never_bare_nan(cfg: ServerConfig) -> None:
    with TestClient(build_app(cfg, api_key="", engine_factory=lambda _: NanEngine())) as c:
        assert c.post("/v1/rollouts", json={"prompts": ["a"], "n": 1, "max_tokens": 3}).status_code == 200
        assert c.get("/v1/samples").status_code == 200

    def refuse(constant: str) -> None:
        raise AssertionError(f"bare {constant} in the sample file")

    rows = [json.loads(x, parse_constant=refuse) for x in cfg.samples_path.read_text().splitlines()]
    assert rows[0]["results"][0]["completions"][0]["logprobs"] == [None, None, -1.0]


def test_sample_file_is_written_off_the_event_loop(cfg: ServerConfig) -> None:
    # A FIFO with no reader blocks whoever opens it for writing: the loop must keep running meanwhile.
    os.mkfifo(cfg.samples_path)
    unblock = threading.Timer(10, lambda: open(cfg.samples_path, "rb").close())  # never hang the suite
    unblock.start()

    async def scenario() -> None:
        store = SampleStore(cfg)
        adding = asyncio.create_task(store.add(record("r0")))
        ticks = 0
        for _ in range(10):
            await asyncio.sleep(0.01)
            ticks += 1
        assert ticks == 10 and not adding.done()
        received = asyncio.create_task(asyncio.to_thread(lambda: Path(cfg.samples_path).read_bytes()))
        await adding
        await store.close()
        assert b'"r0"' in await received

    try:
        asyncio.run(scenario())
    finally:
        unblock.cancel()


def test_sample_file_is_complete_after_shutdown(cfg: ServerConfig, engine: FakeEngine) -> None:
    with TestClient(build_app(cfg, api_key="", engine_factory=lambda _: engine)) as c:
        for i in range(5):
            rollout(c, prompts=[f"p{i}"])
    assert len(cfg.samples_path.read_text().splitlines()) == 5


def test_rollout_request_schema_is_unchanged_for_good_input() -> None:
    # The learner's own requests still validate (strict ints take Python ints).
    RolloutRequest(prompts=["a"], n=8, max_tokens=64, temperature=1.0, top_p=1.0, top_k=-1, seed=0, stop=["\n"])


# --- 6. the OpenAPI contract: what test_server_contract.py (schemathesis) found -----------------


def declared(client: TestClient, path: str, method: str = "post") -> set[str]:
    """The statuses the app's OpenAPI schema declares for an operation."""
    return set(client.get("/openapi.json").json()["paths"][path][method]["responses"])


@pytest.mark.parametrize(
    "path", ["/v1/rollouts", "/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/v1/samples/{rollout_id}/scores"]
)
def test_a_body_that_is_not_utf8_is_a_declared_400(client: TestClient, path: str) -> None:
    # FastAPI refuses it with its own 400 before validation; no route declared a 400 for it.
    r = client.post(
        path.format(rollout_id="r1"), content=b'{"x": "\xff"}', headers={"Content-Type": "application/json"}
    )
    assert_refused(r, 400, "parsing the body")
    assert "400" in declared(client, path)


def test_a_lora_path_whose_name_is_too_long_is_400(client: TestClient, cfg: ServerConfig) -> None:
    # A name over 255 bytes (NAME_MAX): Path.is_dir() raised ENAMETOOLONG, a 500.
    write_fake_adapter(cfg.adapter_root / "good")
    assert client.post("/v1/load_lora_adapter", json={"lora_name": "p", "lora_path": "good"}).status_code == 200
    r = client.post("/v1/load_lora_adapter", json={"lora_name": "p", "lora_path": "0" * 256})
    assert_refused(r, 400, "cannot be read", "too long")
    assert rollout(client, adapter="p")["policy_version"] == 1


def test_every_error_status_is_declared_with_the_one_error_body(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            # The OpenAI-compatible routes answer OpenAI's error shape, for OpenAI's clients.
            model = "OpenAIErrorResponse" if is_openai_path(path) else "ErrorResponse"
            error_body = {"application/json": {"schema": {"$ref": f"#/components/schemas/{model}"}}}
            errors = {status: r for status, r in operation["responses"].items() if status != "200"}
            assert all(r["content"] == error_body for r in errors.values()), (method, path)
            assert "413" in errors, (method, path)  # the guard reads every body
            assert ("401" in errors) == (path not in PUBLIC_PATHS), (method, path)
    # FastAPI's default 422 body is a list of errors; the app answers {"detail": "<text>"}.
    assert "HTTPValidationError" not in json.dumps(spec)
    assert spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"].keys() == {"text/plain"}
