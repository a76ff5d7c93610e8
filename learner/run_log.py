"""What a run leaves behind and shows: metrics.jsonl, a progress bar, sample completions."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm


class RunLog:
    """Appends one JSON object per step to `metrics.jsonl` and drives the progress bar."""

    def __init__(self, output_dir: Path, steps: int, *, sample_every: int) -> None:
        output_dir.mkdir(parents=True, exist_ok=True)
        self.path = output_dir / "metrics.jsonl"
        self._file = self.path.open("a", buffering=1)  # line-buffered: a crash loses no finished step
        self._bar = tqdm(total=steps, desc="grpo", unit="step", dynamic_ncols=True)
        self._sample_every = sample_every

    def step(self, metrics: dict[str, Any], sample: tuple[str, str, float] | None) -> None:
        """Record one step's metrics; print `(prompt, completion, reward)` every `sample_every`."""
        row = {"time": time.time(), **{k: _finite(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._bar.update(1)
        self._bar.set_postfix(
            reward=f"{metrics['reward_mean']:.3f}",
            kl=f"{metrics['kl']:.4f}",
            gap=f"{metrics['sampler_gap']:.3f}",
            v=metrics["policy_version"],
        )
        step = metrics["step"]
        if sample and self._sample_every and step % self._sample_every == 0:
            prompt, completion, reward = sample
            self._bar.write(f"[step {step}] {prompt!r} -> {completion!r}  reward={reward:.4f}")

    def note(self, message: str) -> None:
        """A line above the progress bar."""
        self._bar.write(message)

    def close(self) -> None:
        """Finish the bar and the file."""
        self._bar.close()
        self._file.close()


def _finite(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value
