"""The GRPO loop: sample, score, normalize, update, save, hot-swap, in that order, every step
(with `overlap`, the next step's sampling runs during the rest: learner.overlap)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import torch
from peft import PeftModel

from learner import checkpoint, reward_funcs
from learner.distributed import Distributed
from learner.evaluate import Evaluation
from learner.learn import learn_from
from learner.model import eos_token_ids, save_next_version, version_dir
from learner.overlap import Rollouts
from learner.prompts import PromptEncoder, PromptSampler, Row
from learner.retention import prune_versions
from learner.rollout_client import RolloutClient
from learner.run_log import RunLog, StepFigures
from learner.server_link import ServerLink, logprob_canary
from shared.config import LearnerConfig


def run(
    cfg: LearnerConfig,
    rows: list[Row],
    policy: PeftModel,
    tokenizer,
    clients: Sequence[RolloutClient],
    *,
    eval_rows: Sequence[Row] = (),
    ranks: Distributed = Distributed(),
) -> Path | None:
    """Train `policy` on `rows` up to step `cfg.steps` (from a checkpoint's next step when resuming),
    sampling from the rollout servers of `clients` (one, or replicas of one model), evaluating on
    `eval_rows` every `cfg.eval_steps`; returns the adapter version served last (None: the base
    model).

    Under torchrun every rank runs this, each sampling and scoring its shard of every step's
    prompts, and takes the whole step's update (learn_from). Rank 0 alone saves and publishes each
    version (the others then follow it: _serve), writes metrics, samples and checkpoints (RunLog,
    checkpoint) and evaluates; its metrics are the whole step's (StepFigures.gather).
    """
    optimizer = torch.optim.AdamW(
        [p for p in policy.parameters() if p.requires_grad], lr=cfg.learning_rate, weight_decay=cfg.weight_decay
    )
    prompts = PromptSampler(rows, cfg.prompts_per_step, cfg.seed)  # the same batches on every rank
    encode = PromptEncoder(tokenizer, cfg, eos_ids=eos_token_ids(policy.generation_config, tokenizer))
    reward_fns = reward_funcs.load(cfg)  # learner.cli checked them before the model loaded
    evaluation = Evaluation(cfg, list(eval_rows), encode, reward_fns, policy, tokenizer.decode)
    canary = partial(logprob_canary, policy=policy, prompt_ids=encode.prompt(rows[0]), cfg=cfg, pad_id=encode.pad_id)
    server = ServerLink(clients, cfg, canary)  # survives server restarts; wakes the servers on exit
    start = checkpoint.restore(cfg, policy, optimizer, prompts, ranks)  # step 0, or a checkpoint's step
    saved = start.adapter  # None: a fresh LoRA is a no-op, so step 1 samples the base
    log = RunLog(cfg, done=start.step, ranks=ranks)  # writes on rank 0 only
    rollouts = Rollouts(server, prompts, encode, cfg, ranks)  # this rank's share, one step ahead with overlap
    try:
        _sample_in_flight(start, rollouts, cfg, server, ranks)  # overlap: the step in flight at the checkpoint
        if saved:
            _serve(saved, start.version, server, ranks)
        if start.step == 0:
            evaluation.after_step(0, server, log)  # the base model, before any update
        for step in range(start.step + 1, cfg.steps + 1):
            t0 = time.perf_counter()
            sampled = rollouts.take(step)
            batch, prompt_ids_P, rollout = sampled.rows, sampled.prompt_ids_P, sampled.rollout
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
                reward_fns=reward_fns,
                rows_P=batch,
                decode=tokenizer.decode,
                step=step,
                ranks=ranks,
            )
            t2 = time.perf_counter()
            if learned.stats.skipped:  # on every rank alike
                log.note(f"[step {step}] non-finite loss or gradient: update skipped, version {server.version} kept")
            else:
                saved = _save_and_serve(policy, cfg, server, ranks)
            answers = [getattr(row, "answer", None) for row in batch]
            server.post_scores(rollout.rollout_id, learned.sample_scores(step, answers), step)  # this rank's rollout
            scored, updated, swapped = learned.score_s, t2 - t1 - learned.score_s, time.perf_counter() - t2
            times = {"generate": t1 - t0, "score": scored, "update": updated, "swap": swapped}
            lag = {"staleness": sampled.staleness, "stale_dropped": sampled.stale_dropped}
            whole = StepFigures.of(rollout, learned, **lag).gather(ranks)  # collectives: on every rank
            log.step(step, server.version, rollout, learned, times, prompts=[row.prompt for row in batch], whole=whole)
            evaluation.after_step(step, server, log)
            state = checkpoint.TrainState(step, server.version, saved, rollouts.ahead_version)
            checkpoint.save_if_due(cfg, state, policy, optimizer, rollouts, ranks)
    finally:
        rollouts.close()
        server.close()
        log.close()
    return saved


def _save_and_serve(policy: PeftModel, cfg: LearnerConfig, server: ServerLink, ranks: Distributed) -> Path:
    """Save `policy`'s adapter as the next version under the run's adapters (rank 0 alone writes
    it), serve it from now on (_serve), and delete the versions no one needs any more
    (learner.retention); returns its directory, on every rank."""
    adapter_root = cfg.output_dir / "adapters"
    version, adapter_dir = save_next_version(policy, adapter_root, ranks)
    _serve(adapter_dir, version, server, ranks)
    if ranks.is_main:
        checkpointed = checkpoint.served_versions(cfg.output_dir)
        prune_versions(adapter_root, went_live=server.went_live, checkpointed=checkpointed, keep=cfg.keep_adapters)
    return adapter_dir


def _sample_in_flight(
    start: checkpoint.TrainState, rollouts: Rollouts, cfg: LearnerConfig, server: ServerLink, ranks: Distributed
) -> None:
    """Resuming with overlap: the run that wrote the checkpoint had step start.step + 1 in flight,
    pinned to the version before the checkpoint's (start.sampled_version). Serve that version and
    sample the step from it again, as that run did, so the resumed run trains on the same samples;
    the checkpoint's version goes live next, as it did then. Nothing without one in flight."""
    if start.sampled_version is None or start.step >= cfg.steps:
        return
    if start.sampled_version:  # 0: the base, which rollouts sample while no version is served
        _serve(version_dir(cfg.output_dir / "adapters", start.sampled_version), start.sampled_version, server, ranks)
    rollouts.sample_ahead(start.step + 1)
    ranks.barrier()  # every rank's share sampled before the next publish retires that version


def _serve(adapter_dir: Path, version: int, server: ServerLink, ranks: Distributed) -> None:
    """Make `adapter_dir` the version `version` every rank's rollouts sample from: rank 0 publishes
    it to every replica, and once it has (a barrier), the other ranks follow it without loading it
    (the ranks share the filesystem the adapters are on)."""
    if ranks.is_main:
        server.publish(adapter_dir, version)
    ranks.barrier()
    if not ranks.is_main:
        server.follow(adapter_dir, version)
