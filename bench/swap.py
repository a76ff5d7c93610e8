"""Merged serving's swap, in place (--merged-swap inplace) against a rewritten checkpoint
(--merged-swap rewrite), on the ~24M Qwen2 of bench/compare_trl.py (hidden 512, 8 layers) and a
~100M one (hidden 768, 14 layers, 12 heads of 64, intermediate 2048), both float32 with the tiny
model's tokenizer and r=8 adapters of every linear projection.

A swap is one POST /v1/load_lora_adapter, alternating two adapters: the first load of a server
(in place: it also reads the base weights the adapter targets, once), then the median, min and
max of --repeats more. In place, the server's log gives the engine's own share of each. The
server tree's resident memory is read before the first load and after the last. After the last
load (v2 after --repeats swaps), a greedy and a sampled rollout of each server are compared:
|delta logprob| between the two modes is the in-place path's drift (it merges from a copy of the
base, so none is expected). Prints a table; asserts nothing.

    .venv/bin/python bench/swap.py [--repeats 9] [--models 25m 100m]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from compare_trl import build_qwen2, build_qwen2_25m, parameter_count  # bench/, this script's directory
from merged_serving import SERVER_ARGS, random_adapter

from learner.local_server import descendants, local_rollout_server

PROMPTS = ["12+7=", "the cat", "3+4=", "a dog"]
CHECKS = [
    {"n": 1, "max_tokens": 32, "temperature": 0},
    {"n": 4, "max_tokens": 32, "temperature": 1.0, "seed": 0},
]


def build_qwen2_100m(out: Path) -> Path:
    """A seeded random Qwen2 of ~100M parameters (as build_qwen2_25m, larger), built once into `out`."""
    return build_qwen2(out, hidden=768, intermediate=2048, layers=14, heads=12)


def tree_rss_bytes() -> int:
    """Resident bytes of every process below this one (the server, its engine core)."""
    total = 0
    for pid in descendants(os.getpid()):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        if match := re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE):
            total += int(match[1]) * 1024
    return total


def load_s(url: str, path: str) -> float:
    start = time.perf_counter()
    r = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "bench", "lora_path": path}, timeout=600)
    seconds = time.perf_counter() - start
    r.raise_for_status()
    return seconds


def samples(url: str) -> list[tuple[list[int], list[float]]]:
    """(token ids, logprobs) of every completion of the CHECKS rollouts."""
    out = []
    for body in CHECKS:
        r = httpx.post(f"{url}/v1/rollouts", json={"prompts": PROMPTS, "adapter": "bench", **body}, timeout=600)
        r.raise_for_status()
        out += [(c["token_ids"], c["logprobs"]) for res in r.json()["results"] for c in res["completions"]]
    return out


def measure(model: Path, adapters: Path, work: Path, swap: str, repeats: int, cpu_threads: int) -> dict:
    log = work / f"{swap}.log"
    args = [*SERVER_ARGS, "--adapter-serving", "merged", "--merged-swap", swap, "--cpu-threads", str(cpu_threads)]
    with local_rollout_server(str(model), adapters, log_path=log, extra_args=args, env={"ROLLOUT_API_KEY": ""}) as url:
        rss_before = tree_rss_bytes()
        first = load_s(url, "v1")
        swaps = [load_s(url, ("v2", "v1")[i % 2]) for i in range(repeats)]
        if repeats % 2 == 0:  # end on v2 whatever the count
            swaps.append(load_s(url, "v2"))
        rss_after = tree_rss_bytes()
        checked = samples(url)
    engine_s = [float(s) for s in re.findall(r"merged \S+ in place: \d+ modules in (\S+) s", log.read_text())]
    return {
        "first": first,
        "median": statistics.median(swaps),
        "min": min(swaps),
        "max": max(swaps),
        "engine_first": engine_s[0] if engine_s else None,
        "engine_median": statistics.median(engine_s[1:]) if engine_s else None,
        "rss_growth": rss_after - rss_before,
        "samples": checked,
        "swaps": len(swaps) + 1,
    }


def swap_figures(
    name: str, work: Path, repeats: int, swaps: tuple[str, ...], cpu_threads: int, models: Path | None = None
) -> tuple[str, dict[str, dict]]:
    """The model `name` (25m or 100m, built once under `models`, default `work`) with two random
    adapters, each swap of `swaps` measured on a server of its own: ("name (parameters, checkpoint
    size)", {swap: measure's figures})."""
    builders = {"25m": build_qwen2_25m, "100m": build_qwen2_100m}
    model = builders[name]((models or work) / f"qwen2-{name}")
    adapters = work / name / "adapters"
    for seed, version in ((1, "v1"), (2, "v2")):
        if not (adapters / version).is_dir():
            random_adapter(model, adapters / version, seed)
    figures = {swap: measure(model, adapters, work / name, swap, repeats, cpu_threads) for swap in swaps}
    # The weights an adapter of every projection merges into.
    targeted = parameter_count(model, names_ending="_proj.weight")
    for f in figures.values():
        f["targeted_params"] = targeted
    megabytes = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 1e6
    return f"{name} ({parameter_count(model) / 1e6:.1f}M, {megabytes:.0f} MB)", figures


def drift(a: list[tuple[list[int], list[float]]], b: list[tuple[list[int], list[float]]]) -> str:
    """Largest |delta logprob| between two servers' samples, or where their tokens part."""
    if [ids for ids, _ in a] != [ids for ids, _ in b]:
        return "tokens differ"
    return f"{max(abs(x - y) for (_, la), (_, lb) in zip(a, b, strict=True) for x, y in zip(la, lb, strict=True)):.1e}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=9, help="timed swaps after the first (default 9)")
    parser.add_argument("--models", nargs="+", choices=["25m", "100m"], default=["25m", "100m"])
    parser.add_argument(
        "--cpu-threads",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="the engine's threads (default: every core, as the learner's local server has them)",
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="grpo-bench-swap-"))
    rows = []
    for name in args.models:
        label, figures = swap_figures(name, work, args.repeats, ("inplace", "rewrite"), args.cpu_threads)
        rows.append((label, figures))
        print(name, {swap: {k: v for k, v in f.items() if k != "samples"} for swap, f in figures.items()}, flush=True)
    print(
        f"\nswap = POST /v1/load_lora_adapter, r=8 all-linear adapters, float32, {args.cpu_threads} engine "
        f"threads; work dir {work}"
    )
    print(
        "| model | swap | first load | median (min-max) of the rest | engine's share (first / median) "
        "| memory growth | drift vs rewrite |"
    )
    print("|---|---|---|---|---|---|---|")
    for label, figures in rows:
        for swap, f in figures.items():
            engine = f"{f['engine_first']:.3f} / {f['engine_median']:.3f} s" if f["engine_first"] is not None else "-"
            gap = drift(f["samples"], figures["rewrite"]["samples"]) if swap == "inplace" else "-"
            print(
                f"| {label} | {swap} | {f['first']:.3f} s | {f['median']:.3f} s ({f['min']:.3f}-{f['max']:.3f}) "
                f"| {engine} | {f['rss_growth'] / 1e6:+.0f} MB | {gap} (after {f['swaps']} loads) |"
            )


if __name__ == "__main__":
    main()
