"""Session fixtures: the tiny models, built once per test session (no hub, seeded), the real
server the user-facing routes' tests share, and the two real replicas the replica pool's and
torchrun's tests share (one vLLM start instead of one per file)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from learner.local_server import local_rollout_server
from learner.tiny_model import build_tiny_model
from tests.peft_adapters import random_adapter
from tests.servers import ReplicaServers


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with random (seeded) weights, no warm-up."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def warm_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model after the default addition warm-up (about 20 s on 2 cores)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-warm") / "model", seed=0, warmup="addition")


KEYED_SERVER_KEY = "user-facing-test-key"


@dataclass(frozen=True)
class KeyedServer:
    url: str
    key: str
    log: Path
    """The server's stdout and stderr (its access log among them)."""

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


@pytest.fixture(scope="session")
def keyed_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeyedServer]:
    """A real server (real vLLM on CPU, the tiny model) with an API key, serving the random adapter
    'policy' (version 1) beside the base: for the tests of the OpenAI-compatible routes and the
    samples page, which only add rollouts and scores to it."""
    root = tmp_path_factory.mktemp("keyed-adapters")
    random_adapter(tiny_model_dir, root / "v1", seed=1)
    log = tmp_path_factory.mktemp("keyed-logs") / "server.log"
    key = KEYED_SERVER_KEY
    with local_rollout_server(
        str(tiny_model_dir), root, log_path=log, extra_args=["--max-lora-rank", "8"], env={"ROLLOUT_API_KEY": key}
    ) as url:
        server = KeyedServer(url, key, log)
        r = httpx.post(
            f"{url}/v1/load_lora_adapter", json={"lora_name": "policy", "lora_path": "v1"}, headers=server.auth
        )
        assert r.status_code == 200, r.text
        yield server


REPLICA_MAX_LORA_RANKS = [16, 8]
"""Replica 1 refuses an adapter of rank 16 (a version one replica cannot take); the learner's
rank-8 LoRA fits both."""


@pytest.fixture(scope="session")
def replica_servers(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReplicaServers]:
    """Two servers of the tiny model in float32 (the learner's dtype on CPU) sharing one adapter
    root. Tests leave them serving (a test that kills one restarts it), and each writes its
    adapters under names of its own: the adapter root, the sample logs and the served 'policy'
    version hold what earlier tests left."""
    root = tmp_path_factory.mktemp("replicas")
    args = [["--dtype", "float32", "--max-lora-rank", str(rank)] for rank in REPLICA_MAX_LORA_RANKS]
    servers = ReplicaServers(tiny_model_dir, root / "adapters", root, args)
    try:
        yield servers
    finally:
        servers.close()
