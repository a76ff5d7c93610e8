"""Scripted rollout servers: clients of rollout servers that answer from a script, for tests of
the learner's ServerLink (routing, publishing, recovery) and of what drives it (learner.overlap)."""

from __future__ import annotations

import shutil
import threading
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

from learner.server_link import ServerLink
from shared.adapter_hash import adapter_sha256
from shared.config import LearnerConfig
from shared.errors import RolloutServerError
from shared.schemas import Completion, PromptRollout, RolloutRequest, RolloutResponse, SampleScores


class ScriptedServer:
    """The client of one rollout server under the adapter root `root`. A server that dies comes
    back fresh (awake, no adapter) at the next /health probe, as a supervisor would restart it."""

    def __init__(self, url: str, root: Path) -> None:
        self.base_url, self.root = url, root
        self.alive, self.sleeping, self.card = True, False, None
        self.calls: list[str] = []
        self.die_before: str | None = None  # the next call of this name finds the server dead
        self.refuse_loads = False
        self.rollouts: list[RolloutRequest] = []
        self.posted: list[tuple[str, SampleScores]] = []
        self.loaded_paths: list[str] = []  # lora_path of each load, as sent
        self.release = threading.Event()  # generate goes on once set (at once, unless a test clears it)
        self.release.set()

    def _enter(self, name: str) -> None:
        self.calls.append(name)
        if self.die_before == name:
            self.die_before, self.alive = None, False
        if not self.alive:
            raise RolloutServerError(0, "connection refused")

    def is_healthy(self, timeout_s: float = 2.0) -> bool:
        self.calls.append("is_healthy")
        if not self.alive:
            self.alive, self.sleeping, self.card = True, False, None
        return True

    def wake_up(self) -> None:
        self._enter("wake_up")
        self.sleeping = False

    def wake_up_on_exit(self) -> None:
        self.wake_up()

    def sleep(self, level: int = 1, lease_s: float | None = None) -> None:
        self._enter("sleep")
        self.sleeping = True

    def served(self, name: str):
        self._enter("served")
        return self.card

    def load_adapter(self, name: str, path: str, *, version: int | None = None):
        self._enter("load_adapter")
        if self.sleeping:
            raise RolloutServerError(503, "the server is asleep")
        if self.refuse_loads:
            raise RolloutServerError(400, f"cannot read {path}")
        self.loaded_paths.append(path)
        self.card = SimpleNamespace(version=version, sha256=adapter_sha256(self.root / path))
        return self.card

    def adapter_digest(self, path: str) -> str | None:
        self._enter("adapter_digest")
        return adapter_sha256(self.root / path) if (self.root / path).is_dir() else None

    def upload_adapter(self, adapter_dir: Path, sha256: str):
        self._enter("upload_adapter")
        placed = self.root / "uploads" / sha256
        if not placed.is_dir():
            shutil.copytree(adapter_dir, placed)
        return SimpleNamespace(lora_path=f"uploads/{sha256}", sha256=sha256)

    def unload_adapter(self, name: str) -> None:
        self._enter("unload_adapter")
        self.card = None

    def generate(self, request: RolloutRequest, *, expected_version: int) -> RolloutResponse:
        self._enter("generate")
        self.release.wait(timeout=30)  # a request held here reaches the server when the test sets it
        served = self.card.version if self.card else None
        if request.version is not None and served != request.version:
            raise RolloutServerError(409, f"serves version {served}, not {request.version}")
        self.rollouts.append(request)
        (ids,) = request.prompt_token_ids
        completions = [
            Completion(text="", token_ids=[request.seed + j], logprobs=[-1.0], finish_reason="length")
            for j in range(request.n)
        ]
        return RolloutResponse(
            rollout_id=f"{self.base_url}-{len(self.rollouts)}",
            adapter=request.adapter,
            policy_version=(served or 0) if request.adapter is not None else 0,  # the base is version 0
            results=[PromptRollout(prompt=None, prompt_token_ids=ids, completions=completions)],
            created_at=datetime.now(UTC),
        )

    def post_scores(self, rollout_id: str, scores: SampleScores) -> None:
        self.posted.append((rollout_id, scores))


def save(root: Path, version: int, content: bytes) -> Path:
    adapter = root / f"v{version:06d}"
    adapter.mkdir(parents=True)
    (adapter / "adapter_model.safetensors").write_bytes(content)
    return adapter


def pool(tmp_path: Path, count: int) -> tuple[ServerLink, list[ScriptedServer]]:
    servers = [ScriptedServer(f"http://replica-{i}", tmp_path) for i in range(count)]
    return link(servers, LearnerConfig()), servers


def link(servers: list[ScriptedServer], cfg: LearnerConfig) -> ServerLink:
    """A ServerLink over `servers` whose canary finds every replica sampling as the learner scores."""
    return ServerLink(servers, cfg, canary=lambda client, adapter, version: 0.0)
