"""The learner CLI under `torchrun --nproc_per_node=2` (gloo, 127.0.0.1) against two real rollout
replicas (real vLLM on CPU: the session's, conftest.replica_servers) sharing the run's adapter
directory: every rank samples its shard of each step from both replicas at the version rank 0
published, rank 0 alone writes, and a run resumed from rank 0's checkpoint redoes a step as it was."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
import yaml
from safetensors.torch import load_file

from learner.local_server import descendants, free_port
from learner.rollout_client import RolloutClient
from shared.adapter_hash import adapter_sha256
from tests.servers import ReplicaServers

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN_TIMEOUT_S = 600
STEPS = 3
EVAL_PROMPTS = 4  # --eval-fraction 0.125 of examples/unsupervised.jsonl's 32 rows
# One torch thread per rank (2 cores, 2 ranks, 2 idle servers); gloo on the loopback interface.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "ROLLOUT_API_KEY": "", "TQDM_DISABLE": "1"}


def torchrun_learner(model_dir: Path, out: Path, urls: list[str], *extra: str) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node=2 -m learner.cli ...` to its end; on a timeout, every process of
    it is killed by pid (the ranks, then torchrun) and the test fails with its output."""
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"),
        *("--master_addr=127.0.0.1", f"--master_port={free_port()}"),
        *("-m", "learner.cli", "--model", str(model_dir), "--data", "examples/unsupervised.jsonl"),
        *("--output-dir", str(out), "--server-url", *urls),
        *("--prompts-per-step", "2", "--sampling-n", "4", "--sampling-max-tokens", "6", "--sampling-seed", "0"),
        *("--sample-every", "0", "--save-steps", "2", "--eval-fraction", "0.125", "--eval-steps", "3", *extra),
    ]
    proc = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=TORCHRUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        for pid in descendants(proc.pid) | {proc.pid}:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish in {TORCHRUN_TIMEOUT_S} s:\n{output[-6000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, output)


def test_two_ranks_train_on_two_replicas_only_rank_0_writes_and_a_resume_redoes_a_step(
    tiny_model_dir: Path, tmp_path: Path, replica_servers: ReplicaServers
) -> None:
    out = tmp_path / "run"
    out.mkdir()
    # Both replicas read the adapters rank 0 writes (a shared filesystem): the run's adapter
    # directory is their adapter root, which other tests' adapters share (under other names).
    (out / "adapters").symlink_to(replica_servers.adapter_root, target_is_directory=True)
    urls = replica_servers.urls()
    earlier = {url: {r["rollout_id"] for r in samples(url)} for url in urls}  # other tests' rollouts

    started = time.monotonic()
    run = torchrun_learner(tiny_model_dir, out, urls, "--steps", str(STEPS))
    print(f"torchrun, 2 ranks, {STEPS} steps: {time.monotonic() - started:.0f} s")
    assert run.returncode == 0, run.stdout[-6000:]
    check_the_first_run(out, urls, earlier)
    step_3 = load_file(str(out / "adapters" / "v000003" / "adapter_model.safetensors"))

    # Resumed from step 2's checkpoint on both ranks: step 3 again, then step 4.
    started = time.monotonic()
    resumed = torchrun_learner(tiny_model_dir, out, urls, "--steps", str(STEPS + 1), "--resume", "auto")
    print(f"torchrun, 2 ranks, resumed for 2 steps: {time.monotonic() - started:.0f} s")
    assert resumed.returncode == 0, resumed.stdout[-6000:]
    assert served_cards(urls) == {url: (4, adapter_sha256(out / "adapters" / "v000004")) for url in urls}

    # Step 3 redone as it was (every rank restored the same state), and each step written once.
    redone = load_file(str(out / "adapters" / "v000003" / "adapter_model.safetensors"))
    torch.testing.assert_close(redone, step_3, rtol=0, atol=1e-6)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(row["step"], "reward_mean" in row) for row in rows] == [
        (0, False),  # evaluation of the base
        (1, True),
        (2, True),
        (3, True),  # redone
        (3, False),  # evaluation, redone
        (4, True),
    ]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000004"]


def check_the_first_run(out: Path, urls: list[str], earlier: dict[str, set[str]]) -> None:
    """What the 3-step run left in `out` and on the replicas at `urls` (whose sample logs held the
    rollouts `earlier` before it)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    training = [row for row in rows if "reward_mean" in row]
    # Each step once (rank 0 alone writes), each publishing the next version; evaluations at 0 and 3.
    assert [(row["step"], row["policy_version"]) for row in training] == [(1, 1), (2, 2), (3, 3)]
    assert [row["step"] for row in rows if "eval/reward_mean" in row] == [0, 3]
    # The run's versions, and no temp dir (.v000001-*) left; other tests' adapters are named otherwise.
    ours = sorted(p.name for p in (out / "adapters").iterdir() if p.name.startswith(("v", ".")))
    assert ours == ["v000001", "v000002", "v000003"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002"]
    assert yaml.safe_load((out / "config.yaml").read_text())["sleep_server"] is False  # ranks never sleep servers
    # Rank 0's samples files hold its own shard: the step's first prompt.
    for step in range(1, STEPS + 1):
        (record,) = [json.loads(line) for line in (out / "samples" / f"step_{step:06d}.jsonl").read_text().splitlines()]
        assert len(record["results"]) == 1

    # Both replicas served rollouts. Every training rollout is one rank's one prompt, pinned to the
    # version live at its step (rank 1's too: it followed rank 0's publishes); evaluations are rank
    # 0's alone (EVAL_PROMPTS rollouts each, at versions 0 and 3).
    records = {url: [r for r in samples(url) if r["rollout_id"] not in earlier[url]] for url in urls}
    assert all(records.values()), {url: len(r) for url, r in records.items()}
    every = [record for server_records in records.values() for record in server_records]
    scored = [record for record in every if record["scores"] is not None]
    assert sorted(r["policy_version"] for r in scored) == [0, 0, 1, 1, 2, 2]
    assert sorted(r["policy_version"] for r in every if r["scores"] is None) == [0] * EVAL_PROMPTS + [3] * EVAL_PROMPTS
    # Rank 0's metrics are the whole step's: each reward mean is that of both ranks' posted scores.
    for row in training:
        rewards = [x for r in scored if r["scores"]["step"] == row["step"] for x in r["scores"]["rewards"][0]]
        assert len(rewards) == 8  # 2 prompts x 4 completions
        assert row["reward_mean"] == pytest.approx(sum(rewards) / len(rewards), rel=1e-5)

    # Both replicas serve the last version under the learner's number and hash.
    assert served_cards(urls) == {url: (3, adapter_sha256(out / "adapters" / "v000003")) for url in urls}


def samples(url: str) -> list[dict]:
    """Every rollout the replica at `url` still records, newest first."""
    return httpx.get(f"{url}/v1/samples", params={"limit": 1000}, timeout=30).json()["samples"]


def served_cards(urls: list[str]) -> dict[str, tuple[int, str]]:
    """The version and sha256 each replica serves as 'policy'."""
    cards = {}
    for url in urls:
        client = RolloutClient(url)
        try:
            card = client.served("policy")
        finally:
            client.close()
        cards[url] = (card.version, card.sha256)
    return cards
