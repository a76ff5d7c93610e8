"""The learner and an external rollout server failing apart: real processes, real vLLM, 127.0.0.1.

A learner that dies leaves the server awake (at once on Ctrl-C, after its sleep lease on kill -9);
a server killed with SIGKILL and restarted mid-run costs the run no step, and ends serving the
learner's last version under the learner's number.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from learner.local_server import free_port
from tests.servers import server_process

pytestmark = pytest.mark.integration

ENV = {**os.environ, "ROLLOUT_API_KEY": "", "TQDM_DISABLE": "1"}
NO_CHECKPOINTS = ["--save-steps", "0"]  # two learners share one output dir: the second starts fresh
# The server sleeps while the learner updates: micro-batches of 1 make that window ~8 passes long,
# so a poll of /is_sleeping finds it (at the default, one pass of the tiny model: a step of 0.14 s,
# and a fresh clone's CI run once polled 173 times through 200 steps without finding it asleep).
ASLEEP_LONGER = ["--steps", "200", *NO_CHECKPOINTS, "--micro-batch-size", "1"]
FLOAT32 = ["--dtype", "float32"]  # the learner's dtype on CPU (vLLM's "auto" would be bfloat16)


def start_learner(model_dir: Path, out: Path, url: str, *extra: str) -> subprocess.Popen:
    args = ["--model", str(model_dir), "--data", "examples/unsupervised.jsonl", "--output-dir", str(out)]
    args += ["--server-url", url, "--prompts-per-step", "2", "--sampling-n", "4", "--sampling-max-tokens", "6"]
    args += ["--sampling-seed", "0", "--sample-every", "0", *extra]
    out.mkdir(parents=True, exist_ok=True)
    with (out / "learner.log").open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "learner.cli", *args], stdout=log, stderr=subprocess.STDOUT, env=ENV
        )


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def stop_while_asleep(learner: subprocess.Popen, url: str, timeout_s: float) -> None:
    """Freeze the learner (SIGSTOP) at a moment the server sleeps: a learner running on could wake
    the server between our look and our signal."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert learner.poll() is None and time.monotonic() < deadline, "the server never slept"
        if sleeping(url):
            learner.send_signal(signal.SIGSTOP)
            if sleeping(url):
                return
            learner.send_signal(signal.SIGCONT)
        time.sleep(0.05)


def sleeping(url: str) -> bool:
    return httpx.get(f"{url}/is_sleeping", timeout=10).json()["is_sleeping"]


def steps_done(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


def test_a_dying_learner_leaves_the_server_awake(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    with server_process(tiny_model_dir, out / "adapters", tmp_path / "server.log") as (_, url):
        # Ctrl-C while the server sleeps: the learner wakes it on its way out.
        learner = start_learner(tiny_model_dir, out, url, "--sleep-lease-s", "600", *ASLEEP_LONGER)
        try:
            stop_while_asleep(learner, url, 300)
            learner.send_signal(signal.SIGINT)
            learner.send_signal(signal.SIGCONT)
            assert learner.wait(timeout=60) != 0
        finally:
            learner.kill()
        assert not sleeping(url)

        # kill -9 while the server sleeps: nothing runs in the learner, the lease wakes the server.
        learner = start_learner(tiny_model_dir, out, url, "--sleep-lease-s", "3", *ASLEEP_LONGER)
        try:
            stop_while_asleep(learner, url, 300)
            learner.kill()
            learner.wait(timeout=30)
            killed_at = time.monotonic()
            assert sleeping(url)
            wait_for(lambda: not sleeping(url), 15, "the lease to wake the server")
            assert time.monotonic() - killed_at <= 3.5
        finally:
            learner.kill()
        r = httpx.post(f"{url}/v1/rollouts", json={"prompts": ["1+1="], "n": 2, "max_tokens": 4}, timeout=60)
        assert r.status_code == 200


def test_a_run_survives_a_server_killed_and_restarted(tiny_model_dir: Path, tmp_path: Path) -> None:
    out, port, steps = tmp_path / "run", free_port(), 6
    adapters, log = out / "adapters", tmp_path / "server.log"
    with server_process(tiny_model_dir, adapters, log, port=port, args=FLOAT32) as (server, url):
        learner = start_learner(tiny_model_dir, out, url, "--steps", str(steps), "--server-wait-s", "300")
        try:
            wait_for(lambda: len(steps_done(out)) >= 2, 300, "two steps")
            server.kill()  # SIGKILL: its engine core goes with it
            server.wait(timeout=30)
            with server_process(tiny_model_dir, adapters, log, port=port, args=FLOAT32) as (_, url2):
                assert learner.wait(timeout=600) == 0, (out / "learner.log").read_text()[-3000:]
                models = httpx.get(f"{url2}/v1/models", timeout=10).json()["data"]
        finally:
            learner.kill()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))  # none lost, none repeated
    (policy,) = [m for m in models if m["kind"] == "lora"]
    assert policy["version"] == metrics[-1]["policy_version"] == _last_saved(adapters)
    # Re-loaded, then checked by the canary: the restarted server samples as the learner scores.
    log = (out / "learner.log").read_text()
    (gap,) = re.findall(r"after re-loading version \d+: \S+ serves version \d+ \(canary gap (\S+) nats", log)
    assert float(gap) < 1e-3  # float32 on both sides


def _last_saved(adapters: Path) -> int:
    return max(int(p.name[1:]) for p in adapters.glob("v[0-9]*"))
