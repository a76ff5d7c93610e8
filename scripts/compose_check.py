"""`make compose-check`: `docker compose up` from this checkout, run and checked as a user meets it.

On a machine with a Docker engine and no GPU (docker-compose.yml, the CPU default), each phase
timed: build the image; `up -d` with no variables; wait until the rollout server answers on the
host's 127.0.0.1:8000 and the learner has published 3 adapter versions, then read /v1/samples from
the host and check that samples carry those versions; wait for a checkpoint, kill the learner's
process (SIGKILL) and check that it comes back and resumes from that checkpoint (--resume auto)
and trains on; then `down -v` and check that no container, volume or network of the project is
left. `down -v` runs however the check ends, after the services' logs are printed on a failure.

Stdlib only (it runs before and without the project's environment). Compose v2 (`docker compose`)
where it is installed, else v1 (`docker-compose`): the file runs under both.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

ROOT = Path(__file__).resolve().parent.parent
PROJECT = "grpo-compose-check"
URL = "http://127.0.0.1:8000"
VERSIONS = 3  # adapter versions to see in samples before the learner is killed
T = TypeVar("T")


class CheckFailed(Exception):
    pass


def compose_command() -> list[str]:
    """`docker compose` (v2) when the plugin is there, else `docker-compose` (v1)."""
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if subprocess.run(["docker-compose", "version"], capture_output=True).returncode == 0:
        return ["docker-compose"]
    raise CheckFailed("neither `docker compose` (v2) nor `docker-compose` (v1) is installed")


COMPOSE: list[str] = []  # the compose command and its project, set by main
# "No variables": none of the compose file's own may come from the caller's environment.
ENV = {k: v for k, v in os.environ.items() if k not in {"ROLLOUT_API_KEY", "MODEL_DIR", "DATA", "MODE"}}


def compose(*args: str, check: bool = True, capture: bool = True) -> str:
    done = subprocess.run([*COMPOSE, *args], cwd=ROOT, env=ENV, capture_output=capture, text=True)
    if check and done.returncode != 0:
        command = " ".join([*COMPOSE, *args])
        raise CheckFailed(f"{command} exited {done.returncode}: {(done.stderr or '')[-2000:]}")
    return done.stdout or ""


def docker(*args: str) -> str:
    done = subprocess.run(["docker", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise CheckFailed(f"docker {' '.join(args)} exited {done.returncode}: {(done.stderr or '')[-2000:]}")
    return done.stdout


def get_json(path: str) -> dict | None:
    try:
        with urllib.request.urlopen(URL + path, timeout=5) as response:
            return json.load(response)
    except (urllib.error.URLError, OSError, ValueError):
        return None


def wait_for(what: str, probe: Callable[[], T | None], timeout_s: float, period_s: float = 2.0) -> T:
    """`probe()`'s first truthy answer, polled every period_s for at most timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if found := probe():
            return found
        failed = exited_with_error()
        if failed:
            raise CheckFailed(f"while waiting for {what}: {failed}")
        time.sleep(period_s)
    raise CheckFailed(f"timed out after {timeout_s:.0f} s waiting for {what}")


def exited_with_error() -> str | None:
    """Why the run cannot go on: the one-shot prepare service failed (nothing restarts it)."""
    for cid in compose("ps", "-q", "-a").split():
        state = json.loads(docker("inspect", "-f", "{{json .State}}", cid))
        name = docker("inspect", "-f", '{{index .Config.Labels "com.docker.compose.service"}}', cid).strip()
        if state["Status"] == "exited" and state["ExitCode"] != 0 and name == "prepare":
            return f"service {name} exited {state['ExitCode']}"
    return None


def container_of(service: str) -> str:
    (cid,) = compose("ps", "-q", service).split()
    return cid


def learner_exec(*args: str) -> str:
    done = subprocess.run([*COMPOSE, "exec", "-T", "learner", *args], cwd=ROOT, env=ENV, capture_output=True, text=True)
    return done.stdout if done.returncode == 0 else ""


def policy_versions() -> set[int]:
    """Versions of the learner's adapter that samples on the server carry."""
    body = get_json("/v1/samples?limit=256&tokens=false") or {"samples": []}
    return {s["policy_version"] for s in body["samples"] if s["adapter"] == "policy"}


def newest_checkpoint() -> int | None:
    steps = [int(m) for m in re.findall(r"step-(\d+)", learner_exec("ls", "/runs/checkpoints"))]
    return max(steps, default=None)


def last_metrics_step() -> int:
    rows = [json.loads(line) for line in learner_exec("cat", "/runs/metrics.jsonl").splitlines() if line.strip()]
    return max((row["step"] for row in rows), default=0)


def left_behind() -> list[str]:
    label = f"label=com.docker.compose.project={PROJECT}"
    return [
        *(f"container {c}" for c in docker("ps", "-aq", "--filter", label).split()),
        *(f"volume {v}" for v in docker("volume", "ls", "-q", "--filter", label).split()),
        *(f"network {n}" for n in docker("network", "ls", "-q", "--filter", label).split()),
    ]


def phase(name: str, times: dict[str, float]) -> Callable[[Callable[[], T]], T]:
    def run(body: Callable[[], T]) -> T:
        started = time.monotonic()
        print(f"compose-check: {name} ...", flush=True)
        result = body()
        times[name] = time.monotonic() - started
        print(f"compose-check: {name}: {times[name]:.0f} s", flush=True)
        return result

    return run


def main() -> int:
    times: dict[str, float] = {}
    COMPOSE[:] = [*compose_command(), "-p", PROJECT]
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", 8000)) == 0:
            raise CheckFailed("something already listens on 127.0.0.1:8000, where the rollout service is published")
    print(f"compose-check: {' '.join(COMPOSE)} in {ROOT}", flush=True)
    try:
        phase("build the image", times)(lambda: compose("build", capture=False))
        phase("up -d (no variables)", times)(lambda: compose("up", "-d", capture=False))
        phase("rollout server healthy on the host's 127.0.0.1:8000", times)(
            lambda: wait_for("GET /health", lambda: get_json("/health"), 600)
        )

        def versions_in_samples() -> set[int]:
            versions = wait_for(
                f"samples of adapter versions 1..{VERSIONS}",
                lambda: (v := policy_versions()) >= set(range(1, VERSIONS + 1)) and v,
                600,
            )
            models = get_json("/v1/models") or {"data": []}
            live = [m["version"] for m in models["data"] if m["id"] == "policy"]
            print(f"compose-check: samples carry versions {sorted(versions)}; /v1/models serves policy {live}")
            return versions

        phase(f"{VERSIONS} versions published and sampled (read from the host)", times)(versions_in_samples)
        checkpoint = phase("a checkpoint written", times)(lambda: wait_for("a checkpoint", newest_checkpoint, 600))

        def kill_and_resume() -> None:
            cid = container_of("learner")
            before = json.loads(docker("inspect", "-f", "{{json .RestartCount}}", cid))
            # SIGKILL to its process, from this machine, as the kernel's OOM killer would send it:
            # `docker kill` counts as a manual stop, after which Docker restarts nothing.
            os.kill(json.loads(docker("inspect", "-f", "{{json .State.Pid}}", cid)), signal.SIGKILL)
            print(f"compose-check: killed the learner (newest checkpoint step-{checkpoint})", flush=True)
            wait_for(
                "the learner's container to come back",
                lambda: (
                    json.loads(docker("inspect", "-f", "{{json .RestartCount}}", cid)) > before
                    and json.loads(docker("inspect", "-f", "{{json .State.Running}}", cid))
                ),
                120,
                period_s=1,
            )

            def resumed_from() -> list[str]:
                logs = subprocess.run(["docker", "logs", cid], capture_output=True, text=True)
                return re.findall(r"resuming from \S*step-(\d+)", logs.stdout + logs.stderr)

            resumed = wait_for("a 'resuming from' line in the learner's log", resumed_from, 600)
            if int(resumed[-1]) < checkpoint:
                raise CheckFailed(f"resumed from step-{resumed[-1]}, older than step-{checkpoint}")
            step = wait_for(
                f"a step after step {resumed[-1]} in metrics.jsonl",
                lambda: (s := last_metrics_step()) > int(resumed[-1]) and s,
                600,
            )
            print(f"compose-check: resumed from step-{resumed[-1]}, trained on to step {step}", flush=True)

        phase("learner killed, back, resumed from its checkpoint", times)(kill_and_resume)
    except BaseException:
        print("compose-check: FAILED; the services' logs:", flush=True)
        compose("logs", "--tail", "60", check=False, capture=False)
        raise
    finally:
        phase("down -v", times)(lambda: compose("down", "-v", "--remove-orphans", check=False, capture=False))
        left = left_behind()
        if left:
            raise CheckFailed(f"left behind after down -v: {', '.join(left)}")
    print("compose-check: passed; " + ", ".join(f"{name} {s:.0f} s" for name, s in times.items()))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except CheckFailed as e:
        print(f"compose-check: error: {e}", file=sys.stderr)
        sys.exit(1)
