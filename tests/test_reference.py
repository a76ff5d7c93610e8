"""The KL reference: the base model, or the initial adapter the run starts from (`reference`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import get_peft_model_state_dict
from safetensors.torch import load_file

from learner import checkpoint
from learner.checkpoint import TrainState
from learner.cli import parse_config
from learner.model import load_policy, save_adapter
from learner.prompts import PromptSampler, UnsupervisedRow
from shared.config import LearnerConfig
from shared.errors import ConfigError
from tests.peft_adapters import random_adapter
from tests.test_update import update


def trainable(policy) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}


@pytest.fixture
def init_adapter(tiny_model_dir: Path, tmp_path: Path) -> Path:
    return random_adapter(tiny_model_dir, tmp_path / "init", seed=1)  # r=8, alpha=16, all linear: the defaults


def test_with_the_init_adapter_as_reference_the_kl_starts_at_zero_and_only_the_policy_trains(
    tiny_model_dir: Path, init_adapter: Path, tmp_path: Path
) -> None:
    # No `reference` given: with an initial adapter it is the reference (as in TRL).
    cfg = LearnerConfig(init_adapter=init_adapter, learning_rate=1e-2, micro_batch_size=1)
    policy, _ = load_policy(str(tiny_model_dir), cfg)
    params = trainable(policy)
    want = load_file(init_adapter / "adapter_model.safetensors")
    # The optimizer gets the policy's LoRA (A and B of 2 layers x 7 modules), none of the reference's.
    assert len(params) == len(want) == 28 and all(".default." in n for n in params)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.learning_rate)

    first = update(policy, optimizer, cfg, [1.0, -1.0])
    # Before any update the policy is the reference: k3 = exp(ref - new) - (ref - new) - 1 is 0 at
    # every token only where the two log-probabilities are equal.
    assert first.kl == 0.0 and not first.skipped
    second = update(policy, optimizer, cfg, [1.0, -1.0])
    assert second.kl > 0  # the policy moved; the reference stayed where it started
    assert trainable(policy).keys() == params.keys()  # the reference pass left it the trainable one
    held = get_peft_model_state_dict(policy, adapter_name="reference")
    assert held.keys() == want.keys() and all(torch.equal(held[n], want[n]) for n in want)  # never trained

    saved = save_adapter(policy, tmp_path / "adapters", 1)
    # The saved adapter is the policy's alone: its tensors, and no second adapter's folder beside them.
    assert sorted(p.name for p in saved.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    got = load_file(saved / "adapter_model.safetensors")
    assert got.keys() == want.keys()
    moved = trainable(policy)
    assert all(torch.equal(got[n], moved[n.replace(".weight", ".default.weight")]) for n in got)
    assert any(not torch.equal(got[n], want[n]) for n in got)


def test_with_the_base_as_reference_an_init_adapter_starts_away_from_it(
    tiny_model_dir: Path, init_adapter: Path
) -> None:
    cfg = LearnerConfig(init_adapter=init_adapter, reference="base", micro_batch_size=1)
    policy, _ = load_policy(str(tiny_model_dir), cfg)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.learning_rate)
    assert update(policy, optimizer, cfg, [1.0, -1.0]).kl > 0  # the random adapter is far from the base


def test_reference_init_needs_an_init_adapter_and_the_flag_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match=r"reference: .*'init' is the initial adapter: give init_adapter"):
        parse_config(["--reference", "init"])
    assert parse_config(["--reference", "base"]).reference == "base"
    with pytest.raises(SystemExit):
        parse_config(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--reference {base,init}" in help_text and "None: init when init_adapter is given, else base" in help_text


def test_a_resumed_run_keeps_the_init_adapter_as_reference(
    tiny_model_dir: Path, init_adapter: Path, tmp_path: Path
) -> None:
    cfg = LearnerConfig(init_adapter=init_adapter, output_dir=tmp_path, resume="auto", micro_batch_size=1)
    policy, _ = load_policy(str(tiny_model_dir), cfg)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    update(policy, optimizer, cfg, [1.0, -1.0])
    prompts = PromptSampler([UnsupervisedRow(text="row")], 1, seed=0)
    path = checkpoint.save(tmp_path / "checkpoints", TrainState(1, 0, None), policy, optimizer, prompts)
    assert not (path / "adapter" / "reference").exists()  # the checkpoint holds the policy's adapter alone

    resumed, _ = load_policy(str(tiny_model_dir), cfg)
    params = [p for p in resumed.parameters() if p.requires_grad]
    checkpoint.restore(cfg, resumed, torch.optim.AdamW(params), prompts)
    assert all(torch.equal(p, trainable(policy)[n]) for n, p in trainable(resumed).items())
    held = get_peft_model_state_dict(resumed, adapter_name="reference")
    want = load_file(init_adapter / "adapter_model.safetensors")
    assert all(torch.equal(held[n], want[n]) for n in want)  # the start of the run, not the checkpoint
