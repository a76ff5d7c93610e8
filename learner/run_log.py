"""What a run leaves behind and shows: metrics.jsonl, each step's samples, a progress bar, trackers.

metrics.jsonl holds one JSON object per line, written whole and flushed at its newline (`tail -f`
shows each step as it ends): a training row per step ({"time", "step", "policy_version",
"reward_mean", ...}), and an evaluation row per `RunLog.eval` ({"time", "step", "eval/<name>", ...},
no other keys) after the training row of the step it evaluated. Both kinds carry "step", so a
resumed run drops the rows of the steps it redoes, of both kinds (`drop_steps_after`).

Under torchrun only rank 0's RunLog writes. Its training rows are the whole step's (StepFigures
gathered over the ranks); its samples files, tracker samples and printed samples are of rank 0's
own shard of each step: the step's first prompts_per_step / N prompts and their completions.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from learner.advantages import zero_variance_groups
from learner.distributed import Distributed
from learner.learn import Learned
from learner.trackers import TextSample, open_trackers
from shared.config import LearnerConfig
from shared.schemas import Completion, Prompt, RolloutResponse, SampleRecord, run_name


@dataclass(frozen=True)
class StepFigures:
    """What a step's metrics row is computed from, per completion of a step (or of a rank's shard
    of one): prompt-major, as the rollout's results."""

    rewards_P_G: Tensor
    components_P_G: dict[str, Tensor]
    """Learned.components_P_G: each reward function's own rewards, by name."""
    completion_lens_N: Tensor
    """Each completion's token count (its end-of-sequence token included), int64."""
    clipped_N: Tensor
    """1 where a completion stopped at max_tokens, else 0; int64."""
    staleness: int = 0
    """Versions between the one that sampled the completions and the policy they trained
    (learner.overlap; 0: on-policy)."""
    stale_dropped: int = 0
    """Completions asked for the step ahead and dropped, their version replaced in flight (learner.overlap)."""

    @classmethod
    def of(
        cls, rollout: RolloutResponse, learned: Learned, *, staleness: int = 0, stale_dropped: int = 0
    ) -> StepFigures:
        """The figures of `rollout`'s completions and `learned`'s scores of them."""
        completions_N = [c for result in rollout.results for c in result.completions]
        return cls(
            learned.rewards_P_G,
            learned.components_P_G,
            torch.tensor([len(c.token_ids) for c in completions_N], dtype=torch.int64),
            torch.tensor([c.finish_reason == "length" for c in completions_N], dtype=torch.int64),
            staleness,
            stale_dropped,
        )

    def gather(self, ranks: Distributed) -> StepFigures:
        """The whole step's figures from every rank's shard, in rank order (the step's prompt
        order); these figures themselves when alone. Collectives: every rank calls it at the same
        point of a step (never rank 0 alone, or the ranks wait on each other forever)."""
        G = self.rewards_P_G.shape[1]
        lag_R_2 = ranks.gather(torch.tensor([self.staleness, self.stale_dropped], dtype=torch.int64)).view(-1, 2)
        return StepFigures(
            ranks.gather(self.rewards_P_G.flatten()).view(-1, G),
            # the same names in the same order on every rank: reward_funcs.load(cfg)'s
            {name: ranks.gather(values_P_G.flatten()).view(-1, G) for name, values_P_G in self.components_P_G.items()},
            ranks.gather(self.completion_lens_N),
            ranks.gather(self.clipped_N),
            int(lag_R_2[:, 0].max()),
            int(lag_R_2[:, 1].sum()),
        )


FLAT_STEPS = 3
"""Steps running in which every group's rewards are equal before RunLog warns (once)."""


def finish(completion: Completion) -> str:
    """How a completion ended, for people: 'stop "="' (a stop string, left out of its text), 'end of
    sequence', 'max_tokens', ... (an empty text then says why)."""
    if completion.finish_reason == "length":
        return "max_tokens"
    if completion.finish_reason == "stop":
        if isinstance(completion.stop_reason, str):
            return f"stop {json.dumps(completion.stop_reason)}"
        return "end of sequence" if completion.stop_reason is None else f"stop token {completion.stop_reason}"
    return completion.finish_reason or "unfinished"


class RunLog:
    """Appends each step's row to `metrics.jsonl`, writes its rollout and scores to
    `samples/step_NNNNNN.jsonl`, drives the progress bar and feeds the trackers (`report_to`).

    Under torchrun (`ranks`) only rank 0's writes; on the other ranks it opens nothing and every
    method does nothing (`writes` is False), so every rank can make the same calls."""

    def __init__(self, cfg: LearnerConfig, *, done: int = 0, ranks: Distributed = Distributed()) -> None:
        self.writes = ranks.is_main
        """Whether this log writes anything: False on the ranks other than 0."""
        if not self.writes:
            return
        cfg.output_dir.mkdir(parents=True, exist_ok=True)
        self.path = cfg.output_dir / "metrics.jsonl"
        self.samples_dir = cfg.output_dir / "samples"
        self.samples_dir.mkdir(exist_ok=True)
        self._trackers = open_trackers(cfg.report_to, cfg.output_dir, done=done)
        self._file = self.path.open("a", buffering=1)  # line-buffered: a crash loses no finished step
        self._bar = tqdm(total=cfg.steps, initial=done, desc="grpo", unit="step", dynamic_ncols=True)
        self._sample_every = cfg.sample_every
        self._tracker_samples = cfg.tracker_samples
        self._rewards = ", ".join(cfg.reward_funcs) if cfg.reward_funcs else f"the {cfg.mode} mode's reward"
        self._flat_steps = 0  # consecutive steps in which every group's rewards were equal
        self._run = run_name(cfg.output_dir)

    def step(
        self,
        step: int,
        version: int,
        rollout: RolloutResponse,
        learned: Learned,
        seconds: dict[str, float],
        *,
        prompts: list[Prompt],
        whole: StepFigures,
    ) -> None:
        """Record step `step`, after which the server serves `version`. `seconds`: the step's phases,
        which add up to its wall time. `prompts`: the batch's prompts as the data gave them (the
        rollout holds only their token ids), for the samples file and for people. Every
        `sample_every` steps, print prompt 0's first completion.

        `whole`: the whole step's figures, for the metrics row: StepFigures.of(rollout, learned),
        gathered over the ranks under torchrun (StepFigures.gather). The samples file and the
        samples shown are of `rollout`, `learned` and `prompts`: this rank's shard."""
        if not self.writes:
            return
        texts_P = [p if isinstance(p, str) else p[-1].content for p in prompts]  # a conversation's last turn
        completions_P_G = [r.completions for r in rollout.results]
        rewards_P_G = learned.rewards_P_G
        assert rewards_P_G.shape == (len(completions_P_G), len(completions_P_G[0])), rewards_P_G.shape
        reward_mean, reward_std = nan_mean_std(whole.rewards_P_G)
        completions = whole.completion_lens_N.numel()
        metrics = {
            "step": step,
            "policy_version": version,
            # unscorable completions (NaN: no reward function applied) are left out, as in TRL
            "reward_mean": reward_mean,
            "reward_std": reward_std,
            **reward_function_stats(whole.components_P_G),
            "zero_variance_groups": zero_variance_groups(whole.rewards_P_G),
            "completion_len": whole.completion_lens_N.sum().item() / completions,
            # truncated at max_tokens: a high ratio means the budget, not the policy, ends completions
            "clipped_ratio": whole.clipped_N.sum().item() / completions,
            # one-step-off overlap (learner.overlap): versions behind the policy; stale samples dropped
            "staleness": whole.staleness,
            "stale_dropped": whole.stale_dropped,
            "completions_per_s": completions / sum(seconds.values()),
            **vars(learned.stats),
            **{f"time_{k}": v for k, v in seconds.items()},
        }
        # the samples file first: a reader that sees step N's row finds its samples
        results = [r.model_copy(update={"prompt": p}) for r, p in zip(rollout.results, prompts, strict=True)]
        record = SampleRecord(
            **{**rollout.model_dump(), "results": results},
            run=self._run,
            kind="training",
            scores=learned.sample_scores(step),
        )
        self._write_samples(step, record)
        self._write_row(metrics)
        self._warn_if_flat(step, metrics["zero_variance_groups"], whole.rewards_P_G.shape[0])
        shown = [
            TextSample(texts_P[p], completions_P_G[p][0].text, rewards_P_G[p, 0].item())
            for p in range(min(self._tracker_samples, len(completions_P_G)))
        ]
        for tracker in self._trackers:
            tracker.log_scalars(step, {k: float(v) for k, v in metrics.items() if k != "step"})
            if shown:
                tracker.log_samples(step, shown)
        self._bar.update(1)
        self._bar.set_postfix(
            {
                "reward": f"{metrics['reward_mean']:.3f}",
                "kl": f"{metrics['kl']:.4f}",
                "gap": f"{metrics['sampler_gap']:.3f}",
                "v": metrics["policy_version"],
                "compl/s": f"{metrics['completions_per_s']:.1f}",
            }
        )
        if self._sample_every and step % self._sample_every == 0:
            completion, reward = completions_P_G[0][0], rewards_P_G[0, 0].item()
            ending = finish(completion)
            self._bar.write(f"[step {step}] {texts_P[0]!r} -> {completion.text!r} ({ending})  reward={reward:.4f}")

    def _warn_if_flat(self, step: int, flat_groups: int, groups: int) -> None:
        """Warn once when every group had equal rewards FLAT_STEPS steps running: no advantage, so
        nothing is learned (e.g. a format reward the model never meets)."""
        self._flat_steps = self._flat_steps + 1 if flat_groups == groups else 0
        if self._flat_steps == FLAT_STEPS:
            self.note(
                f"[step {step}] warning: for {FLAT_STEPS} steps every group's completions got equal rewards "
                f"({self._rewards}): advantages are 0 and nothing is learned. The rewards do not tell this "
                "model's completions apart: a reward the model never (or always) meets, too few completions "
                "per prompt (sampling.n), or too low a temperature (zero_variance_groups in metrics.jsonl)"
            )

    def eval(self, step: int, metrics: dict[str, float]) -> None:
        """Record an evaluation of the policy after step `step`: `metrics` (name -> value) as keys
        "eval/<name>" of a row of their own (see the module docstring), and to the trackers."""
        if not self.writes:
            return
        scalars = {f"eval/{name}": value for name, value in metrics.items()}
        self._write_row({"step": step, **scalars})
        for tracker in self._trackers:
            tracker.log_scalars(step, scalars)

    def note(self, message: str) -> None:
        """A line above the progress bar."""
        if self.writes:
            self._bar.write(message)

    def close(self) -> None:
        """Finish the bar, the file and the trackers."""
        if not self.writes:
            return
        self._bar.close()
        self._file.close()
        for tracker in self._trackers:
            tracker.close()

    def _write_row(self, metrics: dict[str, Any]) -> None:
        row = {"time": time.time(), **{k: _finite(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")

    def _write_samples(self, step: int, record: SampleRecord) -> None:
        """One line, GET /v1/samples's record, written atomically: a resumed run rewrites the files
        of the steps it redoes, and a reader never sees half of one."""
        path = self.samples_dir / f"step_{step:06d}.jsonl"
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(record.model_dump_json() + "\n")
        os.replace(tmp, path)


def reward_function_stats(components_P_G: dict[str, Tensor]) -> dict[str, float]:
    """ "rewards/<name>/mean" and "rewards/<name>/std" (population) of each reward function over the
    completions it applied to (its non-NaN values); NaN for one that applied to none."""
    stats = {}
    for name, values_P_G in components_P_G.items():
        stats[f"rewards/{name}/mean"], stats[f"rewards/{name}/std"] = nan_mean_std(values_P_G)
    return stats


def drop_samples_after(samples_dir: Path, step: int) -> None:
    """Remove the samples files (`step_NNNNNN.jsonl`, and a write's leftover temp file) of the steps
    after `step`: a resumed run redoes them, and may stop before it reaches them again."""
    for path in samples_dir.glob("*step_*.jsonl*") if samples_dir.is_dir() else []:
        digits = path.name.split("step_", 1)[1][:6]
        if digits.isdigit() and int(digits) > step:
            path.unlink()


def last_step(path: Path) -> int:
    """The highest step metrics.jsonl `path` has a row for (0: none, or no file)."""
    if not path.is_file():
        return 0
    rows = [json.loads(line) for line in path.read_text().splitlines(keepends=True) if line.endswith("\n")]
    return max((row["step"] for row in rows), default=0)


def drop_steps_after(path: Path, step: int) -> None:
    """Rewrite metrics.jsonl `path` (if any) without its rows of steps after `step`, atomically: a
    run resumed from step `step`'s checkpoint redoes those steps and logs them again."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    # a run killed mid-write may leave a last line without its newline: not a row, drop it
    kept = [line for line in lines if line.endswith("\n") and json.loads(line)["step"] <= step]
    if len(kept) == len(lines):
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


def nan_mean_std(values: Tensor) -> tuple[float, float]:
    """Mean and population std of the non-NaN values (NaN, NaN when there are none: torch's mean
    and std of nothing warn as well as answer NaN)."""
    kept = values[~values.isnan()]
    return (kept.mean().item(), kept.std(correction=0).item()) if kept.numel() else (math.nan, math.nan)


def _finite(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value
