"""The samples page (GET /ui) over a fake engine: behind the API key (also as ?key=, on /ui only,
and kept out of the access log), self-contained, and the texts-only samples it polls (in a real
browser against real vLLM: test_samples_page_integration.py)."""

from __future__ import annotations

import asyncio
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
    assert "/v1/samples?tokens=false" in page and '"Bearer " + KEY' in page


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
        assert record["scores"] == scores
