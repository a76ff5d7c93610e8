"""The GRPO loop: sample, score, normalize, update, save, hot-swap, in that order, every step."""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import torch
from peft import PeftModel

from learner import checkpoint
from learner.learn import learn_from
from learner.model import eos_token_ids, next_version, save_adapter
from learner.prompts import PromptEncoder, PromptSampler, Row
from learner.rollout_client import RolloutClient
from learner.run_log import RunLog
from learner.server_link import ServerLink, logprob_canary
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
            learned = learn_from(
                policy,
                optimizer,
                prompt_ids_P,
                completions,
                text_ids_P_G,
                encode.answers(batch),
                cfg,
                pad_id=encode.pad_id,
            )
            t2 = time.perf_counter()
            if learned.stats.skipped:
                log.note(f"[step {step}] non-finite loss or gradient: update skipped, version {server.version} kept")
            else:
                version = next_version(adapter_root)
                saved = save_adapter(policy, adapter_root, version)
                server.publish(saved, version)
            server.post_scores(rollout.rollout_id, learned.rewards_P_G, learned.advantages_P_G, step)
            scored, updated, swapped = learned.score_s, t2 - t1 - learned.score_s, time.perf_counter() - t2
            times = {"generate": t1 - t0, "score": scored, "update": updated, "swap": swapped}
            log.step(
                step,
                server.version,
                learned.rewards_P_G,
                completions,
                learned.stats,
                times,
                sample=(batch[0].prompt_text, 0),
            )
            checkpoint.save_if_due(cfg, checkpoint.TrainState(step, server.version, saved), policy, optimizer, prompts)
    finally:
        server.close()
        log.close()
    return saved
