"""Runs a rollout server as a child process on a free loopback port, and stops it by pid."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from shared.errors import RolloutServerError


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def local_rollout_server(
    model: str,
    adapter_root: Path,
    *,
    log_path: Path,
    extra_args: list[str] = (),
    env: dict[str, str] | None = None,
    startup_timeout_s: float = 300.0,
) -> Iterator[str]:
    """Start `grpo-rollout-server` on 127.0.0.1, yield its URL once /health answers, stop it on exit.

    The server's output goes to `log_path`; a server that dies during start-up raises with the
    log's tail. Stopping sends SIGTERM to the process group (vLLM's engine core is a child of
    the server), then SIGKILL if it has not exited within 30 s.
    """
    port = free_port()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "rollout_server.cli", "--model", model, "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--adapter-root", str(adapter_root), *extra_args]
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(proc, url, log_path, startup_timeout_s)
        yield url
    finally:
        _stop(proc)


def _wait_healthy(proc: subprocess.Popen, url: str, log_path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise RolloutServerError(0, f"the rollout server exited with {proc.returncode} during start-up:\n{tail}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RolloutServerError(0, f"the rollout server did not answer /health within {timeout_s:.0f} s (log: {log_path})")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)  # the group the server leads: it and its engine core
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
