"""Peak memory and time of one policy update, with and without gradient checkpointing.

Each setting runs in a fresh process: on CPU the figure is the process's peak RSS (which cannot be
reset, so it includes loading); on CUDA it is `torch.cuda.max_memory_allocated` during the second
update, with the base in 4-bit unless --no-4bit.
Prints a table; asserts nothing.

    .venv/bin/python bench/memory.py [--hidden 512] [--layers 8] [--seq 256] [--batch 16]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def build_model(out: Path, hidden: int, layers: int) -> None:
    """A random Qwen2 of the given size with the bundled tokenizer (vocab 1024)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from learner.tiny_model import write_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    write_tokenizer(out)
    config = Qwen2Config(
        vocab_size=1024,
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(out)


def child(model_dir: str, checkpointing: bool, seq: int, batch: int, load_in_4bit: bool) -> dict:
    from learner.model import load_policy
    from learner.update import policy_update
    from shared.config import LearnerConfig

    cfg = LearnerConfig(
        gradient_checkpointing=checkpointing, micro_batch_size=batch, load_in_4bit=load_in_4bit, loss={"beta": 0.04}
    )
    policy, _ = load_policy(model_dir, cfg)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(0)
    prompt_len = seq // 4
    prompts = [torch.randint(3, 1024, (prompt_len,), generator=g).tolist() for _ in range(batch)]
    completions = [torch.randint(3, 1024, (seq - prompt_len,), generator=g).tolist() for _ in range(batch)]
    sampler = [[-7.0] * len(c) for c in completions]
    advantages = torch.randn(batch, generator=g)

    def one_update() -> float:
        start = time.perf_counter()
        policy_update(policy, optimizer, prompts, completions, sampler, advantages, cfg, pad_id=0)
        return time.perf_counter() - start

    one_update()  # warm-up: allocator pools, optimizer state
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    seconds = one_update()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "checkpointing": checkpointing,
        "device": "cuda" if cuda else "cpu",
        "update_s": round(seconds, 3),
        "peak_mib": round(peak / 2**20, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256, help="tokens per sequence (prompt 1/4, completion 3/4)")
    parser.add_argument("--batch", type=int, default=16, help="sequences in the (single) micro-batch")
    parser.add_argument("--model", help="an existing model directory instead of a random Qwen2")
    parser.add_argument("--no-4bit", action="store_true", help="CUDA: keep the base in bf16")
    parser.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        row = child(args.model, args.child == "on", args.seq, args.batch, not args.no_4bit)
        print("RESULT " + json.dumps(row))
        return
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            model = str(Path(tmp) / "model")
            build_model(Path(model), args.hidden, args.layers)
        print(f"model {model}: batch {args.batch} x {args.seq} tokens, one update")
        print(f"{'checkpointing':>14} {'device':>6} {'update s':>9} {'peak MiB':>9}")
        for flag in ("off", "on"):
            cmd = [sys.executable, __file__, "--child", flag, "--model", model, "--seq", str(args.seq)]
            cmd += ["--batch", str(args.batch)] + (["--no-4bit"] if args.no_4bit else [])
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            row = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
            print(f"{flag:>14} {row['device']:>6} {row['update_s']:>9} {row['peak_mib']:>9}")


if __name__ == "__main__":
    main()
