"""A real rollout server process for integration tests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from learner.local_server import descendants, free_port, local_rollout_server, wait_healthy
from learner.rollout_client import RolloutClient


@contextmanager
def served_client(model_dir: Path, run_dir: Path) -> Iterator[RolloutClient]:
    """A real rollout server on 127.0.0.1 (adapter root run_dir/adapters, no API key) and a client;
    the server is stopped by pid on exit."""
    with local_rollout_server(
        str(model_dir), run_dir / "adapters", log_path=run_dir / "server.log", env={"ROLLOUT_API_KEY": ""}
    ) as url:
        client = RolloutClient(url)
        try:
            yield client
        finally:
            client.close()


@contextmanager
def server_process(
    model_dir: Path, adapter_root: Path, log_path: Path, *, port: int | None = None, args: list[str] = ()
) -> Iterator[tuple[subprocess.Popen, str]]:
    """A real `grpo-rollout-server` process (no API key) and its URL, once healthy; for tests that
    kill it. Everything it started is killed by pid on exit."""
    port = port or free_port()
    cmd = [sys.executable, "-m", "rollout_server.cli", "--model", str(model_dir), "--port", str(port)]
    cmd += ["--adapter-root", str(adapter_root), *args]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = log_path.stat().st_size if log_path.exists() else 0
    with log_path.open("ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "ROLLOUT_API_KEY": ""})
    url = f"http://127.0.0.1:{port}"
    tree = {proc.pid}
    try:
        wait_healthy(proc, url, log_path, start, 300)
        tree |= descendants(proc.pid)
        yield proc, url
    finally:
        tree |= descendants(proc.pid)
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=30)


def is_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def cpu_seconds(pids: set[int]) -> float:
    """User + system CPU time the live processes among `pids` have used so far."""
    total = 0
    for pid in pids:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat(5))
    return total / os.sysconf("SC_CLK_TCK")
