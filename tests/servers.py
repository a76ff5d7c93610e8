"""A real rollout server process for integration tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from learner.local_server import local_rollout_server
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
