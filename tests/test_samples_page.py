"""The samples page (GET /ui) over a fake engine: behind the API key (also as ?key=, on /ui only,
and kept out of the access log), self-contained, and the texts-only samples it polls (in a real
browser against real vLLM: test_samples_page_integration.py)."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from starlette.types import Message, Receive, Scope, Send

from rollout_server.app import build_app
from rollout_server.guard import RequestGuard
from rollout_server.http_errors import STATUS, error_body
from shared.config import ServerConfig
from tests.fakes import FakeEngine, write_base_config

KEY = "s3cret"


@pytest.fixture
def cfg(tmp_path: Path) -> ServerConfig:
    return ServerConfig(model=str(write_base_config(tmp_path / "base")), adapter_root=tmp_path / "adapters")


@pytest.fixture
def client(cfg: ServerConfig):
    with TestClient(build_app(cfg, api_key=KEY, engine_factory=lambda _: FakeEngine())) as c:
        yield c


def test_the_page_needs_the_key_as_a_header_or_query_parameter(client: TestClient) -> None:
    for url, headers in [("/ui", {}), ("/ui?key=wrong", {}), ("/ui", {"Authorization": "Bearer wrong"})]:
        r = client.get(url, headers=headers)
        assert r.status_code == 401 and "?key=" in r.json()["detail"], (url, r.text)
    for url, headers in [(f"/ui?key={KEY}", {}), ("/ui", {"Authorization": f"Bearer {KEY}"})]:
        r = client.get(url, headers=headers)
        assert r.status_code == 200, (url, r.text)
        assert r.headers["content-type"].startswith("text/html")
        assert "<title>Rollout samples</title>" in r.text
    # Only the page takes ?key=: the API it polls still needs the header.
    assert client.get(f"/v1/samples?key={KEY}").status_code == 401


def test_the_page_is_self_contained_and_never_parses_data_as_html(client: TestClient) -> None:
    r = client.get(f"/ui?key={KEY}")
    page = r.text
    assert not re.search(r"https?://", page)  # no CDN, no external asset, no URL at all
    assert not re.search(r"\b(src|href)\s*=", page)  # nothing loaded from anywhere
    assert "innerHTML" not in page and "insertAdjacentHTML" not in page and "document.write" not in page
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp  # the browser enforces both
    assert r.headers["referrer-policy"] == "no-referrer"  # the URL holds the key
    # What the script reads: texts-only samples, with the key sent on as the Bearer header.
    assert 'tokens: "false"' in page and '"/v1/samples?" + query' in page and '"Bearer " + KEY' in page
    assert '"/v1/samples/curves"' in page


def test_the_query_key_is_removed_before_the_access_log_can_print_it() -> None:
    # uvicorn's access log prints the query string of the scope the app was given.
    seen: list[bytes] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["query_string"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    guard = RequestGuard(app, api_key=KEY, max_body_bytes=100, status=STATUS, error_body=error_body)
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    for path, query in [("/ui", f"key={KEY}&x=1"), ("/ui", f"key=wrong&key={KEY}"), ("/v1/models", f"key={KEY}")]:
        scope = {"type": "http", "method": "GET", "path": path, "query_string": query.encode(), "headers": []}
        sent.clear()
        asyncio.run(guard(scope, receive, send))
        status = sent[0]["status"]
        if path == "/ui":
            assert status == 200 and KEY.encode() not in scope["query_string"], (query, scope["query_string"])
        else:
            assert status == 401  # not a page: the query parameter is no key there
    assert seen == [b"x=1", b""]  # with two keys, the last one counts


def test_samples_without_tokens_keep_the_texts_and_scores(cfg: ServerConfig) -> None:
    with TestClient(build_app(cfg, api_key="", engine_factory=lambda _: FakeEngine())) as c:
        rollout_id = c.post("/v1/rollouts", json={"prompts": ["hi"], "n": 2, "max_tokens": 3}).json()["rollout_id"]
        scores = {"rewards": [[1.0, 0.0]], "advantages": [[0.7, -0.7]], "step": 3, "components": {"f": [[1.0, None]]}}
        assert c.post(f"/v1/samples/{rollout_id}/scores", json=scores).status_code == 200
        full = c.get("/v1/samples").json()["samples"][0]
        brief = c.get("/v1/samples?tokens=false").json()["samples"][0]
    assert [len(c["token_ids"]) for c in full["results"][0]["completions"]] == [3, 3]
    assert brief["results"][0]["prompt_token_ids"] == []
    assert all(c["token_ids"] == [] and c["logprobs"] == [] for c in brief["results"][0]["completions"])
    for record in (full, brief):
        assert record["results"][0]["prompt"] == "hi"
        assert [c["text"] for c in record["results"][0]["completions"]] == ["v0-0", "v0-1"]
        assert record["scores"] == {**scores, "answers": None}


def fake_client(cfg: ServerConfig, **overrides) -> TestClient:
    cfg = cfg.model_copy(update=overrides)
    engine = FakeEngine(max_model_len=cfg.max_model_len or 64)
    return TestClient(build_app(cfg, api_key="", engine_factory=lambda _: engine))


def initial_data(page: str) -> dict:
    """The data the page is served with (its JSON script element)."""
    match = re.search(r'<script type="application/json" id="initial">(.*?)</script>', page, re.S)
    assert match is not None
    return json.loads(match.group(1))


def test_a_record_shows_every_prompt_as_text_its_run_and_kind(cfg: ServerConfig) -> None:
    """Issue 20: a learner's prompts are sent as token ids, and the page showed none of them."""
    with fake_client(cfg) as c:
        sent = {"prompt_token_ids": [list(b"37+14=")], "n": 1, "max_tokens": 2, "run": "ui-run", "kind": "training"}
        assert c.post("/v1/rollouts", json=sent).status_code == 200
        assert c.post("/v1/rollouts", json={"prompts": ["hi"], "n": 1, "max_tokens": 2}).status_code == 200
        newest, first = c.get("/v1/samples?tokens=false&limit=5").json()["samples"]
        assert (first["run"], first["kind"], first["prompt_texts"]) == ("ui-run", "training", ["37+14="])
        assert (newest["run"], newest["kind"], newest["prompt_texts"]) == (None, "api", ["hi"])
        # filtered by run and by kind
        assert [r["rollout_id"] for r in c.get("/v1/samples?run=ui-run").json()["samples"]] == [first["rollout_id"]]
        assert [r["rollout_id"] for r in c.get("/v1/samples?kind=api").json()["samples"]] == [newest["rollout_id"]]
        assert c.get("/v1/samples?kind=nonsense").status_code == 422
        completion = {"prompts": ["hi"], "max_tokens": 2, "model": "base"}
        c.post("/v1/completions", json=completion)
        kinds = [r["kind"] for r in c.get("/v1/samples?limit=5").json()["samples"]]
    assert kinds[0] in ("openai", "api") and kinds[-2:] == ["api", "training"]


def test_a_long_prompt_is_kept_as_its_start_and_its_end(cfg: ServerConfig) -> None:
    text = "a" * 1000 + "MIDDLE" + "z" * 3000
    with fake_client(cfg, max_prompt_chars=10_000, max_model_len=8192, max_tokens=2) as c:
        assert c.post("/v1/rollouts", json={"prompts": [text], "n": 1, "max_tokens": 1}).status_code == 200
        (kept,) = c.get("/v1/samples").json()["samples"][0]["prompt_texts"]
    # PROMPT_TEXT_CHARS = 2000: the first 500 characters, an ellipsis, the last 1499
    assert kept == "a" * 500 + "…" + "z" * 1499


def test_each_runs_curve_covers_every_step_scored_not_only_the_window(cfg: ServerConfig) -> None:
    """Issue 20: the plot covered only the records in the window (steps 4-5 of 5), and two runs on
    one server were one curve."""
    with fake_client(cfg, samples_capacity=2) as c:
        for run, offset in (("a", 0.0), ("b", 10.0)):
            for step in (1, 2, 3):
                body = {"prompt_token_ids": [[1], [2]], "n": 2, "max_tokens": 1, "run": run, "kind": "training"}
                rollout_id = c.post("/v1/rollouts", json=body).json()["rollout_id"]
                # prompt 1's second completion is unscorable (None): the mean is over 3 rewards
                rewards = [[step + offset, 1.0 + offset], [2.0 + offset, None]]
                scores = {"rewards": rewards, "advantages": [[0.0, 0.0], [0.0, 0.0]], "step": step}
                assert c.post(f"/v1/samples/{rollout_id}/scores", json=scores).status_code == 200
            # scored again (a re-post): its first scores are replaced, not added
            scores = {"rewards": [[3.0 + offset, 1.0 + offset], [2.0 + offset, None]], "advantages": [[0, 0], [0, 0]]}
            assert c.post(f"/v1/samples/{rollout_id}/scores", json={**scores, "step": 3}).status_code == 200
        curves = c.get("/v1/samples/curves").json()["curves"]
        assert len(c.get("/v1/samples?limit=100").json()["samples"]) == 2  # the window: 2 of 6 rollouts
    assert [(k["run"], k["kind"], k["adapter"]) for k in curves] == [("a", "training", None), ("b", "training", None)]
    for curve, offset in zip(curves, (0.0, 10.0), strict=True):
        # step s: (s + 1 + 2) / 3 + offset
        assert [(p["step"], p["completions"]) for p in curve["points"]] == [(1, 3), (2, 3), (3, 3)]
        assert [p["reward_mean"] for p in curve["points"]] == pytest.approx([(s + 3) / 3 + offset for s in (1, 2, 3)])


def test_a_curve_keeps_its_newest_samples_curve_points_steps(cfg: ServerConfig) -> None:
    with fake_client(cfg, samples_curve_points=2) as c:
        for step in (1, 2, 3):
            rollout_id = c.post("/v1/rollouts", json={"prompts": ["x"], "n": 1, "max_tokens": 1}).json()["rollout_id"]
            c.post(f"/v1/samples/{rollout_id}/scores", json={"rewards": [[1.0]], "advantages": [[0.0]], "step": step})
        ((curve),) = c.get("/v1/samples/curves").json()["curves"]
    assert [p["step"] for p in curve["points"]] == [2, 3]


def test_scores_carry_each_prompts_expected_answer(cfg: ServerConfig) -> None:
    with fake_client(cfg) as c:
        rollout_id = c.post("/v1/rollouts", json={"prompts": ["a", "b"], "n": 1, "max_tokens": 1}).json()["rollout_id"]
        scores = {"rewards": [[1.0], [0.0]], "advantages": [[0.0], [0.0]], "answers": ["51", None]}
        assert c.post(f"/v1/samples/{rollout_id}/scores", json=scores).status_code == 200
        assert c.get("/v1/samples").json()["samples"][0]["scores"]["answers"] == ["51", None]
        one_short = {**scores, "answers": ["51"]}
        assert c.post(f"/v1/samples/{rollout_id}/scores", json=one_short).status_code == 422


def test_the_page_is_served_with_its_first_window_of_data_escaped(cfg: ServerConfig) -> None:
    """A first render that does not wait for the first poll; no model text can close the script."""
    hostile = "</script><script>alert(1)</script>&amp;"
    with fake_client(cfg) as c:
        assert c.post("/v1/rollouts", json={"prompts": [hostile], "n": 1, "max_tokens": 1}).status_code == 200
        rollout_id = c.get("/v1/samples").json()["samples"][0]["rollout_id"]
        c.post(f"/v1/samples/{rollout_id}/scores", json={"rewards": [[0.5]], "advantages": [[0.0]], "step": 1})
        page = c.get("/ui").text
    assert hostile not in page and "alert(1)</script>" not in page
    data = initial_data(page)
    assert data["samples"][0]["results"][0]["prompt"] == hostile and data["samples"][0]["prompt_texts"] == [hostile]
    assert data["samples"][0]["results"][0]["completions"][0]["token_ids"] == []  # texts only, as polled
    assert data["curves"][0]["points"][0]["reward_mean"] == 0.5
