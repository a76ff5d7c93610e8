"""Peak resident memory of every process of a tree, sampled from /proc (Linux) while it runs.

Each process's figure is its VmHWM, the kernel's high-water mark of its resident set, read every
`interval_s` and kept at its largest; a process that grows in its last interval before exiting is
under-counted by that much. Summing processes counts the pages they share (libraries, torch) once
per process: an upper bound of the tree's footprint. On CUDA the figure to compare would be
`torch.cuda.max_memory_allocated` in each process, which only the process itself can read; these
benches run on CPU, where resident memory is what there is.
"""

from __future__ import annotations

import contextlib
import threading
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

    def _run(self) -> None:
        while not self._stopped.is_set():
            for pid in {self.root_pid} | descendants(self.root_pid):
                self._sample(pid)
            self._stopped.wait(self._interval_s)

    def _sample(self, pid: int) -> None:
        # A process may exit between listing and reading (or be a zombie, with no VmHWM left): it
        # keeps what was last read of it.
        with contextlib.suppress(OSError, KeyError):
            fields = dict(
                line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line
            )
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            hwm = int(fields["VmHWM"].split()[0]) * 1024  # kB
            seen = self.processes.get(pid)
            # vLLM renames its processes once started: the newest command line is kept.
            self.processes[pid] = ProcessPeak(int(fields["PPid"]), cmdline, max(hwm, seen.hwm_bytes if seen else 0))
