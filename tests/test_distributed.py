"""Data-parallel learner: a process alone without torchrun, shards of whole prompts, and two gloo
ranks under torchrun ending with the LoRA weights one process gets from the whole batch."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import get_peft_model_state_dict
from safetensors.torch import load_file

from learner.distributed import Distributed
from learner.local_server import descendants, free_port
from learner.model import load_policy
from shared.errors import ConfigError
from tests import ddp_worker

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN_TIMEOUT_S = 300
PERCENTILES = ("sampler_gap_p50", "sampler_gap_p99", "is_weight_p50", "is_weight_p99")


def test_without_torchrun_the_process_is_the_only_rank_and_every_collective_is_the_identity() -> None:
    ranks = Distributed.from_env({})
    assert (ranks.rank, ranks.world_size, ranks.local_rank, ranks.is_main) == (0, 1, 0, True)
    with ranks:
        assert not torch.distributed.is_initialized()
        values = torch.tensor([1.5, -2.0])
        assert ranks.sum(values) is values
        assert ranks.gather(values) is values
        assert ranks.sum_ints([3, 4]) == [3, 4]
        assert ranks.sum_floats([0.1, float("inf")]) == [0.1, float("inf")]
        assert ranks.main_ints([3, 4]) == [3, 4]
        assert ranks.shard(["a", "b", "c"]) == ["a", "b", "c"]
        ranks.barrier()


def test_torchrun_environment_names_the_rank() -> None:
    ranks = Distributed.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_PORT": "29500"})
    assert (ranks.rank, ranks.world_size, ranks.local_rank, ranks.is_main) == (3, 4, 1, False)


def test_shards_are_contiguous_equal_slices_in_rank_order() -> None:
    prompts = ["p0", "p1", "p2", "p3", "p4", "p5"]
    shards = [Distributed(rank=r, world_size=3).shard(prompts) for r in range(3)]
    assert shards == [["p0", "p1"], ["p2", "p3"], ["p4", "p5"]]  # concatenated: the step's order
    assert [Distributed(rank=r, world_size=6).shard(prompts) for r in range(6)] == [[p] for p in prompts]


@pytest.mark.parametrize("prompts_per_step, world_size", [(5, 2), (2, 4), (7, 3)])
def test_prompts_that_do_not_split_evenly_over_the_ranks_are_refused(prompts_per_step: int, world_size: int) -> None:
    ranks = Distributed(rank=0, world_size=world_size)
    message = f"prompts_per_step={prompts_per_step} does not split over {world_size} ranks"
    with pytest.raises(ConfigError, match=message):
        ranks.check_divides(prompts_per_step)
    with pytest.raises(ConfigError, match=message):
        ranks.shard(list(range(prompts_per_step)))


@pytest.fixture(scope="module")
def torchrun_out(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What rank 0 of `torchrun --nproc_per_node=2 -m tests.ddp_worker` wrote (gloo, on 127.0.0.1)."""
    out = tmp_path_factory.mktemp("ddp")
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"),
        *("--master_addr=127.0.0.1", f"--master_port={free_port()}"),
        *("-m", "tests.ddp_worker", str(tiny_model_dir), str(out)),
    ]
    # gloo binds the loopback interface rather than whatever the hostname resolves to.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=TORCHRUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        for pid in descendants(proc.pid) | {proc.pid}:  # the ranks, then torchrun: by pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish in {TORCHRUN_TIMEOUT_S} s:\n{output[-4000:]}")
    assert proc.returncode == 0, output[-4000:]
    return out


@pytest.mark.integration
def test_only_rank_0_writes(torchrun_out: Path) -> None:
    assert sorted(p.name for p in torchrun_out.iterdir()) == sorted(ddp_worker.SCENARIOS)
    for scenario in ddp_worker.SCENARIOS:
        assert sorted(p.name for p in (torchrun_out / scenario).iterdir()) == ["stats.json", "v000001"]
        stats = json.loads((torchrun_out / scenario / "stats.json").read_text())
        assert (stats["rank"], stats["ranks"]) == (0, 2)


@pytest.mark.integration
@pytest.mark.parametrize("scenario", ddp_worker.SCENARIOS)
def test_two_ranks_take_the_steps_one_process_takes_on_the_whole_batch(
    torchrun_out: Path, tiny_model_dir: Path, scenario: str
) -> None:
    # Each rank has 2 of the 4 groups, in micro-batches of 4 and 2 sequences; one process has
    # all 12 in three micro-batches of 4. Only the whole step's normaliser and the summed
    # gradient give the same SGD steps, and the same clipping in the NaN scenario (the norm is
    # the summed gradient's).
    policy, stats_alone = ddp_worker.train(tiny_model_dir, scenario, Distributed())
    expected = get_peft_model_state_dict(policy)
    saved = load_file(str(torchrun_out / scenario / "v000001" / "adapter_model.safetensors"))
    assert saved.keys() == expected.keys()
    for name, weights in expected.items():
        torch.testing.assert_close(saved[name], weights, rtol=0, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    initial = get_peft_model_state_dict(load_policy(str(tiny_model_dir), ddp_worker.config(scenario))[0])
    assert max((expected[n] - initial[n]).abs().max().item() for n in expected) > 1e-4  # it did learn

    stats = json.loads((torchrun_out / scenario / "stats.json").read_text())
    assert stats["spread_between_ranks"] == 0.0  # rank 1 ended with rank 0's weights, bit for bit
    skipped = [True, False] if scenario == "nan_on_rank_1" else [False, False]
    if scenario == "nan_on_rank_1":
        assert stats_alone[1].grad_norm > ddp_worker.config(scenario).max_grad_norm  # the step was clipped
    assert [s.skipped for s in stats_alone] == [s["skipped"] for s in stats["steps"]] == skipped
    for alone, ranked in zip(stats_alone, stats["steps"], strict=True):
        if alone.skipped:
            # Rank 0's shard was finite, yet it skipped with rank 1. (The other figures of a skipped
            # step cover the micro-batches done before the NaN, which depend on the split.)
            assert torch.isnan(torch.tensor([ranked["loss"], ranked["grad_norm"], alone.loss, alone.grad_norm])).all()
            continue
        # The figures are the whole batch's on rank 0 too, not its shard's.
        assert ranked["clamped_tokens"] == alone.clamped_tokens
        for name in ("loss", "kl", "clip_fraction", "is_weight", "sampler_gap", "grad_norm", *PERCENTILES):
            torch.testing.assert_close(ranked[name], getattr(alone, name), rtol=1e-5, atol=1e-7)
