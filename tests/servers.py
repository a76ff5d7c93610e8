"""A real rollout server process for integration tests, and servers started ahead of their tests."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from pathlib import Path
from typing import Generic, TypeVar

from learner.local_server import descendants, free_port, local_rollout_server, spawn_rollout_server, wait_healthy
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


@contextmanager
def group_server(
    model_dir: Path, adapter_root: Path, log_path: Path, *, port: int, args: Sequence[str] = ()
) -> Iterator[subprocess.Popen]:
    """A real `grpo-rollout-server` on 127.0.0.1:`port` (no API key) leading a process group of its
    own, once healthy: as `local_rollout_server` starts one (vLLM's engine core and worker join the
    group; a parent-death signal), but on a given port and handing out its process, for tests that
    kill the whole group by pid and start another server in its place. The group is killed on exit."""
    proc, start = spawn_rollout_server(
        str(model_dir), adapter_root, port, log_path=log_path, extra_args=args, env={"ROLLOUT_API_KEY": ""}
    )
    try:
        wait_healthy(proc, f"http://127.0.0.1:{port}", log_path, start, 300)
        yield proc
    finally:
        kill_group(proc)


def kill_group(proc: subprocess.Popen) -> set[int]:
    """SIGKILL the process group `proc` leads (and any process below it that left the group), then
    reap `proc`; returns the pids killed. Nothing is sent once `proc` has been reaped: its pid, and
    so the group's id, may be another process's by then."""
    if proc.poll() is not None:
        return set()
    tree = descendants(proc.pid) | {proc.pid}  # before the kill: orphans are no longer below proc
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    for pid in tree - {proc.pid}:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=30)
    return tree


K = TypeVar("K")
V = TypeVar("V")


class _Held(Generic[V]):
    """A context manager entered, held and exited by a background thread of its own.

    The thread lives until `close`: a server process armed with a parent-death signal
    (shared.lifeline.die_with_parent) is killed when the thread that started it ends.
    """

    def __init__(self, make: Callable[[], AbstractContextManager[V]]) -> None:
        self._entered, self._closing = threading.Event(), threading.Event()
        self._value: V | None = None
        self._enter_error: BaseException | None = None
        self._exit_error: BaseException | None = None
        self._thread: threading.Thread | None = None
        try:
            manager = make()
        except Exception as e:  # raised by `value`, in the test that uses it
            self._enter_error = e
            self._entered.set()
            return
        self._thread = threading.Thread(target=self._hold, args=(manager,), daemon=True)
        self._thread.start()

    def _hold(self, manager: AbstractContextManager[V]) -> None:
        stack = ExitStack()
        try:
            self._value = stack.enter_context(manager)
        except BaseException as e:
            self._enter_error = e
        finally:
            self._entered.set()
        self._closing.wait()
        try:
            stack.close()
        except BaseException as e:
            self._exit_error = e

    def value(self) -> V:
        """What entering gave, once entered; what entering raised is raised here."""
        self._entered.wait()
        if self._enter_error is not None:
            raise self._enter_error
        return self._value

    def close(self) -> None:
        """Exit (after entering ends, if it is still under way); what exiting raised is raised here."""
        self._closing.set()
        if self._thread is not None:
            self._thread.join()
        if self._exit_error is not None:
            raise self._exit_error


@contextmanager
def started_together(makers: Sequence[Callable[[], AbstractContextManager[V]]]) -> Iterator[list[V]]:
    """Several context managers (servers) entered at once, each by a thread of its own (see
    StartAhead for why starts overlap well on 2 cores); their values in order, all exited at the end."""
    held = [_Held(make) for make in makers]
    try:
        yield [h.value() for h in held]
    finally:
        with ExitStack() as closing:  # every one, even if closing one raises
            for h in held:
                closing.callback(h.close)


class StartAhead(Generic[K, V]):
    """One context manager per key (a server per test parameter), entered ahead of its use.

    A vLLM server on CPU takes ~40 s to start, almost all of it single-threaded Python imports
    in two processes one after another (the API server, then the engine core it spawns, which
    runs the model), so one of CI's two cores idles through a start. Entering the next keys'
    servers in background threads while the current key's tests run overlaps the starts with the
    tests and with each other.

    `make(key)` runs in the caller's thread (it may build a model under torch's global seed);
    what it returns is entered, held and exited by a background thread of its own. `order` is
    the order the keys will be used in (from the collected tests; repeats in a row count once):
    `use(key)` also starts the `ahead` keys that follow key there and closes any other started
    ahead, so at most 1 + `ahead` are open. A key asked for out of order is started then, and
    `close` closes whatever is left.
    """

    def __init__(self, make: Callable[[K], AbstractContextManager[V]], order: Sequence[K], ahead: int = 1) -> None:
        self._make = make
        self._order = [key for key, _ in itertools.groupby(order)]
        self._ahead = ahead
        self._next = 0  # where in `order` the next use is expected
        self._open: dict[K, _Held[V]] = {}

    @contextmanager
    def use(self, key: K) -> Iterator[V]:
        """Key's entered value (raising what entering raised); key is closed on exit."""
        upcoming = self._upcoming(key)
        for other in [k for k in self._open if k != key and k not in upcoming]:
            self._open.pop(other).close()
        for k in [key, *upcoming]:
            if k not in self._open:
                self._open[k] = _Held(lambda k=k: self._make(k))
        try:
            yield self._open[key].value()
        finally:
            self._open.pop(key).close()

    def _upcoming(self, key: K) -> list[K]:
        """The `ahead` keys after key's next place in `order` (searched from the start if it is not ahead)."""
        for start in (self._next, 0):
            if key in self._order[start:]:
                i = self._order.index(key, start)
                self._next = i + 1
                return [k for k in self._order[i + 1 : i + 1 + self._ahead] if k != key]
        return []

    def close(self) -> None:
        with ExitStack() as closing:  # every one, even if closing one raises
            while self._open:
                closing.callback(self._open.popitem()[1].close)


class ReplicaServers:
    """Real rollout servers of one model sharing one adapter root (as replicas on a shared volume
    do), started together, each on 127.0.0.1 at a port that stays its own across a restart (its
    clients keep working), leading a process group of its own (`group_server`)."""

    def __init__(self, model_dir: Path, adapter_root: Path, log_dir: Path, args: Sequence[Sequence[str]]) -> None:
        """`args[i]`: replica i's server flags, the same at every start."""
        self.adapter_root = adapter_root
        adapter_root.mkdir(parents=True, exist_ok=True)
        self._model_dir, self._log_dir, self._args = model_dir, log_dir, args
        self._ports = [free_port() for _ in args]
        self._held = [self._start(i) for i in range(len(args))]

    def _start(self, i: int) -> _Held[subprocess.Popen]:
        log_path = self._log_dir / f"server-{i}.log"  # appended to by each start
        return _Held(
            lambda: group_server(self._model_dir, self.adapter_root, log_path, port=self._ports[i], args=self._args[i])
        )

    def urls(self) -> list[str]:
        """Each replica's URL, once every one answers /health (a restarted one may still be starting)."""
        for held in self._held:
            held.value()
        return [f"http://127.0.0.1:{port}" for port in self._ports]

    def kill(self, i: int) -> set[int]:
        """SIGKILL replica i's whole process group (the server, its engine core and worker) by pid;
        returns the pids killed."""
        killed = kill_group(self._held[i].value())
        self._held[i].close()  # nothing left to stop
        return killed

    def restart(self, i: int) -> None:
        """Start replica i again, with its flags and on its port, in the background (`urls` waits
        for it); a start that fails is raised there."""
        self._held[i] = self._start(i)

    def close(self) -> None:
        with ExitStack() as closing:  # every one, even if closing one raises
            for held in self._held:
                closing.callback(held.close)


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
