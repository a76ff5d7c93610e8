"""What a resume compares: the checkpoint's settings, data and model against the resuming run's."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from safetensors.torch import save_file

from learner import checkpoint, run_identity
from learner.data import load_data
from shared.config import LearnerConfig
from shared.errors import ConfigError
from tests.fakes import BASE_WEIGHTS, write_base_config
from tests.test_checkpoint import trained


def write_rows(path: Path, n: int, word: str = "row") -> Path:
    path.write_text("".join(json.dumps({"text": f"{word} {i}"}) + "\n" for i in range(n)))
    return path


def identity_of(cfg: LearnerConfig, model_dir: Path) -> dict:
    return run_identity.of(cfg, load_data(cfg), str(model_dir))


@pytest.fixture
def run(tmp_path: Path) -> tuple[LearnerConfig, Path]:
    """A run's settings over 5 data rows, and a model directory."""
    cfg = LearnerConfig(data=write_rows(tmp_path / "data.jsonl", 5), output_dir=tmp_path / "out")
    return cfg, write_base_config(tmp_path / "model")


def test_the_same_run_differs_in_nothing(run) -> None:
    cfg, model = run
    recorded = json.loads(json.dumps(identity_of(cfg, model)))  # as the checkpoint's file gives it back
    comparison = run_identity.compare(recorded, identity_of(cfg, model))
    assert comparison.refused == [] and comparison.allowed == []


def test_steps_logging_and_server_settings_may_change_the_learning_signal_may_not(run) -> None:
    cfg, model = run
    old = identity_of(cfg, model)
    safe = {"steps": 20, "save_steps": 5, "sample_every": 0, "report_to": ["tensorboard"], "resume": "auto"}
    safe |= {"keep_adapters": 10, "adapter_transfer": "upload"}  # disk and how versions reach the servers
    assert set(safe) <= run_identity.SAFE_TO_CHANGE
    new = identity_of(cfg.model_copy(update=safe), model)
    comparison = run_identity.compare(old, new)
    assert comparison.refused == []
    assert comparison.allowed == [
        "adapter_transfer: 'auto' -> 'upload'",
        "keep_adapters: 3 -> 10",
        "report_to: [] -> ['tensorboard']",
        "resume: None -> 'auto'",
        "sample_every: 1 -> 0",
        "save_steps: 10 -> 5",
        "steps: 10 -> 20",
    ]
    unsafe = cfg.model_copy(update={"learning_rate": 1e-3, "loss": cfg.loss.model_copy(update={"beta": 0.1})})
    comparison = run_identity.compare(old, identity_of(unsafe, model))
    assert comparison.refused == ["learning_rate: 0.0001 -> 0.001", "loss.beta: 0.04 -> 0.1"]


def test_eval_fraction_changes_the_split_and_is_refused(run) -> None:
    cfg, model = run
    held_out = cfg.model_copy(update={"eval_fraction": 0.4})
    comparison = run_identity.compare(identity_of(cfg, model), identity_of(held_out, model))
    assert comparison.refused == ["eval_fraction: None -> 0.4"]  # the same file: other rows trained on


def test_fewer_more_or_other_data_rows_are_refused_naming_the_file(run, tmp_path: Path) -> None:
    cfg, model = run
    old = identity_of(cfg, model)
    for rows, word in [(4, "row"), (6, "row"), (5, "other")]:
        write_rows(cfg.data, rows, word)
        (refused,) = run_identity.compare(old, identity_of(cfg, model)).refused
        assert refused.startswith(f"data file {cfg.data}: ")
        assert ("rows 5 -> " + str(rows) in refused) == (rows != 5) and "sha256 " in refused
    # The same rows at another path: a moved file is the same data.
    moved = cfg.model_copy(update={"data": write_rows(tmp_path / "moved.jsonl", 5)})
    assert run_identity.compare(old, identity_of(moved, model)).refused == []


def test_another_model_is_refused_a_moved_one_is_not(run, tmp_path: Path) -> None:
    cfg, model = run
    old = identity_of(cfg, model)
    moved = shutil.copytree(model, tmp_path / "elsewhere")
    assert run_identity.compare(old, identity_of(cfg, moved)).refused == []
    # The same shapes and file sizes, other weights: what the config and the sizes alone would miss.
    save_file({name: t + 1 for name, t in BASE_WEIGHTS.items()}, str(moved / "model.safetensors"))
    assert (moved / "model.safetensors").stat().st_size == (model / "model.safetensors").stat().st_size
    (refused,) = run_identity.compare(old, identity_of(cfg, moved)).refused
    assert refused.startswith("model: ")
    (refused,) = run_identity.compare(old, identity_of(cfg, "Qwen/Qwen2.5-0.5B")).refused
    assert refused.startswith(f"model: {model} (fingerprint ") and refused.endswith("-> Qwen/Qwen2.5-0.5B (a Hub id)")


def test_a_setting_the_checkpoint_predates_is_no_change_at_its_default(run) -> None:
    cfg, model = run
    new = identity_of(cfg, model)
    old = json.loads(json.dumps(new))
    del old["config"]["reference"]  # a field added since; the new run leaves it at its default
    assert run_identity.compare(old, new).refused == []
    changed = identity_of(cfg.model_copy(update={"reference": "base"}), model)
    assert run_identity.compare(old, changed).refused == ["reference: (absent) -> 'base'"]


def test_a_checkpoint_from_before_importance_sampling_ran_token_truncate_and_its_max_staleness_did_nothing(
    run,
) -> None:
    # loss.importance_sampling came with a default (sequence_mask, TRL's) other than what the code
    # did before (token_truncate); max_staleness went (one step ahead, it never dropped a rollout).
    cfg, model = run
    old = json.loads(json.dumps(identity_of(cfg, model)))
    del old["config"]["loss"]["importance_sampling"]
    old["config"]["max_staleness"] = 1
    new = identity_of(cfg, model)
    assert run_identity.compare(old, new).refused == ["loss.importance_sampling: (absent) -> 'sequence_mask'"]
    as_before = identity_of(
        cfg.model_copy(update={"loss": cfg.loss.model_copy(update={"importance_sampling": "token_truncate"})}), model
    )
    assert run_identity.compare(old, as_before).refused == []


def test_checked_refuses_an_unsafe_resume_unless_allowed_and_logs_the_changes(
    run, caplog: pytest.LogCaptureFixture
) -> None:
    cfg, model = run
    step = cfg.output_dir / "checkpoints" / "step-000002"
    step.mkdir(parents=True)
    (step / checkpoint.STATE_FILE).write_text("{}")
    (step / checkpoint.IDENTITY_FILE).write_text(json.dumps(identity_of(cfg, model)))
    resumed = cfg.model_copy(update={"resume": "auto", "learning_rate": 1e-3, "steps": 20})
    with pytest.raises(ConfigError, match=r"step-000002 .*: learning_rate: 0.0001 -> 0.001\. .*--allow-config-change"):
        run_identity.checked(resumed, load_data(resumed), str(model))
    allowed = resumed.model_copy(update={"allow_config_change": True})
    with caplog.at_level(logging.INFO, logger="learner"):
        got = run_identity.checked(allowed, load_data(allowed), str(model))
    assert got == identity_of(allowed, model)
    messages = [r.getMessage() for r in caplog.records]
    assert any("--allow-config-change" in m and "learning_rate: 0.0001 -> 0.001" in m for m in messages)
    assert any("steps: 10 -> 20" in m for m in messages)
    # A checkpoint that recorded nothing (written before identities were) cannot be checked.
    (step / checkpoint.IDENTITY_FILE).unlink()
    with pytest.raises(ConfigError, match=r"records no run identity.*--allow-config-change"):
        run_identity.checked(resumed, load_data(resumed), str(model))
    assert run_identity.checked(allowed, load_data(allowed), str(model)) == got


def test_checkpoints_carry_the_identity_the_run_recorded(tiny_model_dir: Path, tmp_path: Path) -> None:
    cfg = LearnerConfig(output_dir=tmp_path, save_steps=1)
    recorded = {"config": {"steps": 3}, "data": {}, "model": {"name": "m"}}
    (tmp_path / checkpoint.IDENTITY_FILE).write_text(json.dumps(recorded))
    policy, optimizer, prompts = trained(tiny_model_dir, cfg, steps=0)
    path = checkpoint.save_if_due(cfg, checkpoint.TrainState(1, 0, None), policy, optimizer, prompts)
    assert json.loads((path / checkpoint.IDENTITY_FILE).read_text()) == recorded
