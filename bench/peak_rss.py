"""Peak resident memory of the processes of a tree, sampled from /proc (Linux) while it runs.

Every `interval_s` each process of the tree is read: its VmHWM (the kernel's high-water mark of
its resident set) and its VmRSS (resident now). One process's peak is its VmHWM, as last read; a
process that grows in its last interval before exiting is under-counted by that much. Several
processes' peak is their largest total VmRSS at one sampling, not the sum of their peaks: a server
tree has short-lived helpers (a first start runs a dozen compilers one after another) that never
coexist. Either way, pages that processes share (libraries, torch) count once per process. On
CUDA the figure to compare would be `torch.cuda.max_memory_allocated` in each process, which only
the process itself can read; these benches run on CPU, where resident memory is what there is.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from learner.local_server import descendants


@dataclass
class ProcessPeak:
    """One process as last seen: its parent, its command line, its peak resident set."""

    ppid: int
    cmdline: str
    hwm_bytes: int


class PeakRss:
    """Samples `root_pid` and its descendants in a thread, from `start()` until `stop()`."""

    def __init__(self, root_pid: int, interval_s: float = 0.2) -> None:
        self.root_pid = root_pid
        self.processes: dict[int, ProcessPeak] = {}
        self._samplings: list[dict[int, int]] = []  # per sampling: pid -> resident bytes
        self._interval_s = interval_s
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> PeakRss:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()

    def subtree(self, pid: int) -> list[int]:
        """`pid` and every process seen below it, by the parents recorded."""
        found = [pid]
        for parent in found:
            found += [p for p, seen in self.processes.items() if seen.ppid == parent and p not in found]
        return [p for p in found if p in self.processes]

    def peak(self, pids: Iterable[int]) -> int:
        """Peak resident bytes of `pids` together: one process's VmHWM, or several processes'
        largest total at one sampling."""
        pids = set(pids)
        if len(pids) == 1:
            return self.processes[pids.pop()].hwm_bytes
        return max((sum(rss for pid, rss in s.items() if pid in pids) for s in self._samplings), default=0)

    def _run(self) -> None:
        while not self._stopped.is_set():
            sampling = {}
            for pid in {self.root_pid} | descendants(self.root_pid):
                # A process may exit between listing and reading (or be a zombie, with no VmHWM
                # left): it keeps what was last read of it.
                with contextlib.suppress(OSError, KeyError):
                    sampling[pid] = self._read(pid)
            self._samplings.append(sampling)
            self._stopped.wait(self._interval_s)

    def _read(self, pid: int) -> int:
        """Record `pid`'s peak and command line; returns its resident bytes now."""
        fields = dict(
            line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line
        )
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        hwm, rss = (int(fields[key].split()[0]) * 1024 for key in ("VmHWM", "VmRSS"))  # kB
        seen = self.processes.get(pid)
        # vLLM renames its processes once started: the newest command line is kept.
        self.processes[pid] = ProcessPeak(int(fields["PPid"]), cmdline, max(hwm, seen.hwm_bytes if seen else 0))
        return rss
