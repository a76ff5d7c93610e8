"""Checkpoints on their own (no server): atomic writes, rotation, which one resume picks, what it restores."""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from learner import checkpoint, run_identity
from learner.checkpoint import TrainState
from learner.cli import main, parse_config
from learner.data import load_data
from learner.distributed import Distributed
from learner.model import load_adapter_weights, load_policy, save_adapter, with_model_sampling_defaults
from learner.prompts import PromptSampler, UnsupervisedRow
from shared.config import LearnerConfig
from shared.errors import ConfigError
from tests.peft_adapters import random_adapter

ROWS = [UnsupervisedRow(text=f"row {i}") for i in range(5)]


def trained(tiny_model_dir: Path, cfg: LearnerConfig, steps: int = 2):
    """A policy, its AdamW and a sampler after `steps` made-up updates, so none is in its initial state."""
    policy, _ = load_policy(str(tiny_model_dir), cfg)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    prompts = PromptSampler(ROWS, 2, seed=0)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer.step()
        prompts.next_batch()  # 2 of the 5 rows: the sampler is mid-epoch after one step
    return policy, optimizer, prompts


def lora_state(policy) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in policy.named_parameters() if "lora_" in n}


def test_restore_puts_back_weights_optimizer_rngs_and_data_position(tiny_model_dir: Path, tmp_path: Path) -> None:
    cfg = LearnerConfig(output_dir=tmp_path, save_steps=1, resume="auto")
    policy, optimizer, prompts = trained(tiny_model_dir, cfg)
    adapter = save_adapter(policy, tmp_path / "adapters", 2)
    checkpoint.save(tmp_path / "checkpoints", TrainState(2, 2, adapter), policy, optimizer, prompts)
    torch_rng, python_rng = torch.get_rng_state(), random.getstate()
    # What the run would do next, had it not stopped:
    want_batches = [prompts.next_batch() for _ in range(4)]  # crosses an epoch boundary (reshuffle)
    want_weights, want_optimizer = lora_state(policy), optimizer.state_dict()
    want_draw = torch.rand(3)

    torch.manual_seed(123)  # anything else: restore must set both back
    random.seed(123)
    policy2, optimizer2, prompts2 = trained(tiny_model_dir, cfg, steps=0)
    state = checkpoint.restore(cfg, policy2, optimizer2, prompts2)

    assert state == TrainState(2, 2, tmp_path / "adapters" / "v000002")
    got = lora_state(policy2)
    assert all(torch.equal(got[n], w) for n, w in want_weights.items())
    for p, s in want_optimizer["state"].items():
        got_s = optimizer2.state_dict()["state"][p]
        assert all(torch.equal(got_s[k], v) for k, v in s.items())
    assert [prompts2.next_batch() for _ in range(4)] == want_batches
    assert random.getstate() == python_rng
    assert torch.equal(torch.get_rng_state(), torch_rng) and torch.equal(torch.rand(3), want_draw)


def test_resuming_rolls_the_output_dir_back_to_the_checkpoint(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A run killed after step 4 resumed from step 2's checkpoint: steps 3 and 4 are redone, so their
    metrics rows, adapter versions and checkpoints go; the next adapter is version 3 again."""
    cfg = LearnerConfig(output_dir=tmp_path, save_steps=1, save_total_limit=None, resume="auto")
    policy, optimizer, prompts = trained(tiny_model_dir, cfg)
    for step in (1, 2):
        adapter = save_adapter(policy, tmp_path / "adapters", step)
        checkpoint.save(tmp_path / "checkpoints", TrainState(step, step, adapter), policy, optimizer, prompts)
    for version in (3, 4):
        save_adapter(policy, tmp_path / "adapters", version)
    metrics = tmp_path / "metrics.jsonl"
    # steps 1-4, then half a row: the kill came mid-write
    metrics.write_text("".join(json.dumps({"step": s, "x": s}) + "\n" for s in (1, 2, 3, 4)) + '{"step": 5, "x"')
    (tmp_path / "samples").mkdir()
    for step in (1, 2, 3, 4):
        (tmp_path / "samples" / f"step_{step:06d}.jsonl").write_text("{}\n")
    newer = tmp_path / "checkpoints" / "step-000003"
    newer.mkdir()
    (newer / checkpoint.STATE_FILE).write_text("{}")
    # temp dirs a kill left behind: of a checkpoint write, an adapter save and a delete
    for leftover in (
        "checkpoints/.step-000004-abc/adapter",
        "adapters/.v000005-def",
        "adapters/.removing-v000001-x/v1",
    ):
        (tmp_path / leftover).mkdir(parents=True)

    from_step_2 = cfg.model_copy(update={"resume": str(tmp_path / "checkpoints" / "step-000002")})
    state = checkpoint.restore(from_step_2, *trained(tiny_model_dir, cfg, steps=0))

    assert state.step == 2 and state.version == 2
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2]
    assert sorted(p.name for p in (tmp_path / "adapters").iterdir()) == ["v000001", "v000002"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000001", "step-000002"]
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step_000001.jsonl", "step_000002.jsonl"]


def test_a_checkpoint_from_another_output_dir_brings_its_adapter(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The server loads adapters from output_dir/adapters only: resuming elsewhere writes the checkpoint's there."""
    first, second = tmp_path / "first", tmp_path / "second"
    policy, optimizer, prompts = trained(tiny_model_dir, LearnerConfig(output_dir=first))
    adapter = save_adapter(policy, first / "adapters", 5)
    path = checkpoint.save(first / "checkpoints", TrainState(7, 5, adapter), policy, optimizer, prompts)

    cfg = LearnerConfig(output_dir=second, resume=str(path))
    state = checkpoint.restore(cfg, *trained(tiny_model_dir, cfg, steps=0))

    assert state.adapter == second / "adapters" / "v000005"
    got, want = load_file(state.adapter / "adapter_model.safetensors"), load_file(adapter / "adapter_model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_an_overlap_checkpoint_names_the_version_its_next_step_was_sampled_from(
    tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """After step 2, step 3 was in flight from version 1 (learner.overlap): the checkpoint names it
    (adapter retention keeps it), and a resume serves it first if it is still there."""
    cfg = LearnerConfig(output_dir=tmp_path, overlap=True, sleep_server=False, resume="auto")
    policy, optimizer, prompts = trained(tiny_model_dir, cfg)
    for version in (1, 2):
        adapter = save_adapter(policy, tmp_path / "adapters", version)
    path = checkpoint.save(tmp_path / "checkpoints", TrainState(2, 2, adapter, 1), policy, optimizer, prompts)
    saved = json.loads((path / checkpoint.STATE_FILE).read_text())
    assert (saved["overlap_sampled_version"], saved["overlap_sampled_adapter"]) == (1, "v000001")
    assert checkpoint.served_versions(tmp_path) == {1, 2}

    assert checkpoint.restore(cfg, *trained(tiny_model_dir, cfg, steps=0)) == TrainState(2, 2, adapter, 1)
    shutil.rmtree(tmp_path / "adapters" / "v000001")  # deleted by hand: step 3 can only sample version 2
    with caplog.at_level(logging.WARNING, logger="learner"):
        assert checkpoint.restore(cfg, *trained(tiny_model_dir, cfg, steps=0)).sampled_version is None
    assert "v000001 is gone: step 3 is sampled from version 2, not from version 1" in caplog.text


def test_save_is_atomic_a_failed_write_leaves_nothing_resume_would_pick(tiny_model_dir: Path, tmp_path: Path) -> None:
    policy, optimizer, prompts = trained(tiny_model_dir, LearnerConfig(output_dir=tmp_path))
    root = tmp_path / "checkpoints"
    checkpoint.save(root, TrainState(1, 1, None), policy, optimizer, prompts)

    class Exploding(PromptSampler):
        def state_dict(self) -> dict:
            raise OSError("disk full")  # after the adapter and optimizer files are written

    exploding = Exploding(ROWS, 2, seed=0)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(root, TrainState(2, 2, None), policy, optimizer, exploding)
    assert sorted(p.name for p in root.iterdir()) == ["step-000001"]  # no step-2, no temp dir left
    # A kill -9 mid-write runs no cleanup: it leaves a hidden temp dir, and resume ignores it.
    (root / ".step-000002-abc" / "adapter").mkdir(parents=True)
    assert checkpoint.latest(root) == root / "step-000001"
    with pytest.raises(OSError):  # never over an existing checkpoint
        checkpoint.save(root, TrainState(1, 1, None), policy, optimizer, prompts)


def test_latest_is_the_highest_complete_step(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    assert checkpoint.latest(root) is None  # no directory at all
    for name, complete in [("step-9", True), ("step-000010", True), ("step-000011", False), (".step-000012-x", True)]:
        (root / name).mkdir(parents=True)
        if complete:
            (root / name / checkpoint.STATE_FILE).write_text("{}")
    (root / "step-000013.txt").write_text("")  # not a directory name of ours
    assert checkpoint.latest(root) == root / "step-000010"  # by number, not by name: 10 > 9


def test_only_the_last_k_checkpoints_are_kept_and_only_every_n_steps(
    tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = LearnerConfig(output_dir=tmp_path, save_steps=2, save_total_limit=2)
    policy, optimizer, prompts = trained(tiny_model_dir, cfg)
    with caplog.at_level(logging.INFO, logger="learner"):
        written = [checkpoint.save_if_due(cfg, TrainState(s, s, None), policy, optimizer, prompts) for s in range(1, 8)]
    # One line a checkpoint, saying where (a user sees it beside the progress bar).
    assert [r.getMessage() for r in caplog.records if "checkpoint written" in r.getMessage()] == [
        f"checkpoint written: {tmp_path / 'checkpoints' / name} (--resume auto goes on from here)"
        for name in ("step-000002", "step-000004", "step-000006")
    ]
    assert [p.name if p else None for p in written] == [
        None,
        "step-000002",
        None,
        "step-000004",
        None,
        "step-000006",
        None,
    ]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000004", "step-000006"]
    never = cfg.model_copy(update={"save_steps": 0, "output_dir": tmp_path / "never"})
    assert checkpoint.save_if_due(never, TrainState(10, 10, None), policy, optimizer, prompts) is None


def test_resume_auto_with_no_checkpoint_starts_fresh_and_a_fresh_start_over_checkpoints_is_refused(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    cfg = LearnerConfig(output_dir=tmp_path, resume="auto")
    assert checkpoint.restore(cfg, *trained(tiny_model_dir, cfg, steps=0)) == TrainState(0, 0, None)
    policy, optimizer, prompts = trained(tiny_model_dir, cfg)
    checkpoint.save(tmp_path / "checkpoints", TrainState(3, 0, None), policy, optimizer, prompts)
    with pytest.raises(ConfigError, match=r"holds checkpoints of an earlier run \(newest step-000003\).*--resume auto"):
        checkpoint.resume_point(cfg.model_copy(update={"resume": None}))
    with pytest.raises(ConfigError, match=r"nowhere: not a checkpoint directory"):
        checkpoint.resume_point(cfg.model_copy(update={"resume": str(tmp_path / "nowhere")}))


def test_init_adapter_loads_a_matching_adapter_and_serves_it_first(tiny_model_dir: Path, tmp_path: Path) -> None:
    init = random_adapter(tiny_model_dir, tmp_path / "init", seed=1)  # r=8, alpha=16, all linear: the defaults
    cfg = LearnerConfig(output_dir=tmp_path / "run", init_adapter=init)
    policy, _ = load_policy(str(tiny_model_dir), cfg)
    want = load_file(init / "adapter_model.safetensors")
    got = lora_state(policy)
    assert all(torch.equal(got[n.replace(".weight", ".default.weight")], w) for n, w in want.items())

    state = checkpoint.restore(cfg, policy, torch.optim.AdamW(policy.parameters()), PromptSampler(ROWS, 2, 0))
    assert state == TrainState(0, 1, tmp_path / "run" / "adapters" / "v000001")  # step 1 samples from it


@pytest.mark.parametrize(
    ("adapter", "message"),
    [
        # rank 4 against lora.r=8: all 28 tensors (2 layers x 7 modules x A, B) have another shape
        ({"rank": 4}, r"lora.r=8.*28 differ, e.g. .*lora_A.weight is \(4, \d+\) in the adapter and \(8, \d+\)"),
        # the same shapes, but another scaling alpha / r: no tensor shows it
        ({"rank": 8, "alpha": 32}, r"the adapter's lora_alpha is 32, the LoRA config's 16"),
    ],
)
def test_init_adapter_of_another_shape_fails_naming_the_path(
    tiny_model_dir: Path, tmp_path: Path, adapter: dict, message: str
) -> None:
    init = random_adapter(tiny_model_dir, tmp_path / "init", seed=1, rank=adapter["rank"])
    if "alpha" in adapter:
        config = json.loads((init / "adapter_config.json").read_text())
        (init / "adapter_config.json").write_text(json.dumps(config | {"lora_alpha": adapter["alpha"]}))
    with pytest.raises(ConfigError, match=rf"^{init}: .*{message}"):
        load_policy(str(tiny_model_dir), LearnerConfig(output_dir=tmp_path, init_adapter=init))


def test_init_adapter_with_other_target_modules_fails(tiny_model_dir: Path, tmp_path: Path) -> None:
    init = random_adapter(tiny_model_dir, tmp_path / "init", seed=1)
    policy, _ = load_policy(str(tiny_model_dir), LearnerConfig(lora={"target_modules": ["q_proj", "v_proj"]}))
    # the adapter's 28 tensors, of which the policy has the 8 of q_proj and v_proj (2 layers x 2 x A, B)
    with pytest.raises(ConfigError, match=r"target_modules=\['q_proj', 'v_proj'\]\): 20 differ, e.g. .*absent in"):
        load_adapter_weights(policy, init)
    with pytest.raises(ConfigError, match=r"not a peft adapter directory"):
        load_adapter_weights(policy, tmp_path)


def not_a_model(tmp_path: Path) -> Path:
    """A directory that passes --model's early check (a config.json) and would fail to load."""
    (tmp_path / "model").mkdir(exist_ok=True)
    (tmp_path / "model" / "config.json").write_text("{}")
    return tmp_path / "model"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ([], r"checkpoints holds checkpoints of an earlier run \(newest step-000003\): pass --resume auto"),
        (["--resume", "{out}/checkpoints/step-000009"], r"step-000009: not a checkpoint directory"),
    ],
)
def test_the_cli_refuses_a_bad_resume_before_loading_a_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    (tmp_path / "checkpoints" / "step-000003").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-000003" / checkpoint.STATE_FILE).write_text("{}")
    argv = ["--model", str(not_a_model(tmp_path)), "--output-dir", str(tmp_path)]  # reaching the model fails otherwise
    with pytest.raises(SystemExit) as e:
        main(argv + [f.format(out=tmp_path) for f in flags])
    assert e.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_under_torchrun_only_rank_0_writes_checkpoints(tmp_path: Path) -> None:
    cfg = LearnerConfig(output_dir=tmp_path, save_steps=1)
    rank_1 = Distributed(rank=1, world_size=2)
    # Rank 1 holds the same state as rank 0 (nothing of it is read): it writes nothing.
    assert checkpoint.save_if_due(cfg, TrainState(1, 1, None), None, None, None, rank_1) is None
    assert not (tmp_path / "checkpoints").exists()


def test_one_run_per_output_dir_a_fresh_start_over_an_earlier_runs_outputs_is_refused(tmp_path: Path) -> None:
    """A 5-step run with the default --save-steps 10 leaves no checkpoint: rerunning into its
    directory appended steps 1-5 twice to metrics.jsonl and numbered adapters on from v000006."""
    (tmp_path / "adapters" / "v000001").mkdir(parents=True)  # a server's adapter root may hold others'
    (tmp_path / "samples").mkdir()  # an empty folder is nothing
    assert checkpoint.check_one_run(LearnerConfig(output_dir=tmp_path)) is None
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    (tmp_path / "samples" / "step_000001.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError, match=r"holds an earlier run's metrics.jsonl, samples/ \(and no checkpoint"):
        checkpoint.check_one_run(LearnerConfig(output_dir=tmp_path))


def test_resume_auto_without_a_checkpoint_starts_over_only_the_same_run(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Killed before its first checkpoint (compose restarts it with --resume auto), a run starts over;
    outputs of a run with other settings are refused instead."""
    cfg = LearnerConfig(output_dir=tmp_path, resume="auto", steps=7)
    (tmp_path / checkpoint.CONFIG_FILE).write_text(yaml.safe_dump(checkpoint.run_settings(cfg)))
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    (tmp_path / "adapters" / "v000001").mkdir(parents=True)
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "step_000001.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError, match=r"--resume auto: no checkpoint .* of a run with other settings"):
        checkpoint.check_one_run(cfg.model_copy(update={"steps": 8}))
    assert checkpoint.restore(cfg, *trained(tiny_model_dir, cfg, steps=0)) == TrainState(0, 0, None)
    assert checkpoint.earlier_run(tmp_path) == []  # what it wrote before it died is gone
    assert (tmp_path / checkpoint.CONFIG_FILE).is_file()


def test_the_cli_refuses_a_fresh_start_into_a_used_output_dir_before_loading_a_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(SystemExit) as e:
        main(["--model", str(not_a_model(tmp_path)), "--output-dir", str(tmp_path)])
    assert e.value.code == 2
    assert "holds an earlier run's metrics.jsonl" in capsys.readouterr().err


def test_a_rerun_refused_leaves_the_first_runs_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The fresh start refused, config.yaml is still the first run's (it tells whose outputs these are)."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    (tmp_path / checkpoint.CONFIG_FILE).write_text("steps: 3\n")
    with pytest.raises(SystemExit):
        main(["--model", str(not_a_model(tmp_path)), "--output-dir", str(tmp_path), "--steps", "9"])
    assert (tmp_path / checkpoint.CONFIG_FILE).read_text() == "steps: 3\n"


def test_the_cli_refuses_a_resume_with_another_learning_rate_or_data_before_loading_a_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(5)))
    model = str(not_a_model(tmp_path))
    out = tmp_path / "out"
    argv = ["--model", model, "--data", str(data), "--output-dir", str(out)]
    # The first run, as `train` records it, with a checkpoint after step 2.
    first = with_model_sampling_defaults(parse_config(argv), model)
    step = out / "checkpoints" / "step-000002"
    step.mkdir(parents=True)
    (step / checkpoint.STATE_FILE).write_text("{}")
    (step / checkpoint.IDENTITY_FILE).write_text(json.dumps(run_identity.of(first, load_data(first), model)))
    (out / checkpoint.CONFIG_FILE).write_text(yaml.safe_dump(checkpoint.run_settings(first)))
    config_before = (out / checkpoint.CONFIG_FILE).read_text()

    with pytest.raises(SystemExit) as e:
        main([*argv, "--resume", "auto", "--learning-rate", "1e-3"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "step-000002 is a checkpoint of a run with other settings" in err
    assert "learning_rate: 0.0001 -> 0.001." in err and "--allow-config-change" in err

    data.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(4)))
    with pytest.raises(SystemExit) as e:
        main([*argv, "--resume", "auto"])
    assert e.value.code == 2
    assert f"data file {data}: rows 5 -> 4, sha256 " in capsys.readouterr().err
    assert (out / checkpoint.CONFIG_FILE).read_text() == config_before  # not the refused run's settings


def test_a_resume_allowed_a_new_learning_rate_trains_with_it(tiny_model_dir: Path, tmp_path: Path) -> None:
    """AdamW's saved state carries the learning rate it was saved with (trained: 1e-2): the run's wins."""
    cfg = LearnerConfig(output_dir=tmp_path, resume="auto", learning_rate=3e-4, allow_config_change=True)
    policy, optimizer, prompts = trained(tiny_model_dir, cfg)
    checkpoint.save(tmp_path / "checkpoints", TrainState(2, 0, None), policy, optimizer, prompts)
    policy2, optimizer2, prompts2 = trained(tiny_model_dir, cfg, steps=0)
    checkpoint.restore(cfg, policy2, optimizer2, prompts2)
    assert [group["lr"] for group in optimizer2.param_groups] == [3e-4]
    assert optimizer2.state_dict()["state"].keys() == optimizer.state_dict()["state"].keys()  # moments restored


def test_checkpoints_and_adapter_versions_are_on_disk_before_their_names(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 21: checkpoints were renamed into place unsynced; a power loss could leave a complete-
    looking step-N with empty files. Every file and directory is fsynced before the rename, and the
    parent after it."""
    policy, optimizer, prompts = trained(tiny_model_dir, LearnerConfig(output_dir=tmp_path))
    events: list[tuple[str, str]] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(src, dst) -> None:
        events.append(("rename", str(src)))
        real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    root = tmp_path / "checkpoints"
    final = checkpoint.save(root, TrainState(1, 1, None), policy, optimizer, prompts)
    adapter = save_adapter(policy, tmp_path / "adapters", 1)
    for done, parent in ((final, root), (adapter, tmp_path / "adapters")):
        (moved,) = [i for i, (kind, path) in enumerate(events) if kind == "rename" and Path(path).parent == parent]
        temp = Path(events[moved][1])
        synced_before = {Path(path) for kind, path in events[:moved] if kind == "fsync"}
        written = {temp / p.relative_to(done) for p in done.rglob("*")} | {temp}
        assert written <= synced_before, sorted(map(str, written - synced_before))
        assert ("fsync", str(parent)) in events[moved + 1 :]
