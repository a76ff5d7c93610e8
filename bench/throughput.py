"""Figures for the tiny model on this machine: server start-up, rollout throughput, learner step time
and peak memory. Prints a table; asserts nothing (speed is measured here, not tested).

    .venv/bin/python bench/throughput.py [--model DIR] [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import torch

from learner.cli import train
from learner.local_server import local_rollout_server
from learner.model import load_policy, save_adapter
from learner.tiny_model import build_tiny_model
from shared.config import LearnerConfig


def rollout_figures(url: str, adapter: str | None, prompts: int, n: int, max_tokens: int, repeats: int) -> dict:
    body = {"prompts": ["12+7=", "the cat", "3+4=", "a dog"][:prompts] * (prompts // 4 or 1), "n": n}
    body |= {"max_tokens": max_tokens, "adapter": adapter, "seed": 0}
    httpx.post(f"{url}/v1/rollouts", json=body, timeout=600).raise_for_status()  # warm-up
    seconds, tokens = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        r = httpx.post(f"{url}/v1/rollouts", json=body, timeout=600).json()
        seconds.append(time.perf_counter() - start)
        tokens += sum(len(c["token_ids"]) for res in r["results"] for c in res["completions"])
    completions = len(body["prompts"]) * n
    return {
        "batch_s": statistics.median(seconds),
        "completions_per_s": completions * repeats / sum(seconds),
        "tokens_per_s": tokens / sum(seconds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model directory (default: the bundled tiny model)")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="grpo-bench-"))
    model = args.model or str(build_tiny_model(Path("runs/tiny-model"), seed=0, warmup="addition"))
    policy, _ = load_policy(model, LearnerConfig())  # a fresh LoRA: exercises vLLM's LoRA path
    adapter = save_adapter(policy, work / "adapters", 1)

    start = time.perf_counter()
    with local_rollout_server(model, work / "adapters", log_path=work / "server.log") as url:
        startup_s = time.perf_counter() - start
        httpx.post(
            f"{url}/v1/load_lora_adapter", json={"lora_name": "bench", "lora_path": adapter.name}
        ).raise_for_status()
        base = rollout_figures(url, None, prompts=4, n=8, max_tokens=32, repeats=5)
        lora = rollout_figures(url, "bench", prompts=4, n=8, max_tokens=32, repeats=5)
    print(f"device: {'cuda' if torch.cuda.is_available() else 'cpu'}, torch threads {torch.get_num_threads()}")
    print(f"server start-up (process start -> /health ok): {startup_s:.1f} s")
    for name, fig in (("base", base), ("LoRA", lora)):
        print(
            f"rollouts {name:4s} 4 prompts x n=8 x <=32 tokens: {fig['batch_s']:.2f} s/batch, "
            f"{fig['completions_per_s']:.1f} completions/s, {fig['tokens_per_s']:.0f} tokens/s"
        )

    for mode, config in (("unsupervised", "configs/unsupervised.yaml"), ("supervised", "configs/supervised.yaml")):
        import yaml

        raw = yaml.safe_load(Path(config).read_text())
        cfg = LearnerConfig.model_validate(raw | {"model": model, "steps": args.steps, "output_dir": str(work / mode)})
        train(cfg)
        rows = [json.loads(line) for line in (work / mode / "metrics.jsonl").read_text().splitlines()][1:]
        parts = {k: statistics.mean(r[f"time_{k}"] for r in rows) for k in ("generate", "score", "update", "swap")}
        print(
            f"learner {mode}: {sum(parts.values()):.2f} s/step after the first "
            f"({', '.join(f'{k} {v:.2f}' for k, v in parts.items())}), "
            f"{cfg.prompts_per_step} prompts x n={cfg.sampling.n}"
        )
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"learner process peak RSS: {peak_mib:.0f} MiB")
    if torch.cuda.is_available():
        print(f"learner peak CUDA memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
