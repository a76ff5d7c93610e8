"""Adapters over HTTP for a learner that does not share the server's adapter root (issue 20):
`POST /v1/adapter_digest` and `PUT /v1/adapter_uploads/{sha256}` over a fake engine, and the
learner's choice between the shared folder and an upload (ServerLink, scripted servers). Real vLLM
and real processes: test_learner_integration.py's run against a server with another adapter root."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from rollout_server.app import build_app
from shared.adapter_hash import adapter_sha256
from shared.config import LearnerConfig, ServerConfig
from shared.schemas import RolloutRequest
from tests.fakes import FakeEngine, fake_server_config, write_fake_adapter
from tests.scripted_servers import ScriptedServer, link, save


def tar_of(files: dict[str, bytes], *, links: dict[str, str] | None = None) -> bytes:
    """An uncompressed tar holding `files` (name -> bytes) and symlinks (name -> target)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return buffer.getvalue()


def adapter_files(tmp_path: Path, value: float = 1.0) -> tuple[dict[str, bytes], str]:
    """A fake peft adapter's files, and their adapter_sha256."""
    made = write_fake_adapter(tmp_path / f"made-{value}", value=value)
    return {p.name: p.read_bytes() for p in made.iterdir()}, adapter_sha256(made)


def served_app(cfg: ServerConfig, api_key: str = "") -> TestClient:
    return TestClient(build_app(cfg, api_key=api_key, engine_factory=lambda _: FakeEngine(cfg.max_model_len)))


def put(client: TestClient, sha256: str, body: bytes, **kwargs):
    return client.put(f"/v1/adapter_uploads/{sha256}", content=body, **kwargs)


def test_an_uploaded_adapter_is_placed_by_its_hash_and_loads_as_any_other(tmp_path: Path) -> None:
    cfg = fake_server_config(tmp_path)
    files, sha256 = adapter_files(tmp_path)
    with served_app(cfg) as client:
        r = put(client, sha256, tar_of(files), headers={"Content-Type": "application/x-tar"})
        assert r.status_code == 200, r.text
        assert r.json() == {"lora_path": f"uploads/{sha256}", "sha256": sha256, "bytes": sum(map(len, files.values()))}
        placed = cfg.adapter_root / "uploads" / sha256
        assert {p.name: p.read_bytes() for p in placed.iterdir()} == files
        assert put(client, sha256, tar_of(files)).status_code == 200  # again: the same directory
        loaded = client.post("/v1/load_lora_adapter", json={"lora_name": "policy", "lora_path": f"uploads/{sha256}"})
        assert loaded.status_code == 200 and loaded.json()["sha256"] == sha256
        assert sorted(p.name for p in (cfg.adapter_root / "uploads").iterdir()) == [".staging", sha256]
        assert list((cfg.adapter_root / "uploads" / ".staging").iterdir()) == []


@pytest.mark.parametrize(
    ("body", "why"),
    [
        # the right files, named under another hash: sent incomplete or altered
        (lambda files: tar_of({**files, "adapter_config.json": b"{}"}), "hash to sha256"),
        (lambda files: tar_of({"../adapter_config.json": b"{}"}), "plain names"),
        (lambda files: tar_of({"sub/adapter_config.json": b"{}"}), "plain names"),
        (lambda files: tar_of({".hidden": b"x"}), "plain names"),
        (lambda files: tar_of({}, links={"adapter_model.safetensors": "/etc/passwd"}), "not a regular file"),
        (lambda files: tar_of({f"f{i}": b"" for i in range(17)}), "more than 16 files"),
        (lambda files: b"not a tar at all" * 64, "not an uncompressed tar"),
    ],
)
def test_an_upload_that_is_not_the_adapter_its_url_names_is_refused_and_leaves_nothing(
    tmp_path: Path, body, why: str
) -> None:
    cfg = fake_server_config(tmp_path)
    files, sha256 = adapter_files(tmp_path)
    with served_app(cfg) as client:
        r = put(client, sha256, body(files))
        assert r.status_code == 400 and why in r.json()["detail"], r.text
    uploads = cfg.adapter_root / "uploads"
    assert [p.name for p in uploads.iterdir()] == [".staging"] and list((uploads / ".staging").iterdir()) == []
    assert not (tmp_path / "etc").exists()


def test_an_upload_over_max_upload_bytes_is_refused_declared_or_chunked(tmp_path: Path) -> None:
    files, sha256 = adapter_files(tmp_path)
    body = tar_of(files)
    cfg = fake_server_config(tmp_path, max_upload_bytes=len(body) - 1, max_body_bytes=10 * len(body))
    with served_app(cfg) as client:
        declared = put(client, sha256, body)
        assert declared.status_code == 413 and "max_upload_bytes" in declared.json()["detail"]
        chunked = put(client, sha256, iter([body[:512], body[512:]]))  # no Content-Length
        assert chunked.status_code == 413 and "max_upload_bytes" in chunked.json()["detail"]
    assert not (cfg.adapter_root / "uploads" / sha256).exists()


def test_uploads_are_bounded_by_max_body_bytes_no_more_but_by_their_own_bound(tmp_path: Path) -> None:
    files, sha256 = adapter_files(tmp_path)
    cfg = fake_server_config(tmp_path, max_body_bytes=100)  # an adapter is far over it
    with served_app(cfg) as client:
        assert put(client, sha256, tar_of(files)).status_code == 200


def test_an_upload_needs_the_api_key(tmp_path: Path) -> None:
    files, sha256 = adapter_files(tmp_path)
    cfg = fake_server_config(tmp_path)
    with served_app(cfg, api_key="s3cret") as client:
        assert put(client, sha256, tar_of(files)).status_code == 401
        ok = put(client, sha256, tar_of(files), headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
    assert (cfg.adapter_root / "uploads" / sha256).is_dir()


def test_the_oldest_uploads_beyond_max_uploads_kept_go_but_never_a_served_one(tmp_path: Path) -> None:
    cfg = fake_server_config(tmp_path, max_uploads_kept=2)
    made = [adapter_files(tmp_path, value=float(v)) for v in (1, 2, 3, 4)]
    with served_app(cfg) as client:
        first = made[0][1]
        assert put(client, first, tar_of(made[0][0])).status_code == 200
        body = {"lora_name": "policy", "lora_path": f"uploads/{first}"}
        assert client.post("/v1/load_lora_adapter", json=body).status_code == 200
        for files, sha256 in made[1:]:
            assert put(client, sha256, tar_of(files)).status_code == 200
    kept = {p.name for p in (cfg.adapter_root / "uploads").iterdir()} - {".staging"}
    # the newest two, and the first: it is served
    assert kept == {made[0][1], made[2][1], made[3][1]}


def test_the_digest_of_a_directory_under_the_root_or_null(tmp_path: Path) -> None:
    cfg = fake_server_config(tmp_path)
    adapter = write_fake_adapter(cfg.adapter_root / "v000001")
    with served_app(cfg) as client:
        found = client.post("/v1/adapter_digest", json={"lora_path": "v000001"})
        assert found.json() == {"lora_path": "v000001", "sha256": adapter_sha256(adapter)}
        assert client.post("/v1/adapter_digest", json={"lora_path": "v000002"}).json()["sha256"] is None
        outside = client.post("/v1/adapter_digest", json={"lora_path": "../base"})
        assert outside.status_code == 400 and "outside the adapter root" in outside.json()["detail"]


# --- the learner's choice (ServerLink over scripted servers) --------------------------------------


@pytest.mark.parametrize(
    ("transfer", "server_root", "uploaded"),
    [
        ("auto", "learner", False),  # the server reads the learner's folder: nothing is sent
        ("auto", "other", True),  # another folder: sent over HTTP
        ("upload", "learner", True),  # forced, though shared
        ("shared", "learner", False),
    ],
)
def test_a_version_is_read_from_a_shared_root_or_uploaded(
    tmp_path: Path, transfer: str, server_root: str, uploaded: bool
) -> None:
    learner_root = tmp_path / "run" / "adapters"
    root = learner_root if server_root == "learner" else tmp_path / "server-root"
    root.mkdir(parents=True, exist_ok=True)
    server = ScriptedServer("http://replica-0", root)
    server_link = link([server], LearnerConfig(adapter_transfer=transfer))
    for version in (1, 2):
        adapter = save(learner_root, version, f"weights {version}".encode())
        server_link.publish(adapter, version)
        assert (server.card.version, server.card.sha256) == (version, adapter_sha256(adapter))
        assert server.loaded_paths[-1] == (f"uploads/{adapter_sha256(adapter)}" if uploaded else adapter.name)
    # auto asks once per server start, not per version
    assert server.calls.count("adapter_digest") == (1 if transfer == "auto" else 0)
    assert server.calls.count("upload_adapter") == (2 if uploaded else 0)


def test_a_shared_root_that_holds_another_runs_version_is_not_loaded_from(tmp_path: Path) -> None:
    """Issue 20's first finding: the README's server (root runs/supervised/adapters) and a learner
    writing elsewhere; the root holds a v000001 of another run. Before, that v000001 was loaded
    (the user's adapter unloaded) and the publish failed on its sha256."""
    learner_root, server_root = tmp_path / "ui-run" / "adapters", tmp_path / "supervised" / "adapters"
    save(server_root, 1, b"another run's version 1")
    server = ScriptedServer("http://replica-0", server_root)
    server_link = link([server], LearnerConfig())
    adapter = save(learner_root, 1, b"this run's version 1")
    server_link.publish(adapter, 1)
    assert server.loaded_paths == [f"uploads/{adapter_sha256(adapter)}"]
    assert server.card.sha256 == adapter_sha256(adapter)


def test_a_restarted_server_is_asked_again(tmp_path: Path) -> None:
    root = tmp_path / "adapters"
    server = ScriptedServer("http://replica-0", root)
    server_link = link([server], LearnerConfig())
    server_link.publish(save(root, 1, b"one"), 1)
    server.die_before = "generate"
    server.root = tmp_path / "elsewhere"  # it comes back with another adapter root
    server.root.mkdir()
    server_link.rollout(RolloutRequest(prompt_token_ids=[[1, 2]], n=1, max_tokens=1, seed=0))
    assert server.calls.count("adapter_digest") == 2
    assert server.loaded_paths[-1].startswith("uploads/")
