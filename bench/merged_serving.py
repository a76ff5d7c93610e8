"""Merged adapter serving against LoRA serving, on this machine: the rollout time of the base, of an
r=8 adapter through vLLM's LoRA path (max_lora_rank 8, max_loras 1) and of the same adapter merged
into the weights (--adapter-serving merged), and the time of an adapter load (a swap) in each mode.

Rollouts are 4 prompts x n=8 x <=32 tokens (temperature 1, seed 0), the median of --repeats after a
warm-up; a swap is one POST /v1/load_lora_adapter, alternating two adapters, the median of
--repeats. Models: the bundled tiny model (0.59M) and a random ~24M Qwen2 (hidden 512, 8 layers,
8 heads of 64, the tiny model's tokenizer), both float32. Prints a table; asserts nothing.

    .venv/bin/python bench/merged_serving.py [--repeats 5] [--models tiny 25m]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import torch
from compare_trl import build_qwen2_25m  # bench/, this script's directory

from learner.local_server import local_rollout_server
from learner.tiny_model import build_tiny_model

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SERVER_ARGS = ["--dtype", "float32", "--max-model-len", "256", "--max-lora-rank", "8", "--max-loras", "1"]
ROLLOUT = {"prompts": ["12+7=", "the cat", "3+4=", "a dog"], "n": 8, "max_tokens": 32, "temperature": 1.0, "seed": 0}


def random_adapter(model_dir: Path, out: Path, seed: int) -> None:
    """An r=8 LoRA of every linear projection with seeded random A and B (B is never zero)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(r=8, lora_alpha=16, target_modules=ALL_LINEAR)
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) / param.shape[-1] ** 0.5)
    model.save_pretrained(out)


def rollout_s(url: str, adapter: str | None, repeats: int) -> tuple[float, float]:
    """(median seconds per rollout, mean tokens per completion)."""
    body = {**ROLLOUT, "adapter": adapter}
    httpx.post(f"{url}/v1/rollouts", json=body, timeout=600).raise_for_status()  # warm-up
    seconds, tokens = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        r = httpx.post(f"{url}/v1/rollouts", json=body, timeout=600)
        seconds.append(time.perf_counter() - start)
        r.raise_for_status()
        tokens += [len(c["token_ids"]) for res in r.json()["results"] for c in res["completions"]]
    return statistics.median(seconds), statistics.mean(tokens)


def swap_s(url: str, repeats: int) -> float:
    """Median seconds of a load of the next version (alternating v1 and v2)."""
    seconds = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        body = {"lora_name": "bench", "lora_path": ("v1", "v2")[i % 2]}
        httpx.post(f"{url}/v1/load_lora_adapter", json=body, timeout=600).raise_for_status()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds[1:])  # the first load of a server is its warm-up


def measure(model: Path, work: Path, repeats: int) -> dict[str, float]:
    adapters = work / "adapters"
    for seed, name in ((1, "v1"), (2, "v2")):
        random_adapter(model, adapters / name, seed)
    env = {"ROLLOUT_API_KEY": ""}
    fig = {}
    with local_rollout_server(str(model), adapters, log_path=work / "lora.log", extra_args=SERVER_ARGS, env=env) as url:
        fig["swap_lora"] = swap_s(url, repeats)
        fig["base_lora_server"], fig["tokens"] = rollout_s(url, None, repeats)
        fig["lora"], _ = rollout_s(url, "bench", repeats)
    merged_args = [*SERVER_ARGS, "--adapter-serving", "merged"]
    with local_rollout_server(
        str(model), adapters, log_path=work / "merged.log", extra_args=merged_args, env=env
    ) as url:
        fig["base"], _ = rollout_s(url, None, repeats)
        fig["swap_merged"] = swap_s(url, repeats)
        fig["merged"], _ = rollout_s(url, "bench", repeats)
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed rollouts and swaps per figure (default 5)")
    parser.add_argument("--models", nargs="+", choices=["tiny", "25m"], default=["tiny", "25m"])
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="grpo-bench-merged-"))
    tiny = build_tiny_model(work / "tiny", seed=0)
    models = {"tiny": tiny, "25m": build_qwen2_25m(work / "qwen2-25m")}
    rows = []
    for name in args.models:
        from transformers import AutoConfig, AutoModelForCausalLM

        with torch.device("meta"):
            params = sum(
                p.numel()
                for p in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(models[name])).parameters()
            )
        fig = measure(models[name], work / name, args.repeats)
        rows.append((f"{name} ({params / 1e6:.2f}M)", fig))
        print(f"{name}: {fig}", flush=True)
    print(
        f"\nrollout: 4 prompts x n=8 x <=32 tokens, median of {args.repeats} after a warm-up; float32; work dir {work}"
    )
    print("| model | base | LoRA (r=8) | merged | LoRA / base | merged / base | swap, LoRA | swap, merged |")
    print("|---|---|---|---|---|---|---|---|")
    for label, f in rows:
        print(
            f"| {label} | {f['base']:.2f} s | {f['lora']:.2f} s | {f['merged']:.2f} s | {f['lora'] / f['base']:.2f}x "
            f"| {f['merged'] / f['base']:.2f}x | {f['swap_lora']:.3f} s | {f['swap_merged']:.3f} s |"
        )
    print(
        "(base: the merged-mode server before a load, no LoRA layers; the LoRA-mode server's base took "
        + ", ".join(f"{f['base_lora_server']:.2f} s" for _, f in rows)
        + ")"
    )


if __name__ == "__main__":
    main()
