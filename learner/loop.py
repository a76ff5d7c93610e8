"""The GRPO loop: sample, score, normalize, update, save, hot-swap, in that order, every step."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from peft import PeftModel

from learner import scoring
from learner.advantages import group_normalize
from learner.model import eos_token_ids, next_version, save_adapter
from learner.prompts import PromptEncoder, PromptSampler, Row
from learner.rollout_client import RolloutClient
from learner.run_log import RunLog
from learner.update import policy_update
from shared.config import LearnerConfig
from shared.errors import StaleAdapterError
from shared.schemas import SampleScores


def run(cfg: LearnerConfig, rows: list[Row], policy: PeftModel, tokenizer, client: RolloutClient) -> Path | None:
    """Train `policy` for `cfg.steps` steps; returns the last adapter version saved (None if none was)."""
    optimizer = torch.optim.AdamW(
        [p for p in policy.parameters() if p.requires_grad], lr=cfg.learning_rate, weight_decay=cfg.weight_decay
    )
    prompts = PromptSampler(rows, cfg.prompts_per_step, cfg.seed)
    encode = PromptEncoder(tokenizer, cfg, eos_ids=eos_token_ids(policy.generation_config, tokenizer))
    adapter_root = cfg.output_dir / "adapters"
    log = RunLog(cfg.output_dir, cfg.steps, sample_every=cfg.sample_every)
    adapter, version, saved = None, 0, None  # step 1 samples the base: a fresh LoRA is a no-op
    try:
        for step in range(1, cfg.steps + 1):
            t0 = time.perf_counter()
            batch = prompts.next_batch()
            prompt_ids_P = [encode.prompt(row) for row in batch]
            if cfg.sleep_server:
                client.wake_up()
            rollout = client.generate(encode.rollout_request(prompt_ids_P, adapter, step), expected_version=version)
            if cfg.sleep_server:
                client.sleep(level=1)  # the learner takes the GPU
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
                log.note(f"[step {step}] non-finite loss or gradient: update skipped, version {version} kept")
            else:
                saved = save_adapter(policy, adapter_root, next_version(adapter_root))
                if cfg.sleep_server:
                    client.wake_up()
                adapter, version = cfg.adapter_name, client.load_adapter(cfg.adapter_name, saved.name).version
                if client.served_version(adapter) != version:
                    raise StaleAdapterError(f"the server does not serve {adapter!r} version {version} after loading it")
            client.post_scores(
                rollout.rollout_id,
                SampleScores(rewards=rewards_P_G.tolist(), advantages=advantages_P_G.tolist(), step=step),
            )
            times = {"generate": t1 - t0, "score": t2 - t1, "update": t3 - t2, "swap": time.perf_counter() - t3}
            log.step(step, version, rewards_P_G, completions, stats, times, sample=(batch[0].prompt_text, 0))
    finally:
        log.close()
    return saved
