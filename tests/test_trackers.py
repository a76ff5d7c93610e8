"""--report-to: the TensorBoard tracker's event files, read back as TensorBoard reads them, and
Trackio's database, read back with sqlite."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from learner.cli import parse_config
from learner.run_log import RunLog
from learner.trackers import check_installed
from shared.config import LearnerConfig
from shared.errors import ConfigError
from tests.test_run_log import learned, log_step, rollout


def event_accumulator(log_dir: Path):
    """TensorBoard's own reader of `log_dir`'s event files, loaded (every event kept)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def test_report_to_is_a_flag_that_takes_only_known_trackers() -> None:
    assert parse_config([]).report_to == []
    assert parse_config(["--report-to", "tensorboard"]).report_to == ["tensorboard"]
    with pytest.raises(ConfigError, match="report_to"):
        parse_config(["--report-to", "wandb"])


def test_a_run_log_with_tensorboard_writes_scalars_and_samples_tensorboard_reads_back(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    cfg = LearnerConfig(output_dir=tmp_path, steps=3, sample_every=0, report_to=["tensorboard"], tracker_samples=1)
    log = RunLog(cfg)
    for step, reward in [(1, 0.0), (2, 0.5), (3, 1.0)]:
        log_step(
            log,
            step,
            step,
            rollout([["stop", "length"], ["stop", "stop"]]),
            learned([[reward, reward], [reward, reward]], {"format": [[1.0, 0.0], [1.0, float("nan")]]}),
            prompts=["12+7=", "line one\nline | two"],
        )
    log.eval(3, {"accuracy": 0.75})
    log.close()

    events = event_accumulator(tmp_path / "tensorboard")
    scalars = events.Tags()["scalars"]
    assert {"reward_mean", "completions_per_s", "clipped_ratio", "rewards/format/mean", "kl", "eval/accuracy"} <= set(
        scalars
    )
    assert [(e.step, e.value) for e in events.Scalars("reward_mean")] == [(1, 0.0), (2, 0.5), (3, 1.0)]
    assert [e.value for e in events.Scalars("clipped_ratio")] == [0.25] * 3  # 1 of 4 at max_tokens
    assert [(e.step, e.value) for e in events.Scalars("eval/accuracy")] == [(3, 0.75)]
    texts = events.Tensors("samples/text_summary")
    assert [t.step for t in texts] == [1, 2, 3]
    table = texts[-1].tensor_proto.string_val[0].decode()
    # tracker_samples=1: prompt 0's first completion only, quoted, with its reward
    assert table.splitlines()[2:] == ['| "12+7=" | "c00" | 1.0000 |']


def test_a_resumed_run_replaces_what_the_killed_run_logged_after_its_checkpoint(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    cfg = LearnerConfig(output_dir=tmp_path, steps=4, sample_every=0, report_to=["tensorboard"])
    killed = RunLog(cfg)
    for step in (1, 2, 3, 4):
        log_step(killed, step, step, rollout([["stop"]]), learned([[float(step)]]), prompts=["p"])
    killed.close()
    resumed = RunLog(cfg, done=2)  # from step 2's checkpoint: steps 3 and 4 are redone
    log_step(resumed, 3, 3, rollout([["stop"]]), learned([[30.0]]), prompts=["p"])
    resumed.close()
    events = event_accumulator(tmp_path / "tensorboard")
    assert [(e.step, e.value) for e in events.Scalars("reward_mean")] == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_a_sample_table_cell_cannot_end_its_row(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    cfg = LearnerConfig(output_dir=tmp_path, steps=1, sample_every=0, report_to=["tensorboard"])
    log = RunLog(cfg)
    log_step(log, 1, 1, rollout([["stop"], ["stop"]]), learned([[0.0], [1.0]]), prompts=["a", "x\n| *y*"])
    log.close()
    events = event_accumulator(tmp_path / "tensorboard")
    table = events.Tensors("samples/text_summary")[0].tensor_proto.string_val[0].decode()
    # the newline stays escaped inside the quotes; the pipe and the emphasis are escaped for markdown
    assert table.splitlines()[2:] == ['| "a" | "c00" | 0.0000 |', '| "x\\\\n\\| \\*y\\*" | "c10" | 1.0000 |']


def test_tensorboard_asked_for_but_not_installed_is_a_config_error_with_the_install_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # None in sys.modules makes `import` raise ImportError, as on a machine without the package
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    check_installed([])  # nothing asked for: nothing needed
    with pytest.raises(ConfigError, match=r"pip install 'grpo-lora\[tensorboard\]'"):
        check_installed(["tensorboard"])
    with pytest.raises(ConfigError, match="tensorboard"):
        RunLog(LearnerConfig(output_dir=tmp_path, report_to=["tensorboard"]))


TRACKIO_RUN = """
import sys
from pathlib import Path

from learner.run_log import RunLog
from shared.config import LearnerConfig
from tests.test_run_log import learned, log_step, rollout

cfg = LearnerConfig(output_dir=Path(sys.argv[1]), steps=2, sample_every=0, report_to=["trackio"], tracker_samples=1)
log = RunLog(cfg)
for step, reward in [(1, 0.0), (2, 0.5)]:
    stops = rollout([["stop", "stop"], ["stop", "stop"]])
    log_step(log, step, step, stops, learned([[reward, reward], [reward, reward]]), prompts=["12+7=", "1+1="])
log.close()
"""


def test_a_run_log_with_trackio_writes_scalars_and_samples_to_its_database(tmp_path: Path) -> None:
    """In a process of its own: Trackio reads TRACKIO_DIR (where its database goes) at import."""
    pytest.importorskip("trackio", reason="the trackio extra is not installed")
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio")}
    done = subprocess.run(
        [sys.executable, "-c", TRACKIO_RUN, str(tmp_path / "run")], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    with sqlite3.connect(tmp_path / "trackio" / "grpo-lora.db") as db:
        rows = [
            (run, step, json.loads(metrics))
            for run, step, metrics in db.execute("select run_name, step, metrics from metrics")
        ]
    scalars = [(step, m["reward_mean"]) for run, step, m in rows if "reward_mean" in m]
    assert scalars == [(1, 0.0), (2, 0.5)] and {run for run, _, _ in rows} == {"run"}
    (table,) = [m["samples"]["_value"] for _, step, m in rows if "samples" in m and step == 2]
    assert table == [{"prompt": "12+7=", "completion": table[0]["completion"], "reward": 0.5}]
