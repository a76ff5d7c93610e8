"""The rollout server's CPU threads: how fast it samples while the learner waits, and what its
threads cost the learner's computation right after a rollout returns. Prints figures; asserts nothing.

    .venv/bin/python bench/threads.py [--rounds 4] [--tokens 256]

On a CPU machine the learner and its local server share the cores, one phase at a time: the learner
is blocked on HTTP while the server samples, and the server is idle while the learner scores and
updates. For each setting of the server's OpenMP threads (OMP_NUM_THREADS) and wait policy
(OMP_WAIT_POLICY), this starts a server (the learner's local one's flags) on the 25M Qwen2 of
bench/compare_trl.py and times:
- a rollout: 4 prompts x 8 completions x --tokens tokens at temperature 1 (the median of --rounds,
  after one warm-up);
- right after each rollout returns, a fixed float32 matmul load in this process (the learner's side:
  torch's default threads), against the same load with no server running: the stall the server's
  threads cause once their work is done (GNU OpenMP threads spin before they sleep).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/, for compare_trl's model builder
from compare_trl import DATA, build_qwen2_25m  # noqa: E402

from learner.data import load_rows  # noqa: E402
from learner.local_server import local_rollout_server, server_flags  # noqa: E402
from learner.model import adapter_serving, server_dtype  # noqa: E402
from learner.rollout_client import RolloutClient  # noqa: E402
from shared.schemas import RolloutRequest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SETTINGS = {
    "1 thread (the default: cores - 1)": {"OMP_NUM_THREADS": "1"},
    "2 threads": {"OMP_NUM_THREADS": "2"},
    "2 threads, OMP_WAIT_POLICY=PASSIVE": {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"},
    "1 thread, OMP_WAIT_POLICY=PASSIVE": {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"},
}


def learner_load() -> float:
    """Seconds of a fixed float32 matmul load (~0.3 s here), as the learner's next computation."""
    a, b = torch.randn(1024, 512), torch.randn(512, 2048)
    start = time.perf_counter()
    for _ in range(40):
        a @ b
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--work-dir", type=Path, default=REPO / "runs/bench-threads")
    args = parser.parse_args()
    model = build_qwen2_25m(REPO / "runs/bench-compare/models/qwen2-25m")
    prompts = [row.text for row in load_rows(DATA, "unsupervised")[:4]]
    request = RolloutRequest(prompts=prompts, n=8, max_tokens=args.tokens, temperature=1.0, seed=0)
    flags = server_flags({"dtype": server_dtype(), "adapter_serving": adapter_serving(), "max_model_len": 512})
    learner_load()
    alone = statistics.median(learner_load() for _ in range(5))
    print(f"learner load with no server: {alone:.3f} s (torch threads {torch.get_num_threads()})", flush=True)
    print(f"| server threads | rollout 4 x 8 x {args.tokens} tokens (s) | learner load right after (s) |")
    print("|---|---|---|")
    for name, env in SETTINGS.items():
        args.work_dir.mkdir(parents=True, exist_ok=True)
        with local_rollout_server(
            str(model), args.work_dir / "adapters", log_path=args.work_dir / "server.log", extra_args=flags, env=env
        ) as url:
            client = RolloutClient(url)
            rollouts, after = [], []
            for i in range(args.rounds + 1):
                request = request.model_copy(update={"seed": i})
                start = time.perf_counter()
                client.generate(request, expected_version=0)
                seconds = time.perf_counter() - start
                load = learner_load()
                if i:  # the first is the warm-up
                    rollouts.append(seconds)
                    after.append(load)
            client.close()
        print(f"| {name} | {statistics.median(rollouts):.2f} | {statistics.median(after):.3f} |", flush=True)
    print(f"\n(the load alone: {alone:.3f} s; {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
