"""The GRPO loop: sample, score, normalize, update, save, hot-swap, in that order, every step."""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import torch
from peft import PeftModel

from learner import checkpoint, scoring
from learner.advantages import group_normalize
from learner.model import eos_token_ids, next_version, save_adapter
from learner.prompts import PromptEncoder, PromptSampler, Row
from learner.rollout_client import RolloutClient
from learner.run_log import RunLog
from learner.server_link import ServerLink, logprob_canary
from learner.update import policy_update
from shared.config import LearnerConfig


def run(cfg: LearnerConfig, rows: list[Row], policy: PeftModel, tokenizer, client: RolloutClient) -> Path | None:
    """Train `policy` up to step `cfg.steps` (from a checkpoint's next step when resuming); returns the
    adapter version served last (None: the base model)."""
    optimizer = torch.optim.AdamW(
        [p for p in policy.parameters() if p.requires_grad], lr=cfg.learning_rate, weight_decay=cfg.weight_decay
    )
    prompts = PromptSampler(rows, cfg.prompts_per_step, cfg.seed)
    encode = PromptEncoder(tokenizer, cfg, eos_ids=eos_token_ids(policy.generation_config, tokenizer))
    adapter_root = cfg.output_dir / "adapters"
    canary = partial(logprob_canary, policy=policy, prompt_ids=encode.prompt(rows[0]), cfg=cfg, pad_id=encode.pad_id)
    server = ServerLink(client, cfg, canary)  # survives server restarts; wakes the server on exit
    start = checkpoint.restore(cfg, policy, optimizer, prompts)  # step 0, or a checkpoint's step
    saved = start.adapter  # None: a fresh LoRA is a no-op, so step 1 samples the base
    log = RunLog(cfg.output_dir, cfg.steps, sample_every=cfg.sample_every, done=start.step)
    try:
        if saved:
            server.publish(saved, start.version)
        for step in range(start.step + 1, cfg.steps + 1):
            t0 = time.perf_counter()
            batch = prompts.next_batch()
            prompt_ids_P = [encode.prompt(row) for row in batch]
            rollout = server.rollout(encode.rollout_request(prompt_ids_P, server.adapter, step))
            server.sleep()  # the learner takes the GPU (with sleep_server)
            completions = [r.completions for r in rollout.results]
            t1 = time.perf_counter()
            text_ids_P_G = [[encode.strip_eos(c.token_ids) for c in group] for group in completions]
            rewards_P_G = scoring.score(
                policy, prompt_ids_P, text_ids_P_G, encode.answers(batch), cfg, pad_id=encode.pad_id
            )
            advantages_P_G = group_normalize(
                rewards_P_G, eps=cfg.advantage_eps, scale_by_std=cfg.scale_advantages_by_std
            )
            t2 = time.perf_counter()
            stats = policy_update(
                policy,
                optimizer,
                [prompt_ids_P[p] for p, group in enumerate(completions) for _ in group],
                [c.token_ids for group in completions for c in group],
                [c.logprobs for group in completions for c in group],
                advantages_P_G.flatten(),
                cfg,
                pad_id=encode.pad_id,
            )
            t3 = time.perf_counter()
            if stats.skipped:
                log.note(f"[step {step}] non-finite loss or gradient: update skipped, version {server.version} kept")
            else:
                version = next_version(adapter_root)
                saved = save_adapter(policy, adapter_root, version)
                server.publish(saved, version)
            server.post_scores(rollout.rollout_id, rewards_P_G, advantages_P_G, step)
            times = {"generate": t1 - t0, "score": t2 - t1, "update": t3 - t2, "swap": time.perf_counter() - t3}
            log.step(step, server.version, rewards_P_G, completions, stats, times, sample=(batch[0].prompt_text, 0))
            checkpoint.save_if_due(cfg, checkpoint.TrainState(step, server.version, saved), policy, optimizer, prompts)
    finally:
        server.close()
        log.close()
    return saved
