"""ServerLink's recovery against a scripted server: restarts land at chosen calls."""

from __future__ import annotations

from pathlib import Path

from learner.server_link import ServerLink
from shared.config import LearnerConfig
from shared.errors import RolloutServerError


class RestartingServer:
    """The client of one server that can die; a dead server is replaced by a fresh one (awake,
    no adapter) once the link waits for /health, as a supervisor would restart it."""

    def __init__(self) -> None:
        self.alive, self.sleeping, self.version = True, False, None
        self.calls: list[str] = []
        self.die_before: str | None = None  # the next call of this name finds the server dead

    def _enter(self, name: str) -> None:
        self.calls.append(name)
        if self.die_before == name:
            self.die_before, self.alive = None, False
        if not self.alive:
            raise RolloutServerError(0, "connection refused")

    def wait_healthy(self, timeout_s: float) -> None:
        self.calls.append("wait_healthy")
        if not self.alive:
            self.alive, self.sleeping, self.version = True, False, None

    def wake_up(self) -> None:
        self._enter("wake_up")
        self.sleeping = False

    def sleep(self, level: int = 1, lease_s: float | None = None) -> None:
        self._enter("sleep")
        self.sleeping = True

    def served_version(self, name: str) -> int | None:
        self._enter("served_version")
        return self.version

    def load_adapter(self, name: str, path: str, *, version: int | None = None):
        self._enter("load_adapter")
        if self.sleeping:
            raise RolloutServerError(503, "the server is asleep")
        self.version = version

        class Loaded:
            pass

        loaded = Loaded()
        loaded.version = version
        return loaded


def test_a_server_restarted_under_a_sleep_call_is_woken_before_the_next_load(tmp_path: Path) -> None:
    server = RestartingServer()
    link = ServerLink(server, LearnerConfig(), canary=lambda client, adapter, version: 0.0)
    link.publish(tmp_path / "v1", 1)
    server.die_before = "sleep"
    link.sleep()  # the server dies: the link waits, re-pushes v1, and sleeps the new server
    assert server.sleeping and server.version == 1
    server.calls.clear()
    link.publish(tmp_path / "v2", 2)
    assert server.version == 2 and not server.sleeping
    # The sleep that followed the re-push is known: v2 goes out after one wake, with no second recovery.
    assert server.calls == ["wake_up", "load_adapter", "served_version"]
