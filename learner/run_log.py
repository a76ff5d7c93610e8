"""What a run leaves behind and shows: metrics.jsonl, a progress bar, sample completions."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from torch import Tensor
from tqdm import tqdm

from learner.advantages import zero_variance_groups
from learner.update import UpdateStats
from shared.schemas import Completion


class RunLog:
    """Appends one JSON object per step to `metrics.jsonl` and drives the progress bar."""

    def __init__(self, output_dir: Path, steps: int, *, sample_every: int, done: int = 0) -> None:
        output_dir.mkdir(parents=True, exist_ok=True)
        self.path = output_dir / "metrics.jsonl"
        self._file = self.path.open("a", buffering=1)  # line-buffered: a crash loses no finished step
        self._bar = tqdm(total=steps, initial=done, desc="grpo", unit="step", dynamic_ncols=True)
        self._sample_every = sample_every

    def step(
        self,
        step: int,
        version: int,
        rewards_P_G: Tensor,
        completions_P_G: list[list[Completion]],
        stats: UpdateStats,
        seconds: dict[str, float],
        *,
        sample: tuple[str, int],
    ) -> None:
        """Record one step; every `sample_every` steps print prompt `sample = (text, index)`'s first completion."""
        metrics = {
            "step": step,
            "policy_version": version,
            "reward_mean": rewards_P_G.mean().item(),
            "reward_std": rewards_P_G.std(correction=0).item(),
            "zero_variance_groups": zero_variance_groups(rewards_P_G),
            "completion_len": sum(len(c.token_ids) for g in completions_P_G for c in g) / rewards_P_G.numel(),
            **vars(stats),
            **{f"time_{k}": v for k, v in seconds.items()},
        }
        row = {"time": time.time(), **{k: _finite(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._bar.update(1)
        self._bar.set_postfix(
            reward=f"{metrics['reward_mean']:.3f}",
            kl=f"{metrics['kl']:.4f}",
            gap=f"{metrics['sampler_gap']:.3f}",
            v=metrics["policy_version"],
        )
        if self._sample_every and step % self._sample_every == 0:
            prompt, p = sample
            completion, reward = completions_P_G[p][0].text, rewards_P_G[p, 0].item()
            self._bar.write(f"[step {step}] {prompt!r} -> {completion!r}  reward={reward:.4f}")

    def note(self, message: str) -> None:
        """A line above the progress bar."""
        self._bar.write(message)

    def close(self) -> None:
        """Finish the bar and the file."""
        self._bar.close()
        self._file.close()


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


def _finite(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value
