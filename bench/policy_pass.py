"""The learner's passes on CPU, and what might make them faster. Prints figures; asserts nothing.

    .venv/bin/python bench/policy_pass.py [--tokens 256] [--repeats 3]

On the 25M Qwen2 of bench/compare_trl.py with the bench's LoRA (r=8, alpha 16, every linear layer)
and a batch as one bench step's: 32 sequences of a 20-token prompt and --tokens completion tokens
(random ids, seeded), scored by `learner.logprobs.scored_logprobs` as the update scores them:
- the reference pass (adapter disabled, no grad) against the policy pass (forward and backward),
  with the learner's LoRA layers (learner.lora_linear) and with peft's (fused_lora off);
- the policy pass with the decoder under `torch.compile` (its first call's time is the compile);
- the policy pass under bf16 autocast (this CPU's AVX512-BF16, where it has it), and its gap:
  the mean |log-probability| difference from float32 over the scored tokens, the error it would
  add to the sampler gap (vLLM samples in float32 on CPU).
Medians of --repeats after one warm-up, seconds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/, for compare_trl's model builder
from compare_trl import build_qwen2_25m  # noqa: E402

from learner.logprobs import Sequence, scored_logprobs  # noqa: E402
from learner.model import load_policy  # noqa: E402
from shared.config import LearnerConfig  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(first call's seconds, median of `repeats` later calls)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    later = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        later.append(time.perf_counter() - start)
    return first, statistics.median(later)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model_dir = build_qwen2_25m(REPO / "runs/bench-compare/models/qwen2-25m")
    cfg = LearnerConfig(model=str(model_dir), lora={"r": 8, "alpha": 16, "dropout": 0.0})
    policy, tokenizer = load_policy(str(model_dir), cfg)
    generator = torch.Generator().manual_seed(0)
    vocab = len(tokenizer)
    sequences = [
        Sequence.continuation(
            torch.randint(3, vocab, (20,), generator=generator).tolist(),
            torch.randint(3, vocab, (args.tokens,), generator=generator).tolist(),
        )
        for _ in range(32)
    ]
    kwargs = {"temperature": 1.0, "chunk_size": cfg.logprob_chunk_size, "pad_id": tokenizer.pad_token_id}

    def reference() -> torch.Tensor:
        with torch.no_grad(), policy.disable_adapter():
            return scored_logprobs(policy, sequences, **kwargs)

    def policy_pass(model=policy) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        logprobs = scored_logprobs(model, sequences, **kwargs)
        logprobs.sum().backward()
        return logprobs.detach()

    peft_layers, _ = load_policy(str(model_dir), cfg.model_copy(update={"fused_lora": False}))

    def bf16_pass() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return policy_pass()

    print(f"25M Qwen2, 32 x (20 + {args.tokens}) tokens, {torch.get_num_threads()} torch threads", flush=True)
    print("| pass | first call (s) | median (s) |")
    print("|---|---|---|")
    for name, fn in (
        ("reference (no grad, adapter disabled)", reference),
        ("policy (forward + backward)", policy_pass),
        ("policy, peft's LoRA layers (fused_lora off)", lambda: policy_pass(peft_layers)),
    ):
        first, median = timed(fn, args.repeats)
        print(f"| {name} | {first:.2f} | {median:.2f} |", flush=True)
    fp32 = policy_pass()
    first, median = timed(bf16_pass, args.repeats)
    scored = torch.tensor([[True] * args.tokens] * 32)
    gap = (bf16_pass() - fp32)[scored].abs().mean().item()
    print(
        f"| policy under bf16 autocast | {first:.2f} | {median:.2f} | gap to float32 {gap:.4f} nats/token |", flush=True
    )
    decoder = policy.get_base_model().get_decoder()
    eager = decoder.forward
    decoder.forward = torch.compile(eager, dynamic=False)
    first, median = timed(policy_pass, args.repeats)
    print(f"| policy, decoder under torch.compile | {first:.2f} (compile) | {median:.2f} |", flush=True)
    decoder.forward = eager


if __name__ == "__main__":
    main()
