"""A learner killed with SIGKILL and resumed with --resume auto ends where an uninterrupted run ends.

Real processes: `python -m learner.cli`, each with its own local rollout server (real vLLM) on
127.0.0.1. With `sampling.seed` set, the rollouts of step s depend only on s and on the policy
served, so the resumed run must serve the checkpoint's adapter before its first rollout.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.servers import descendants, is_alive

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STEPS = 4
RUN_TIMEOUT_S = 600  # one learner: model load, vLLM start-up (~30 s on 2 cores) and 4 tiny steps
ENV = {**os.environ, "ROLLOUT_API_KEY": "", "TQDM_DISABLE": "1"}


def learner_cmd(model_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    args = ["--model", str(model_dir), "--data", "examples/unsupervised.jsonl", "--output-dir", str(output_dir)]
    args += ["--steps", str(STEPS), "--prompts-per-step", "2", "--sampling-n", "4", "--sampling-max-tokens", "6"]
    args += ["--sampling-seed", "0", "--learning-rate", "1e-2", "--sample-every", "0"]
    args += ["--save-steps", "1", "--save-total-limit", "2", *extra]
    args += ["--keep-adapters", str(STEPS)]  # every version kept, to compare them all (retention: test_retention.py)
    return [sys.executable, "-m", "learner.cli", *args]


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the learner only: its local server and that server's vLLM processes must follow by
    themselves (parent-death signals). Fails, after killing them by pid, if any outlives it by 30 s."""
    pids = [proc.pid, *descendants(proc.pid)]  # before the kill: orphans leave the learner's tree
    proc.kill()
    proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    while any(is_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    survivors = [pid for pid in pids if is_alive(pid)]
    for pid in survivors:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not survivors, f"processes outlived the learner killed with SIGKILL: {survivors}"


@contextmanager
def learner(cmd: list[str], log_path: Path) -> Iterator[subprocess.Popen]:
    """The learner CLI as a process in its own session; whatever it left running is killed on exit."""
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=ENV, start_new_session=True)
    try:
        yield proc
    finally:
        kill_tree(proc)


def run_to_end(cmd: list[str], log_path: Path) -> str:
    with learner(cmd, log_path) as proc:
        returncode = proc.wait(timeout=RUN_TIMEOUT_S)
    assert returncode == 0, log_path.read_text()[-3000:]
    return log_path.read_text()


def adapter_weights(output_dir: Path, version: int) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "adapters" / f"v{version:06d}" / "adapter_model.safetensors")


def metrics(output_dir: Path) -> list[dict]:
    """metrics.jsonl rows without their timings and rates (wall-clock, never equal between runs)."""
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.startswith("time") and k != "completions_per_s"} for row in rows]


def test_a_run_killed_after_a_checkpoint_and_resumed_ends_like_an_uninterrupted_one(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    # The uninterrupted run goes on beside the killed one: their vLLM start-ups (~40 s, mostly
    # single-threaded imports) overlap on 2 cores. Both are float32 on CPU: running them together
    # changes none of their figures.
    with learner(learner_cmd(tiny_model_dir, whole), tmp_path / "whole.log") as whole_run:
        with learner(learner_cmd(tiny_model_dir, killed), tmp_path / "killed.log") as proc:
            # Kill in step 3, after its adapter is saved and served: the checkpoint of step 2 is the
            # newest, and there is a version 3 (and maybe a metrics row 3) that the resumed run redoes.
            deadline = time.monotonic() + RUN_TIMEOUT_S
            while not (killed / "adapters" / "v000003").exists():
                assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "no adapter version 3 in time"
                time.sleep(0.05)
            kill_tree(proc)
        whole_returncode = whole_run.wait(timeout=RUN_TIMEOUT_S)
    assert whole_returncode == 0, (tmp_path / "whole.log").read_text()[-3000:]
    assert (killed / "checkpoints" / "step-000002" / "trainer_state.json").is_file()
    assert not (killed / "checkpoints" / f"step-{STEPS:06d}").exists(), "the kill came after the last step"

    log = run_to_end(learner_cmd(tiny_model_dir, killed, "--resume", "auto"), tmp_path / "resumed.log")
    resumed_from = int(re.search(r"resuming from \S+: step (\d+) done", log).group(1))
    assert resumed_from in (2, 3)  # 3 when step 3's checkpoint was written before the kill landed

    # The same weights at every version: 1-2 (or 3) from the killed run, the rest from the resumed one.
    for version in range(1, STEPS + 1):
        want, got = adapter_weights(whole, version), adapter_weights(killed, version)
        assert got.keys() == want.keys()
        diff = max((got[k] - want[k]).abs().max().item() for k in want)
        assert diff <= 1e-6, f"version {version}: max |diff| {diff}"
    assert sorted(p.name for p in (killed / "adapters").iterdir()) == [f"v{v:06d}" for v in range(1, STEPS + 1)]
    # One row per step, none repeated or missing, with the same figures: the rows of steps after
    # the checkpoint that the killed run logged were dropped and redone.
    assert [row["step"] for row in metrics(killed)] == list(range(1, STEPS + 1))
    assert [row["policy_version"] for row in metrics(killed)] == list(range(1, STEPS + 1))
    assert metrics(killed) == metrics(whole)

    # The checkpoints: the last two (save_total_limit 2), the newest holding the final state.
    for run in (whole, killed):
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000003", "step-000004"]
    newest = whole / "checkpoints" / "step-000004"
    state = json.loads((newest / "trainer_state.json").read_text())
    assert (state["step"], state["policy_version"], state["adapter"]) == (STEPS, STEPS, "v000004")
    assert len(state["prompts"]["order"]) == 32 - STEPS * 2  # 32 rows, 2 per step: one epoch under way
    saved = load_file(newest / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(saved[k], w) for k, w in adapter_weights(whole, STEPS).items())
    optimizer = torch.load(newest / "optimizer.pt", weights_only=True)
    assert len(optimizer["state"]) == len(saved)  # AdamW moments for every LoRA matrix
    assert all(s["step"].item() == STEPS for s in optimizer["state"].values())
    assert torch.load(newest / "rng.pt", weights_only=True)["cpu"].dtype == torch.uint8
