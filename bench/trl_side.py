"""TRL's GRPOTrainer on the bench workload, timed per phase: the TRL half of bench/compare_trl.py.

    .venv/bin/python bench/trl_side.py WORKLOAD.json RESULT.json

It runs in a process of its own and imports nothing of this project. WORKLOAD.json is written by
compare_trl.py: the model directory, the prompt texts in the order grpo-learner's PromptSampler
takes them (steps x prompts_per_step), and the settings both systems share. TRL generates with
transformers' `generate` (use_vllm=False), trains a peft LoRA, and takes one optimizer step per
batch of prompts_per_step x n completions (no gradient accumulation, one iteration per generation),
with WORKLOAD's number of torch threads. The reward is grpo-learner's unsupervised one: minus the
mean NLL of the completion's text tokens under the policy, without gradients (in the train mode
GRPOTrainer leaves the policy in: with no dropout, the eval-mode forward grpo-learner scores with).

RESULT.json: {"trl_version", "steps": [{"seconds", "phases": {name: seconds}, "reward_mean"}]}, one
entry per optimizer step. Phases, from wrapped GRPOTrainer methods and trainer callbacks:
generate (`_generate`: tokenization and `generate`), reward (`_calculate_rewards`), ref (the rest of
`_generate_and_score_completions`: the reference forward with the adapter disabled, padding,
advantages), loss_forward (`compute_loss`: the policy forward and the loss), backward, optimizer
(`optimizer.step`) and other (the rest of the step: gradient clipping, logging).
"""

from __future__ import annotations

import argparse
import functools
import json
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class PhaseTimer(TrainerCallback):
    """Seconds per phase of every optimizer step: wrapped methods add to the current step's phases,
    `on_step_end` closes the step."""

    def __init__(self) -> None:
        self.steps: list[dict] = []
        self.reward_means: list[float] = []  # appended by the reward function, one per step
        self._phases: dict[str, float] = defaultdict(float)
        self._step_start = self._optimizer_start = 0.0

    def timed(self, fn: Callable, phase: str) -> Callable:
        """`fn`, adding its wall time to `phase` of the current step."""

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._phases[phase] += time.perf_counter() - start

        return wrapper

    def on_step_begin(self, args, state, control, **kwargs):
        self._phases.clear()
        self._step_start = time.perf_counter()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._optimizer_start = time.perf_counter()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self._phases["optimizer"] += time.perf_counter() - self._optimizer_start

    def on_step_end(self, args, state, control, **kwargs):
        seconds = time.perf_counter() - self._step_start
        phases = dict(self._phases)
        # `prepare` (generation and scoring) holds generate and reward; what is left of it is the ref pass.
        phases["ref"] = phases.pop("prepare") - phases["generate"] - phases["reward"]
        phases["other"] = seconds - sum(phases.values())
        self.steps.append({"seconds": seconds, "phases": phases, "reward_mean": self.reward_means[-1]})


@torch.no_grad()
def neg_mean_nll(
    policy: torch.nn.Module,
    prompt_ids: list[list[int]],
    completion_ids: list[list[int]],
    *,
    eos_ids: set[int],
    pad_id: int,
    group: int,
    empty_margin: float,
    empty_reward: float,
) -> list[float]:
    """grpo-learner's unsupervised reward: -mean NLL of each completion's text tokens (the EOS that
    stopped it dropped) after its prompt, at temperature 1. An empty completion scores its group's
    worst non-empty reward minus `empty_margin`; a group with no text at all, `empty_reward`.
    Completions come in groups of `group` consecutive ones per prompt, as GRPOTrainer orders them."""
    texts = [c[:-1] if c and c[-1] in eos_ids else c for c in completion_ids]
    seqs = [p + c for p, c in zip(prompt_ids, texts, strict=True)]
    ids = torch.full((len(seqs), max(map(len, seqs))), pad_id)
    attention = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        attention[i, : len(s)] = 1
    logits = policy(input_ids=ids, attention_mask=attention).logits.float()
    # Position t predicts token t + 1, hence the shift.
    token_logprobs = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    rewards: list[float | None] = []
    for i, (p, c) in enumerate(zip(prompt_ids, texts, strict=True)):
        rewards.append(token_logprobs[i, len(p) - 1 : len(p) - 1 + len(c)].mean().item() if c else None)
    for start in range(0, len(rewards), group):
        scored = [r for r in rewards[start : start + group] if r is not None]
        floor = min(scored) - empty_margin if scored else empty_reward
        rewards[start : start + group] = [floor if r is None else r for r in rewards[start : start + group]]
    return rewards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workload", type=Path, help="JSON written by bench/compare_trl.py")
    parser.add_argument("result", type=Path, help="where to write the per-step figures (JSON)")
    args = parser.parse_args()
    w = json.loads(args.workload.read_text())
    torch.set_num_threads(w["threads"])

    tokenizer = AutoTokenizer.from_pretrained(w["model"])
    base = AutoModelForCausalLM.from_pretrained(w["model"], dtype=torch.float32)
    eos = base.generation_config.eos_token_id  # an id, a list of ids (vLLM stops on each), or None
    eos_ids = {tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}
    timer = PhaseTimer()

    def reward(prompts: list[str], completion_ids: list[list[int]], **_) -> list[float]:
        # `trainer` is bound below, before training calls this: the policy is the PeftModel GRPOTrainer
        # builds. Prompts are tokenized as GRPOTrainer tokenizes plain-text prompts.
        rewards = neg_mean_nll(
            trainer.model,
            tokenizer(text=prompts)["input_ids"],
            completion_ids,
            eos_ids=eos_ids,
            pad_id=tokenizer.pad_token_id,
            group=w["n"],
            empty_margin=w["empty_completion_margin"],
            empty_reward=w["empty_completion_reward"],
        )
        timer.reward_means.append(sum(rewards) / len(rewards))
        return rewards

    batch = w["prompts_per_step"] * w["n"]
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-grpo-"),  # nothing is saved there (save_strategy "no")
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_iterations=1,
        num_generations=w["n"],
        max_completion_length=w["max_tokens"],
        temperature=w["temperature"],
        beta=w["beta"],
        learning_rate=w["learning_rate"],
        lr_scheduler_type="constant",  # grpo-learner's rate is constant
        loss_type="dapo",  # grpo-learner's token_mean: the batch's token losses over their count
        scale_rewards="group",
        max_steps=w["steps"],
        shuffle_dataset=False,  # the prompts come in grpo-learner's order
        seed=w["seed"],
        bf16=False,  # grpo-learner computes in float32 on CPU
        gradient_checkpointing=False,
        use_vllm=False,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = GRPOTrainer(
        model=base,
        reward_funcs=reward,
        args=config,
        train_dataset=Dataset.from_dict({"prompt": w["prompts"]}),
        processing_class=tokenizer,
        peft_config=LoraConfig(
            r=w["lora_r"],
            lora_alpha=w["lora_alpha"],
            lora_dropout=0.0,
            target_modules=ALL_LINEAR,
            task_type="CAUSAL_LM",
        ),
        callbacks=[timer],
    )
    trainer._generate = timer.timed(trainer._generate, "generate")
    trainer._calculate_rewards = timer.timed(trainer._calculate_rewards, "reward")
    trainer._generate_and_score_completions = timer.timed(trainer._generate_and_score_completions, "prepare")
    trainer.compute_loss = timer.timed(trainer.compute_loss, "loss_forward")
    trainer.accelerator.backward = timer.timed(trainer.accelerator.backward, "backward")
    trainer.train()
    args.result.write_text(json.dumps({"trl_version": version("trl"), "steps": timer.steps}))


if __name__ == "__main__":
    main()
