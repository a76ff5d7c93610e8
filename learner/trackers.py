"""Experiment trackers (`--report-to`): where a run's metrics and samples go besides metrics.jsonl.

A tracker takes what `RunLog` already computed, nothing more: scalars by name per step, and a few
sample completions as text. TensorBoard is the one there is; another (W&B, Trackio) is one more
class with the same three methods and one more `if` in `open_trackers`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from shared.errors import ConfigError


@dataclass(frozen=True)
class TextSample:
    """One completion as a person reads it."""

    prompt: str
    completion: str
    reward: float


class Tracker(Protocol):
    """What `RunLog` calls on each tracker; a step's values arrive once, after the step."""

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        """Record `scalars` (name -> value; NaN where a value is missing) at `step`."""
        ...

    def log_samples(self, step: int, samples: list[TextSample]) -> None:
        """Record some of `step`'s completions as text."""
        ...

    def close(self) -> None:
        """Write out whatever is buffered."""
        ...


def open_trackers(report_to: list[str], output_dir: Path, *, done: int = 0) -> list[Tracker]:
    """The trackers `report_to` names, writing under `output_dir`; `done`: the step a resumed run
    restarts after (what an earlier run logged past it is dropped, as from metrics.jsonl)."""
    trackers: list[Tracker] = []
    if "tensorboard" in report_to:
        trackers.append(TensorBoardTracker(output_dir / "tensorboard", done=done))
    return trackers


def check_installed(report_to: list[str]) -> None:
    """Raise ConfigError if a tracker `report_to` names is not installed: a run stops before it loads
    a model, not after."""
    if "tensorboard" in report_to:
        _summary_writer()


class TensorBoardTracker:
    """Event files under `log_dir` (`tensorboard --logdir <output_dir>/tensorboard`): a scalar per
    metric, and each step's samples as one markdown table under the tag "samples"."""

    def __init__(self, log_dir: Path, *, done: int = 0) -> None:
        # purge_step: TensorBoard hides the events an earlier run wrote at steps > done, which a
        # resumed run redoes (else its curves would zig-zag back over them)
        self._writer = _summary_writer()(log_dir=str(log_dir), purge_step=done + 1 if done else None)

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        """One scalar per name; flushed, so a running TensorBoard shows the step now, not in 2 minutes."""
        for name, value in scalars.items():
            self._writer.add_scalar(name, value, step)
        self._writer.flush()

    def log_samples(self, step: int, samples: list[TextSample]) -> None:
        """A table with a row per sample: prompt | completion | reward."""
        rows = [f"| {_cell(s.prompt)} | {_cell(s.completion)} | {s.reward:.4f} |" for s in samples]
        self._writer.add_text("samples", "\n".join(["| prompt | completion | reward |", "|---|---|---|", *rows]), step)
        self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        self._writer.close()


def _summary_writer() -> type:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ConfigError(
            f"--report-to tensorboard needs the tensorboard package ({e}): pip install 'grpo-lora[tensorboard]'"
        ) from e
    return SummaryWriter


def _cell(text: str) -> str:
    """`text` as a markdown table cell: quoted (JSON), so whitespace and newlines show and none ends
    the row, with the characters markdown would act on escaped."""
    return re.sub(r"([\\`*_\[\]<>|~])", r"\\\1", json.dumps(text, ensure_ascii=False))
