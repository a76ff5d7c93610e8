"""Runs a rollout server as a child process on a free loopback port, and stops it by pid."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from shared.cli import flag_name
from shared.config import VLLM_LORA_RANKS
from shared.errors import ServerStartError
from shared.lifeline import die_with_parent

log = logging.getLogger(__name__)
WAIT_NOTE_S = 15.0
"""How often a start-up that takes long says it still waits, and what the server's log last said."""


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
    startup_timeout_s: float = 900.0,
) -> Iterator[str]:
    """Start `grpo-rollout-server` on 127.0.0.1, yield its URL once /health answers, stop it on exit.

    The server's output is appended to `log_path`; a server that dies during start-up (or never
    answers) raises ServerStartError naming the cause found in what this start wrote there
    (`startup_failure_cause`). Stopping sends SIGTERM to the process group (vLLM's engine core is
    a child of the server), then SIGKILL if it has not exited within 30 s.
    """
    port = free_port()
    proc, log_start = spawn_rollout_server(model, adapter_root, port, log_path=log_path, extra_args=extra_args, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url, log_path, log_start, startup_timeout_s)
        yield url
    finally:
        _stop(proc)


def spawn_rollout_server(
    model: str,
    adapter_root: Path,
    port: int,
    *,
    log_path: Path,
    extra_args: Sequence[str] = (),
    env: dict[str, str] | None = None,
) -> tuple[subprocess.Popen, int]:
    """Start `grpo-rollout-server` on 127.0.0.1:`port`, its output appended to `log_path`, leading a
    process group of its own (vLLM's engine core joins it) and dying with this process, even one
    killed with SIGKILL. Returns the process and the log's size before it (where this start's lines
    begin, for `wait_healthy`); waits for nothing."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_start = log_path.stat().st_size if log_path.exists() else 0  # earlier runs' lines are not this start's
    cmd = [sys.executable, "-m", "rollout_server.cli", "--model", str(model), "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--adapter-root", str(adapter_root), *extra_args]
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,  # a Ctrl-C at the caller reaches the server only through its stop
            preexec_fn=functools.partial(die_with_parent, parent=os.getpid()),
        )
    return proc, log_start


def wait_healthy(proc: subprocess.Popen, url: str, log_path: Path, log_start: int, timeout_s: float) -> None:
    """Return once `url`/health answers 200; ServerStartError if `proc` exits or time runs out.
    Every WAIT_NOTE_S it logs how long it has waited, and the server log's last line."""
    started = time.monotonic()
    deadline = started + timeout_s
    next_note = started + WAIT_NOTE_S
    while time.monotonic() < deadline:
        if time.monotonic() >= next_note:
            next_note += WAIT_NOTE_S
            last = _read_from(log_path, log_start).strip().splitlines()
            log.info(
                "waiting for the rollout server at %s: %.0f s so far, at most %.0f (--server-start-timeout-s); "
                "its log (%s) last said: %s",
                url,
                time.monotonic() - started,
                timeout_s,
                log_path,
                last[-1][:200] if last else "nothing yet",
            )
        if proc.poll() is not None:
            cause = startup_failure_cause(_read_from(log_path, log_start))
            raise ServerStartError(
                f"the rollout server exited with {proc.returncode} during start-up: {cause} (log: {log_path})"
            )
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    cause = startup_failure_cause(_read_from(log_path, log_start))
    raise ServerStartError(
        f"the rollout server did not answer /health within {timeout_s:.0f} s during start-up; "
        f"its log last said: {cause} (log: {log_path})"
    )


def _read_from(log_path: Path, offset: int) -> str:
    with log_path.open("rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


# An exception's last traceback line, "pkg.mod.SomethingError: message" (or a bare Exception),
# at the start of a line or after vLLM's logger prefix "(EngineCore pid=1) ERROR ... [core.py:1] ".
_EXCEPTION_LINE = re.compile(r"(?:^|\] )((?:[A-Za-z_]\w*\.)*(?:[A-Z]\w*)?(?:Error|Exception)(?::.*)?)$")
# Exceptions that only point elsewhere: vLLM wraps an engine-core failure in these.
_POINTS_ELSEWHERE = re.compile(r"root cause", re.IGNORECASE)


def startup_failure_cause(log_text: str) -> str:
    """The line of a failed start-up's log that names its cause, for a one-line error.

    The last exception line that does not only point at "the root cause above"; the indented
    lines right after it are part of its message (pydantic puts each validation error there:
    "ValidationError: 1 validation error for ModelConfig" / "  Value error, ..."), except
    pydantic's "For further information" link. With no exception line, the last non-blank line.
    """
    lines = log_text.splitlines()
    cause: list[str] = []
    for i, line in enumerate(lines):
        match = _EXCEPTION_LINE.search(line)
        if match is None or _POINTS_ELSEWHERE.search(line):
            continue
        cause = [match.group(1).strip()]
        if match.start(1) == 0:  # no logger prefix: the message may go on over indented lines
            for more in lines[i + 1 :]:
                if not more[:1].isspace() or not more.strip():
                    break
                if not more.strip().startswith("For further information"):
                    cause.append(more.strip())
    if cause:
        return " ".join(cause)
    non_blank = [line.strip() for line in lines if line.strip()]
    return non_blank[-1] if non_blank else "(the server wrote nothing)"


def lora_rank_slot(rank: int) -> int:
    """The smallest LoRA rank vLLM takes as `max_lora_rank` that holds an adapter of `rank`.

    vLLM computes every adapter at the buffers' rank: an r=8 adapter under vLLM's default 16 took
    22% longer to sample from on CPU (24M-parameter Qwen2, 4 prompts x 8 x 32 tokens).
    """
    for slot in VLLM_LORA_RANKS:
        if rank <= slot:
            return slot
    raise ValueError(f"LoRA rank {rank} is above the largest vLLM serves ({VLLM_LORA_RANKS[-1]})")


def server_flags(settings: Mapping[str, Any]) -> list[str]:
    """`grpo-rollout-server` flags for ServerConfig fields given by name (LearnerConfig.server).

    `max_model_len` becomes `--max-model-len`; a bool becomes `--name` or `--no-name`; None is
    left out, as it is the server's default for each field that may be None.
    """
    flags = []
    for name, value in settings.items():
        if value is None:
            continue
        flag = flag_name(name)
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        else:
            flags += [flag, str(value)]
    return flags


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` (children, their children, ...), from /proc."""
    found: set[int] = set()
    stack = [pid]
    while stack:
        for task in Path(f"/proc/{stack.pop()}/task").glob("*"):
            with contextlib.suppress(OSError):
                children = {int(c) for c in (task / "children").read_text().split()}
                stack += children - found
                found |= children
    return found


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)  # the group the server leads: it and its engine core
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
