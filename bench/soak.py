"""A bounded soak of a real rollout server: rollouts, adapter hot-swaps and sleep/wake cycles all at
once, for a few minutes. Prints figures; asserts nothing (a benchmark, run by hand).

    .venv/bin/python bench/soak.py [--minutes 2] [--workers 8] [--swap-every 0.5] [--json PATH]

It starts `python -m rollout_server.cli` (no API key, 127.0.0.1, a free port, --max-lora-rank 8) on
the tiny model (or --model DIR) with three seeded random rank-8 peft adapters v1, v2, v3 under its
adapter root, loads v1 as "policy" version 1 and warms up, then runs together until time is up:

- --workers threads of rollouts (2 prompts x n=4 x <=16 tokens, from "policy" or the base at random);
- one thread loading v1/v2/v3 in turn as the next version of "policy" every --swap-every seconds;
- one thread sleeping the server (level 1, a 5 s lease) every --sleep-every seconds, waking it
  --asleep-for seconds later. A rollout or load that meets the sleep gets 503 by design: it is
  counted as "503 asleep", apart from errors.

Every request's (kind, status, latency) is recorded; a transport error is status 0. At the end it
prints requests and statuses per kind, p50/p99 latency of the 200 answers, completions/s, the
versions stamped on rollouts (each must be one that was loaded, and never older than the version
whose load was answered before the rollout was sent), the RSS of every process of the server's
tree (server and vLLM engine core) after warm-up and at the end, and /health. The server is then
stopped by pid (SIGTERM, SIGKILL after 30 s) and whatever of its tree is left is killed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import signal
import subprocess
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx

from learner.local_server import descendants, free_port, spawn_rollout_server, wait_healthy

ADAPTERS = ("v1", "v2", "v3")
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_RANK = 8
SLEEP_LEASE_S = 5.0  # a sleep whose /wake_up is lost ends by itself
ASLEEP_BACKOFF_S = 0.1  # a worker told "asleep" waits this long, as a client would, rather than spin
REQUEST_TIMEOUT_S = 120.0
STOP_GRACE_S = 30.0
LEFTOVER_GRACE_S = 10.0  # what of the tree outlives the server gets this long before SIGKILL


# --- setup --------------------------------------------------------------------------------------


def write_adapters(model_dir: str, root: Path) -> None:
    """Three peft LoRAs of rank 8 on every linear projection, seeded Gaussians (never zero)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    for seed, name in enumerate(ADAPTERS, start=1):
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        config = LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules=ALL_LINEAR)
        peft_model = get_peft_model(model, config)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param_name, param in peft_model.named_parameters():
                if "lora_" in param_name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 4.0 / param.shape[-1] ** 0.5)
        peft_model.save_pretrained(str(root / name))


def start_server(model_dir: str, adapter_root: Path, log_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc, _ = spawn_rollout_server(
        model_dir,
        adapter_root,
        port,
        log_path=log_path,
        extra_args=["--max-lora-rank", str(LORA_RANK)],
        env={"ROLLOUT_API_KEY": ""},
    )
    return proc, f"http://127.0.0.1:{port}"


# --- the server's process tree --------------------------------------------------------------------


def start_time(pid: int) -> str | None:
    """The process's start time in clock ticks (field 22 of /proc/PID/stat): with the pid, it names
    one process, so a pid reused by another process is not mistaken for it. None: gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else fields[19]


def tree(pid: int) -> dict[int, str | None]:
    """`pid` and its descendants, each with its start time."""
    return {p: start_time(p) for p in [pid, *sorted(descendants(pid))]}


def tree_rss(pid: int) -> list[dict]:
    """Name and RSS (MiB, VmRSS of /proc/PID/status) of every live process of the tree under `pid`."""
    rows = []
    for p in tree(pid):
        with contextlib.suppress(OSError):
            status = dict(line.split(":", 1) for line in Path(f"/proc/{p}/status").read_text().splitlines())
            rss_kib = int(status.get("VmRSS", "0 kB").split()[0])  # a zombie has no VmRSS
            rows.append({"pid": p, "name": status["Name"].strip(), "rss_mib": rss_kib / 1024})
    return rows


def stop_server(proc: subprocess.Popen, known: dict[int, str | None]) -> dict:
    """SIGTERM the server, SIGKILL it after 30 s; give the rest of its tree (`known`, plus what runs
    below it now) 10 s more to exit, then SIGKILL what still lives. Returns the seconds to the
    server's exit and to the tree's, and the pids that needed that last SIGKILL."""
    if proc.poll() is None:
        known = {**known, **tree(proc.pid)}
    start = time.perf_counter()
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    server_s = time.perf_counter() - start
    others = {p: started for p, started in known.items() if p != proc.pid and started}
    deadline = time.monotonic() + LEFTOVER_GRACE_S
    while (left := [p for p, started in others.items() if start_time(p) == started]) and time.monotonic() < deadline:
        time.sleep(0.1)
    tree_s = time.perf_counter() - start
    for p in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    return {"server_exit_s": server_s, "tree_gone_s": None if left else tree_s, "left_killed": left}


# --- the load -------------------------------------------------------------------------------------


@dataclass
class Record:
    kind: str
    """'rollout', 'load', 'sleep' or 'wake_up'."""
    code: int
    """HTTP status; 0 when the request raised a transport error."""
    latency_s: float
    asleep: bool = False
    """A 503 because the server sleeps: by design, not an error."""
    detail: str = ""
    """The error's detail (or the transport error), for anything but 200."""
    adapter: str | None = None
    version: int | None = None
    """The policy_version stamped on a rollout, or the version a load asked for."""
    floor: int = 0
    """For a rollout of "policy": the latest version whose load was answered before it was sent."""
    completions: int = 0

    @property
    def outcome(self) -> str:
        return "503 asleep" if self.asleep else "0 transport" if self.code == 0 else str(self.code)


class Soak:
    """The shared state of the load threads: the records and the latest acknowledged version."""

    def __init__(self, url: str, stop: threading.Event) -> None:
        self.url, self.stop = url, stop
        self.records: list[Record] = []  # list.append is atomic: the threads share it without a lock
        self.loaded: set[int] = set()  # versions of "policy" whose load answered 200
        self.asked_not_acked: set[int] = set()  # loads that got no answer: loaded or not, unknown
        self.acked = 0
        self._lock = threading.Lock()

    def call(self, client: httpx.Client, kind: str, path: str, **kwargs) -> tuple[Record, dict | None]:
        """POST `path`; the record (not yet kept) and the JSON body of a 200 answer."""
        start = time.perf_counter()
        try:
            response = client.post(path, **kwargs)
        except httpx.TransportError as e:
            return Record(kind, 0, time.perf_counter() - start, detail=f"{type(e).__name__}: {e}"), None
        record = Record(kind, response.status_code, time.perf_counter() - start)
        if response.status_code == 200:
            return record, response.json()
        try:
            record.detail = str(response.json().get("detail", response.text))
        except ValueError:
            record.detail = response.text[:500]
        record.asleep = response.status_code == 503 and "asleep" in record.detail
        return record, None

    def rollouts(self, worker: int) -> None:
        rng = random.Random(worker)
        with httpx.Client(base_url=self.url, timeout=REQUEST_TIMEOUT_S) as client:
            while not self.stop.is_set():
                adapter = rng.choice(["policy", None])
                prompts = [f"{rng.randrange(50)}+{rng.randrange(50)}=" for _ in range(2)]
                body = {"prompts": prompts, "n": 4, "max_tokens": 16, "adapter": adapter}
                floor = self.acked if adapter else 0
                record, answer = self.call(client, "rollout", "/v1/rollouts", json=body)
                record.adapter, record.floor = adapter, floor
                if answer is not None:
                    record.version = answer["policy_version"]
                    record.completions = sum(len(r["completions"]) for r in answer["results"])
                self.records.append(record)
                if record.asleep:
                    self.stop.wait(ASLEEP_BACKOFF_S)

    def swaps(self, every_s: float) -> None:
        version = 1  # loaded during warm-up
        next_at = time.monotonic() + every_s
        with httpx.Client(base_url=self.url, timeout=REQUEST_TIMEOUT_S) as client:
            while not self.stop.wait(max(0.0, next_at - time.monotonic())):
                next_at = max(next_at + every_s, time.monotonic())  # a slow load delays, never bunches
                version += 1
                body = {"lora_name": "policy", "lora_path": ADAPTERS[(version - 1) % 3], "version": version}
                record, answer = self.call(client, "load", "/v1/load_lora_adapter", json=body)
                record.adapter, record.version = "policy", version
                if answer is not None:
                    with self._lock:
                        self.loaded.add(answer["version"])
                        self.acked = max(self.acked, answer["version"])
                elif record.code == 0:
                    self.asked_not_acked.add(version)
                self.records.append(record)

    def sleeps(self, every_s: float, asleep_s: float) -> None:
        with httpx.Client(base_url=self.url, timeout=REQUEST_TIMEOUT_S) as client:
            while not self.stop.wait(every_s):
                record, _ = self.call(client, "sleep", "/sleep", params={"level": 1, "lease_s": SLEEP_LEASE_S})
                self.records.append(record)
                self.stop.wait(asleep_s)
                record, _ = self.call(client, "wake_up", "/wake_up")  # even when stopping: leave it awake
                self.records.append(record)


def warm_up(url: str, soak: Soak) -> None:
    """Load v1 as version 1 of "policy" and make one rollout from it and one from the base."""
    with httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT_S) as client:
        body = {"lora_name": "policy", "lora_path": "v1", "version": 1}
        client.post("/v1/load_lora_adapter", json=body).raise_for_status()
        soak.loaded.add(1)
        soak.acked = 1
        for adapter in ("policy", None):
            rollout = {"prompts": ["1+2=", "3+4="], "n": 4, "max_tokens": 16, "adapter": adapter}
            client.post("/v1/rollouts", json=rollout).raise_for_status()


def run_load(soak: Soak, args: argparse.Namespace) -> float:
    """Run every thread for --minutes; the seconds it took until the last thread ended."""
    threads = [threading.Thread(target=soak.rollouts, args=(i,), name=f"rollouts-{i}") for i in range(args.workers)]
    threads.append(threading.Thread(target=soak.swaps, args=(args.swap_every,), name="swaps"))
    threads.append(threading.Thread(target=soak.sleeps, args=(args.sleep_every, args.asleep_for), name="sleeps"))
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    try:
        soak.stop.wait(args.minutes * 60)
    finally:
        soak.stop.set()
        for thread in threads:
            thread.join()
    return time.perf_counter() - start


# --- figures --------------------------------------------------------------------------------------


def percentile_ms(seconds: list[float], q: float) -> float | None:
    """The nearest-rank q-th percentile, in ms; None for no sample."""
    if not seconds:
        return None
    ordered = sorted(seconds)
    return 1000 * ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def figures(soak: Soak, seconds: float) -> dict:
    records = soak.records
    kinds: dict[str, dict] = {}
    for kind in ("rollout", "load", "sleep", "wake_up"):
        mine = [r for r in records if r.kind == kind]
        ok = [r.latency_s for r in mine if r.code == 200]
        kinds[kind] = {
            "requests": len(mine),
            "outcomes": dict(sorted(Counter(r.outcome for r in mine).items())),
            "p50_ms": percentile_ms(ok, 50),
            "p99_ms": percentile_ms(ok, 99),
        }
    served = [r for r in records if r.kind == "rollout" and r.code == 200]
    policy = [r for r in served if r.adapter == "policy"]
    stamped = sorted({r.version for r in policy if r.version is not None})
    errors = Counter(f"{r.kind} {r.outcome}: {r.detail[:300]}" for r in records if r.code != 200 and not r.asleep)
    return {
        "seconds": seconds,
        "kinds": kinds,
        "completions_per_s": sum(r.completions for r in served) / seconds,
        "policy_rollouts": len(policy),
        "versions_loaded": len(soak.loaded),
        "versions_stamped": len(stamped),
        "stamped_not_loaded": [v for v in stamped if v not in soak.loaded],
        "loads_unanswered": sorted(soak.asked_not_acked),
        "stale_rollouts": sum(1 for r in policy if r.version is not None and r.version < r.floor),
        "base_not_version_0": sum(1 for r in served if r.adapter is None and r.version != 0),
        "errors": [{"what": what, "count": n} for what, n in errors.most_common()],
    }


def log_findings(log_path: Path) -> dict:
    text = log_path.read_text(errors="replace").splitlines()
    return {
        "error_lines": sum(1 for line in text if " ERROR " in line),
        "tracebacks": sum(1 for line in text if line.startswith("Traceback")),
    }


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def print_report(fig: dict, args: argparse.Namespace) -> None:
    print(
        f"soak: {fig['seconds']:.0f} s, {args.workers} rollout workers (2 prompts x n=4 x <=16 tokens), "
        f"a load every {args.swap_every} s, a sleep every {args.sleep_every} s for {args.asleep_for} s"
    )
    print(f"\n{'kind':8s} {'requests':>8s} {'p50 ms':>7s} {'p99 ms':>7s}  responses (latency: of 200s)")
    for kind, k in fig["kinds"].items():
        outcomes = ", ".join(f"{code}: {n}" for code, n in k["outcomes"].items()) or "-"
        print(f"{kind:8s} {k['requests']:8d} {ms(k['p50_ms']):>7s} {ms(k['p99_ms']):>7s}  {outcomes}")
    print(f"\nrollouts: {fig['completions_per_s']:.1f} completions/s")
    ok = "yes" if not fig["stamped_not_loaded"] else f"NO: {fig['stamped_not_loaded']}"
    print(
        f"versions: {fig['versions_loaded']} loaded; {fig['versions_stamped']} distinct stamped on "
        f"{fig['policy_rollouts']} 'policy' rollouts; every stamped version was loaded: {ok}"
    )
    print(
        f"          older than the version loaded before the rollout was sent: {fig['stale_rollouts']}; "
        f"base rollouts not stamped 0: {fig['base_not_version_0']}; loads with no answer: {fig['loads_unanswered']}"
    )
    print(f"\n{'process':20s} {'pid':>8s} {'RSS start':>10s} {'RSS end':>10s}  (MiB)")
    end = {row["pid"]: row for row in fig["rss_end"]}
    start = {row["pid"]: row for row in fig["rss_start"]}
    for pid in sorted(start.keys() | end.keys()):
        row = start.get(pid) or end[pid]
        before = f"{start[pid]['rss_mib']:.0f}" if pid in start else "-"
        after = f"{end[pid]['rss_mib']:.0f}" if pid in end else "gone"
        print(f"{row['name']:20s} {pid:8d} {before:>10s} {after:>10s}")
    print(f"\n/health at the end: {fig['health']}")
    log = fig["server_log"]
    print(f"server log: {log['path']} ({log['error_lines']} ERROR lines, {log['tracebacks']} tracebacks)")
    if fig["errors"]:
        print("\nerrors (not 200, not 503 asleep):")
        for error in fig["errors"]:
            print(f"  {error['count']:5d} x {error['what']}")
    # uvicorn re-raises the SIGTERM it caught once its graceful shutdown is done: -15 is a clean stop.
    print(
        f"\nstop: the server exited {fig['server_exit_s']:.1f} s after SIGTERM with status {fig['server_exit_code']} "
        f"(-15: uvicorn's clean stop)"
    )
    if fig["left_killed"]:
        print(f"  still alive {LEFTOVER_GRACE_S:.0f} s after it, killed: {fig['left_killed']}")
    else:
        print(f"  its whole tree was gone {fig['tree_gone_s']:.1f} s after SIGTERM")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model directory (default: the tiny model, built into runs/soak-tiny-model)")
    parser.add_argument("--minutes", type=float, default=2.0, help="how long the load runs, 0 < m <= 60 (default 2)")
    parser.add_argument("--workers", type=int, default=8, help="rollout threads, 1 to 64 (default 8)")
    parser.add_argument("--swap-every", type=float, default=0.5, help="seconds between adapter loads (default 0.5)")
    parser.add_argument("--sleep-every", type=float, default=3.0, help="seconds awake between sleeps (default 3)")
    parser.add_argument("--asleep-for", type=float, default=1.0, help="seconds each sleep lasts (default 1)")
    parser.add_argument(
        "--startup-timeout", type=float, default=600.0, help="seconds to wait for /health (default 600)"
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args()
    if not 0 < args.minutes <= 60:
        parser.error("--minutes must be in (0, 60]")
    if not 1 <= args.workers <= 64:
        parser.error("--workers must be in [1, 64]")
    if args.swap_every < 0.05 or args.sleep_every < 0.1 or not 0 < args.asleep_for < SLEEP_LEASE_S:
        parser.error(f"--swap-every >= 0.05, --sleep-every >= 0.1 and 0 < --asleep-for < {SLEEP_LEASE_S:.0f}")

    if args.model:
        model = args.model
    else:
        from learner.tiny_model import build_tiny_model

        model = str(build_tiny_model(Path("runs/soak-tiny-model"), seed=0))
    work = Path(tempfile.mkdtemp(prefix="grpo-soak-"))
    adapter_root, log_path = work / "adapters", work / "server.log"
    write_adapters(model, adapter_root)

    start = time.perf_counter()
    proc, url = start_server(model, adapter_root, log_path)
    known = {proc.pid: start_time(proc.pid)}
    try:
        wait_healthy(proc, url, log_path, 0, args.startup_timeout)
        startup_s = time.perf_counter() - start
        print(f"server up in {startup_s:.0f} s at {url} (pid {proc.pid}, log {log_path})", flush=True)
        soak = Soak(url, threading.Event())
        warm_up(url, soak)
        known |= tree(proc.pid)
        rss_start = tree_rss(proc.pid)
        seconds = run_load(soak, args)
        known |= tree(proc.pid)
        fig = figures(soak, seconds) | {"startup_s": startup_s}
        fig["rss_start"], fig["rss_end"] = rss_start, tree_rss(proc.pid)
        try:
            health = httpx.get(f"{url}/health", timeout=10)
            fig["health"] = f"{health.status_code} {health.text}"
        except httpx.TransportError as e:
            fig["health"] = f"0 {type(e).__name__}: {e}"
    finally:
        stopped = stop_server(proc, known)
    fig |= stopped
    fig["server_exit_code"] = proc.returncode
    fig["server_log"] = {"path": str(log_path), **log_findings(log_path)}
    print_report(fig, args)
    if args.json:
        args.json.write_text(json.dumps(fig, indent=2) + "\n")


if __name__ == "__main__":
    main()
