"""Experiment trackers (`--report-to`): where a run's metrics and samples go besides metrics.jsonl.

A tracker takes what `RunLog` already computed, nothing more: scalars by name per step, and a few
sample completions as text: TensorBoard, and Trackio (TRL's recommended local tracker). Another
(W&B) is one more class with the same three methods and one more `if` in `open_trackers`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from shared.errors import ConfigError
from shared.schemas import run_name


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
    if "trackio" in report_to:
        trackers.append(TrackioTracker(output_dir, done=done))
    return trackers


def check_installed(report_to: list[str]) -> None:
    """Raise ConfigError if a tracker `report_to` names is not installed: a run stops before it loads
    a model, not after."""
    if "tensorboard" in report_to:
        _summary_writer()
    if "trackio" in report_to:
        _trackio()


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


class TrackioTracker:
    """Trackio's local database (in TRACKIO_DIR, by default ~/.cache/huggingface/trackio; `trackio
    show --project grpo-lora` opens its dashboard): project "grpo-lora", a run named after
    output_dir, a scalar per metric and each step's samples as a table under "samples". A resumed
    run goes on in the same Trackio run; Trackio keeps what the killed run logged past the
    checkpoint (it has no purge), so those steps appear twice."""

    PROJECT = "grpo-lora"

    def __init__(self, output_dir: Path, *, done: int = 0) -> None:
        self._trackio = _trackio()
        self._trackio.init(
            project=self.PROJECT,
            name=run_name(output_dir),
            resume="allow" if done else "never",
            embed=False,
            auto_log_cpu=False,
            auto_log_gpu=False,
        )

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        """All of a step's scalars in one entry."""
        self._trackio.log(dict(scalars), step=step)

    def log_samples(self, step: int, samples: list[TextSample]) -> None:
        """A table with a row per sample: prompt, completion, reward."""
        rows = [[s.prompt, s.completion, s.reward] for s in samples]
        self._trackio.log(
            {"samples": self._trackio.Table(columns=["prompt", "completion", "reward"], data=rows)}, step=step
        )

    def close(self) -> None:
        """Finish the run (Trackio writes its database as it goes)."""
        self._trackio.finish()


def _trackio():
    try:
        import trackio
    except ImportError as e:
        raise ConfigError(
            f"--report-to trackio needs the trackio package ({e}): pip install 'grpo-lora[trackio]'"
        ) from e
    return trackio


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
