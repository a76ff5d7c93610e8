"""Steps/s of grpo-learner with one or two rollout replicas, and overlap off or on, on this machine.

    .venv/bin/python bench/scale_out.py [--model DIR] [--steps 8] [--work-dir runs/bench-scale-out]

Starts two real rollout servers (LoRA serving, rank matched) on 127.0.0.1 that share one adapter
root, then runs the grpo-learner CLI four times against them: one replica or both, synchronous or
`--overlap`, all with `--no-sleep-server` (the only differences are the ones measured). Prints the
median seconds per step after two warm-up steps, each phase, and the staleness the overlap gave;
then what the same phases would give on separate devices, where the gains come from. Asserts
nothing: on one 2-core machine the servers and the learner share the same cores, so neither
replicas nor overlap can add compute, and the figures say so.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import yaml

from learner.local_server import local_rollout_server, lora_rank_slot, server_flags
from learner.tiny_model import build_tiny_model
from shared.config import LearnerConfig

DATA = Path(__file__).resolve().parent.parent / "examples" / "unsupervised.jsonl"
WARM_UP = 2
"""Steps left out of the medians: the first samples cold, and with overlap the second is the
first to wait for a rollout asked for ahead."""


def learner_settings(model_dir: Path, out: Path, urls: list[str], overlap: bool, steps: int) -> dict:
    """The issue 9 workload (4 prompts x 8 completions x <=32 tokens, LoRA r=8 on all linear layers)."""
    return {
        "mode": "unsupervised",
        "data": str(DATA),
        "model": str(model_dir),
        "server_url": urls,
        "output_dir": str(out),
        "steps": steps,
        "prompts_per_step": 4,
        "micro_batch_size": 32,
        "learning_rate": 1e-4,
        "save_steps": 0,
        "sample_every": 0,
        "sleep_server": False,
        "overlap": overlap,
        "sampling": {"n": 8, "max_tokens": 32, "temperature": 1.0, "seed": 0},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "loss": {"beta": 0.04},
    }


def run_learner(settings: dict, out: Path, adapter_root: Path) -> list[dict]:
    """The CLI in a child process on `settings`; metrics.jsonl's training rows. The run's adapters
    go to the servers' shared root (output_dir/adapters links to it), numbered after earlier runs'."""
    out.mkdir(parents=True)
    (out / "adapters").symlink_to(adapter_root.resolve(), target_is_directory=True)
    LearnerConfig.model_validate(settings)  # a setting the learner would refuse stops here
    (out / "config.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    learner = Path(sys.executable).parent / "grpo-learner"
    with (out / "learner.log").open("wb") as log:
        subprocess.run([str(learner), "--config", str(out / "config.yaml")], stdout=log, stderr=log, check=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if "reward_mean" in row]


def figures(rows: list[dict]) -> dict[str, float]:
    """Medians after the warm-up: wall seconds per step (between rows) and each phase."""
    kept = list(zip(rows, rows[1:], strict=False))[WARM_UP - 1 :]
    median = lambda values: statistics.median(values)  # noqa: E731
    out = {"s/step": median([row["time"] - previous["time"] for previous, row in kept])}
    for phase in ("generate", "score", "update", "swap"):
        out[phase] = median([row[f"time_{phase}"] for _, row in kept])
    out["staleness"] = max(row["staleness"] for _, row in kept)
    out["dropped"] = sum(row["stale_dropped"] for row in rows)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="base model directory (default: the bundled tiny model)")
    parser.add_argument("--steps", type=int, default=8, help="learner steps per run (default 8; 2 are warm-up)")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/bench-scale-out"))
    args = parser.parse_args()
    assert args.steps > WARM_UP + 1, f"--steps must exceed {WARM_UP + 1}"
    work = args.work_dir / time.strftime("%Y%m%d-%H%M%S")
    model_dir = args.model or build_tiny_model(args.work_dir / "tiny-model", seed=0, warmup="addition")
    adapter_root = work / "adapters"
    adapter_root.mkdir(parents=True)
    flags = server_flags({"adapter_serving": "lora", "max_lora_rank": lora_rank_slot(8)})
    results: dict[tuple[int, bool], dict[str, float]] = {}
    with ExitStack() as stack:
        urls = [
            stack.enter_context(
                local_rollout_server(str(model_dir), adapter_root, log_path=work / f"server-{i}.log", extra_args=flags)
            )
            for i in range(2)
        ]
        for replicas in (1, 2):
            for overlap in (False, True):
                name = f"replicas{replicas}-{'overlap' if overlap else 'sync'}"
                settings = learner_settings(model_dir, work / name, urls[:replicas], overlap, args.steps)
                print(f"{name}: {args.steps} steps ...", flush=True)
                results[replicas, overlap] = figures(run_learner(settings, work / name, adapter_root))

    print(f"\nmodel {model_dir}; 4 prompts x 8 completions x <=32 tokens; medians of steps {WARM_UP + 1}-{args.steps}")
    print("| replicas | overlap | s/step | completions/s | generate | score | update | swap | staleness | dropped |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (replicas, overlap), f in results.items():
        print(
            f"| {replicas} | {'on' if overlap else 'off'} | {f['s/step']:.3f} | {32 / f['s/step']:.1f} | "
            f"{f['generate']:.3f} | {f['score']:.3f} | {f['update']:.3f} | {f['swap']:.3f} | "
            f"{f['staleness']:.0f} | {f['dropped']:.0f} |"
        )
    base = results[1, False]
    generate, train = base["generate"], base["score"] + base["update"] + base["swap"]
    print(
        "\nOn separate devices (each replica and the learner on its own GPU), from the synchronous "
        f"one-replica phases (generate {generate:.3f} s, train {train:.3f} s):\n"
        f"  sync, 1 replica:     generate + train       = {generate + train:.3f} s/step\n"
        f"  sync, 2 replicas:    generate / 2 + train   = {generate / 2 + train:.3f} s/step\n"
        f"  overlap, 1 replica:  max(generate, train)   = {max(generate, train):.3f} s/step\n"
        f"  overlap, 2 replicas: max(generate / 2, train) = {max(generate / 2, train):.3f} s/step\n"
        "Here the two servers and the learner share 2 cores: a second replica or an overlapped rollout "
        "takes its CPU from the others, so the measured rows above are what time-sharing gives."
    )
    print(f"\nlogs and metrics under {work}")


if __name__ == "__main__":
    main()
