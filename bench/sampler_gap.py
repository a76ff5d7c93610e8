"""Sampler vs learner on CUDA: the gap a 4-bit learner sees against the bf16 base vLLM would serve,
against the dequantized base the learner now serves (learner.model.export_served_base), and what a
bf16 LM head costs against the learner's float32 one. Prints figures; asserts nothing.

vLLM's CUDA build is not on the machines this was run on, so the sampler is stood in for by
transformers' bf16 forward of the served weights (vLLM samples from bf16 logits of the same
weights). On CPU only the LM-head comparison runs, in float32 (where it is exact).

    python bench/sampler_gap.py [--model DIR] [--prompts 8] [--k 4] [--tokens 64]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from learner.logprobs import Sequence, scored_logprobs
from learner.model import export_served_base, load_policy
from learner.tiny_model import write_tokenizer
from shared.config import LearnerConfig


def build_random_model(out: Path) -> None:
    """Qwen2.5-1.5B's shape (1.5B parameters) with random weights and the bundled tokenizer (ids < 1024)."""
    out.mkdir(parents=True, exist_ok=True)
    write_tokenizer(out)
    config = Qwen2Config(
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    with torch.no_grad():  # random init gives logits of std ~0.8; real models' are several nats wide
        model.lm_head.weight.mul_(5.0)
    model.save_pretrained(out)


def forward_logprobs(model, sequences: list[Sequence]) -> torch.Tensor:
    """Log-probs of the scored targets from the model's own forward (its dtype's logits), flattened."""
    out = []
    for s in sequences:
        ids = torch.tensor([s.token_ids], device=model.device)
        with torch.no_grad():
            logits = model(ids).logits[0].float()
        mask = torch.tensor(s.scored, device=model.device)
        targets = torch.tensor(s.targets, device=model.device)
        out.append(logits.log_softmax(-1)[mask].gather(-1, targets[mask][:, None])[:, 0])
    return torch.cat(out).cpu()


def learner_logprobs(policy, sequences: list[Sequence]) -> torch.Tensor:
    with torch.no_grad():
        lp = scored_logprobs(policy, sequences, temperature=1.0, chunk_size=1024, pad_id=0)
    return lp[lp != 0].cpu()  # scored slots (a log-prob of exactly 0 does not occur at temperature 1)


def figures(name: str, diff: torch.Tensor) -> None:
    a = diff.abs().double()
    q = torch.quantile(a, torch.tensor([0.5, 0.99], dtype=torch.float64)).tolist()
    w = torch.exp(-diff.double()).clamp(max=2.0)  # the truncated importance weight exp(learner - sampler)
    wq = torch.quantile(w, torch.tensor([0.5, 0.99], dtype=torch.float64)).tolist()
    print(
        f"{name:<52} |gap| mean {a.mean():.4f} p50 {q[0]:.4f} p99 {q[1]:.4f} max {a.max():.4f}"
        f" | is weight p50 {wq[0]:.4f} p99 {wq[1]:.4f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a Hugging Face model directory (default: a random 1.5B Qwen2)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    tmp = Path(tempfile.mkdtemp())
    model_dir = args.model
    if model_dir is None:
        start = time.perf_counter()
        build_random_model(tmp / "model")
        model_dir = str(tmp / "model")
        print(f"random 1.5B Qwen2 built in {time.perf_counter() - start:.0f} s")

    dtype = torch.bfloat16 if cuda else torch.float32
    device = "cuda" if cuda else "cpu"
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 1024, (32,), generator=g) for _ in range(args.prompts)]
    sequences = []
    for prompt in prompts:
        with torch.no_grad():
            out = base.generate(
                prompt[None].repeat(args.k, 1).to(device),
                do_sample=True,
                temperature=1.0,
                top_k=0,
                max_new_tokens=args.tokens,
                min_new_tokens=args.tokens,
                pad_token_id=0,
            )
        sequences += [Sequence.continuation(prompt.tolist(), row[len(prompt) :].tolist()) for row in out]
    print(f"{len(sequences)} sequences of {args.tokens} sampled tokens ({device}, {dtype})")

    # The LM head: float32 chunks (the learner) vs the model's own forward in its dtype.
    policy_full, _ = load_policy(model_dir, LearnerConfig(load_in_4bit=False))
    figures(
        "learner fp32 head vs forward's own head, same weights",
        learner_logprobs(policy_full, sequences) - forward_logprobs(base, sequences),
    )
    del policy_full
    if not cuda:
        return

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    policy, _ = load_policy(model_dir, LearnerConfig(load_in_4bit=True))
    print(f"4-bit learner loaded: {torch.cuda.memory_allocated() / 2**30:.2f} GiB allocated")
    learner = learner_logprobs(policy, sequences)
    figures("4-bit learner vs bf16 base (what vLLM served before)", learner - forward_logprobs(base, sequences))
    del base
    start = time.perf_counter()
    served_dir = export_served_base(policy, model_dir, tmp / "served-base")
    print(f"dequantized base exported in {time.perf_counter() - start:.1f} s")
    served = AutoModelForCausalLM.from_pretrained(served_dir, dtype=torch.bfloat16).to(device).eval()
    figures("4-bit learner vs served dequantized base (now)", learner - forward_logprobs(served, sequences))
    print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
