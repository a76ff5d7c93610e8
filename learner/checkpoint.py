"""Checkpoints: what a killed run needs to go on as if it had never stopped.

`output_dir/checkpoints/step-000012/` holds, after step 12:

- `adapter/`: the LoRA weights (peft `save_pretrained`);
- `optimizer.pt`: AdamW's state, moments and step counts (there is no LR scheduler);
- `rng.pt`: torch's CPU (and CUDA) generator states;
- `trainer_state.json`: the step; the policy version served for the next step and its adapter
  directory under output_dir/adapters; with overlap, the version the next step's rollout was
  sampled from when it is another (`overlap_sampled_version`, its directory
  `overlap_sampled_adapter`, which a resume serves first); the prompt sampler's RNG and position;
  Python's `random`;
- `run_identity.json`: the run's settings, data and model (learner.run_identity), which a resume
  compares with its own.

A checkpoint is written into a hidden temp directory and renamed into place, so a run killed
mid-write leaves no `step-*` directory for `latest` to pick, only a `.step-*` one it ignores.
"""

from __future__ import annotations

import filecmp
import json
import logging
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import yaml
from peft import PeftModel

from learner.distributed import Distributed
from learner.model import (
    ADAPTER_WEIGHTS,
    load_adapter_weights,
    save_adapter,
    save_next_version,
    version_dir,
    version_number,
    versions,
)
from learner.prompts import PromptSampler
from learner.reference import POLICY
from learner.run_log import drop_samples_after, drop_steps_after
from shared.config import LearnerConfig
from shared.durable import fsync_dir, fsync_tree, remove_tree
from shared.errors import ConfigError

log = logging.getLogger("learner")

STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"step-(\d+)")
_TEMP = re.compile(r"\.(step-\d+|v\d+|removing)-")  # save_adapter's, save's and remove_tree's temp dirs


class DataPosition(Protocol):
    """Where the run stands in its data: a PromptSampler, or learner.overlap.Rollouts (the sampler
    as of the last step taken, not of a batch asked for ahead)."""

    def state_dict(self) -> dict: ...


@dataclass(frozen=True)
class TrainState:
    """Where a run stands after `step` steps."""

    step: int
    """Steps done (0: none)."""
    version: int
    """The policy version serving step + 1: its adapter directory's number (0: the base model)."""
    adapter: Path | None
    """That adapter's directory, output_dir/adapters/v{version:06d}; None: the base model."""
    sampled_version: int | None = None
    """With overlap: the version step + 1's rollout was pinned to, asked for during step `step`
    (learner.overlap; 0: the base model), when it is not `version`; None: it samples `version`."""


def save_if_due(
    cfg: LearnerConfig,
    state: TrainState,
    policy: PeftModel,
    optimizer: torch.optim.Optimizer,
    prompts: DataPosition,
    ranks: Distributed = Distributed(),
) -> Path | None:
    """Every `cfg.save_steps` steps, checkpoint `state` and keep the newest `cfg.save_total_limit`.
    Under torchrun rank 0 alone writes (every rank holds the same state); the others get None."""
    if not cfg.save_steps or state.step % cfg.save_steps or not ranks.is_main:
        return None
    root = cfg.output_dir / "checkpoints"
    identity = cfg.output_dir / IDENTITY_FILE  # grpo-learner writes it before step 1
    path = save(root, state, policy, optimizer, prompts, identity if identity.is_file() else None)
    done = sorted(_complete(root), key=_step)
    for old in done[: -cfg.save_total_limit] if cfg.save_total_limit else []:
        remove_tree(old)
    log.info("checkpoint written: %s (--resume auto goes on from here)", path)
    return path


def save(
    root: Path,
    state: TrainState,
    policy: PeftModel,
    optimizer: torch.optim.Optimizer,
    prompts: DataPosition,
    identity: Path | None = None,
) -> Path:
    """Write `root/step-{state.step:06d}` atomically: a temp dir, then a rename that fails rather than
    overwrite an existing checkpoint. Its files and directories are fsynced before the rename, and the
    rename after it (shared.durable), so a power loss leaves the checkpoint whole or absent.
    `identity`, the run's run_identity.json, is copied in (without one, a resume needs --allow-config-change)."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state.step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=root))
    try:
        policy.save_pretrained(str(tmp / "adapter"), safe_serialization=True, selected_adapters=[POLICY])
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            # The current device's (under torchrun, the rank's): get_rng_state_all() would create a
            # CUDA context on every visible GPU, in every rank.
            rng["cuda"] = torch.cuda.get_rng_state()
        torch.save(rng, tmp / "rng.pt")
        if identity is not None:
            shutil.copy(identity, tmp / IDENTITY_FILE)
        sampled = state.sampled_version if state.sampled_version != state.version else None
        trainer_state = {
            "step": state.step,
            "policy_version": state.version,
            "adapter": None if state.adapter is None else state.adapter.name,
            "overlap_sampled_version": sampled,
            "overlap_sampled_adapter": version_dir(Path(), sampled).name if sampled else None,
            "prompts": prompts.state_dict(),
            "python_random": random.getstate(),
        }
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state))  # last: a dir without it is not a checkpoint
        fsync_tree(tmp)  # the data on disk before the name that says it is whole
        os.rename(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def served_versions(output_dir: Path) -> set[int]:
    """The adapter versions the checkpoints under `output_dir` serve from when resumed (the one
    after their step, and under overlap the one their next step was sampled from): adapter
    retention keeps them (learner.retention)."""
    versions = set()
    for path in _complete(output_dir / "checkpoints"):
        saved = json.loads((path / STATE_FILE).read_text())
        for key in ("adapter", "overlap_sampled_adapter"):
            if saved.get(key) and (number := version_number(saved[key])) is not None:
                versions.add(number)
    return versions


def latest(root: Path) -> Path | None:
    """The complete checkpoint of the highest step under `root` (None if there is none)."""
    return max(_complete(root), key=_step, default=None)


RUN_OUTPUTS = ("metrics.jsonl", "samples", "checkpoints", "tensorboard")
"""What a run writes under output_dir as it trains, from step 1 on (config.yaml, server.log and
served-base are written before, and rewritten by the next run). Adapter versions alone are not a
run's: a server's adapter root may hold other learners' (compose mounts its volume there)."""
CONFIG_FILE = "config.yaml"
IDENTITY_FILE = "run_identity.json"
"""What the run depends on (learner.run_identity): written beside config.yaml, copied into each checkpoint."""


def earlier_run(output_dir: Path) -> list[str]:
    """The RUN_OUTPUTS output_dir holds (a file or a folder, with anything in it)."""
    found = []
    for name in RUN_OUTPUTS:
        path = output_dir / name
        if (path.is_file() and path.stat().st_size) or (path.is_dir() and any(path.iterdir())):
            found.append(name + ("/" if path.is_dir() else ""))
    return found


def run_settings(cfg: LearnerConfig) -> dict:
    """The settings written to output_dir/config.yaml (the API key left out)."""
    return cfg.model_dump(mode="json", exclude={"api_key"})


def _same_settings(cfg: LearnerConfig) -> bool:
    """Whether output_dir's config.yaml is this run's, --resume apart."""
    path = cfg.output_dir / CONFIG_FILE
    if not path.is_file():
        return False
    earlier = yaml.safe_load(path.read_text()) or {}
    return {**earlier, "resume": None} == {**run_settings(cfg), "resume": None}


def resume_point(cfg: LearnerConfig) -> Path | None:
    """The checkpoint `cfg.resume` names: 'auto' the latest under output_dir/checkpoints (None if
    none), else the directory given. A fresh start over existing checkpoints is refused: its
    checkpoints would collide with theirs by step number, and 'auto' would mix the two runs."""
    root = cfg.output_dir / "checkpoints"
    if cfg.resume is None:
        found = latest(root)
        if found is not None:
            raise ConfigError(
                f"{root} holds checkpoints of an earlier run (newest {found.name}): pass --resume auto to "
                "continue it, choose another --output-dir, or delete them to start over"
            )
        return None
    if cfg.resume == "auto":
        return latest(root)
    path = Path(cfg.resume)
    if not (path / STATE_FILE).is_file():
        raise ConfigError(f"{path}: not a checkpoint directory (no {STATE_FILE})")
    return path


def check_one_run(cfg: LearnerConfig) -> None:
    """One run per output_dir (grpo-learner checks it before anything loads): a fresh start into a
    directory that holds an earlier run's outputs is refused (its metrics steps would appear twice,
    its adapter numbers go on, its samples be overwritten), and so is --resume auto with no
    checkpoint there, unless those outputs are this very run's (the same settings in config.yaml:
    it died before its first checkpoint, as compose restarts it), which then starts over (`restore`)."""
    found = resume_point(cfg)  # a bad --resume, or checkpoints a fresh start would collide with
    earlier = earlier_run(cfg.output_dir)
    if not earlier or found is not None:  # nothing to mix with, or a checkpoint to go on from
        return
    if cfg.resume is None:
        raise ConfigError(
            f"{cfg.output_dir} holds an earlier run's {', '.join(earlier)} (and no checkpoint to resume): a new "
            "run there would mix with it (its metrics steps twice, adapter numbers going on); choose another "
            "--output-dir, or delete them to start over"
        )
    if not _same_settings(cfg):
        raise ConfigError(
            f"--resume auto: no checkpoint under {cfg.output_dir / 'checkpoints'}, and {cfg.output_dir} holds "
            f"{', '.join(earlier)} of a run with other settings than these (its {CONFIG_FILE}): choose another "
            "--output-dir, or delete them to start over"
        )


def restore(
    cfg: LearnerConfig,
    policy: PeftModel,
    optimizer: torch.optim.Optimizer,
    prompts: PromptSampler,
    ranks: Distributed = Distributed(),
) -> TrainState:
    """The state training starts from, with `policy`, `optimizer`, `prompts` and the RNGs set to it.

    Resuming: the checkpoint `cfg.resume` names is loaded and output_dir is rolled back to its step:
    metrics.jsonl rows of later steps are dropped and adapter versions above its version and later
    checkpoints are deleted (the resumed run redoes those steps and numbers its adapters from the
    checkpoint's version on). Fresh: step 0, serving the base model, or `cfg.init_adapter`'s
    weights (already in `policy`, see model.load_policy) saved as the next adapter version.

    Under torchrun every rank calls it and ends in the same state. Rank 0 alone writes to
    output_dir (the roll back, the init adapter's version), and every rank returns once it has.
    """
    adapter_root = cfg.output_dir / "adapters"
    path = resume_point(cfg)  # the same on every rank: the roll back removes only later ones
    if path is None:
        if cfg.resume == "auto":
            log.info("--resume auto: no checkpoint under %s, starting at step 1", cfg.output_dir / "checkpoints")
            earlier = earlier_run(cfg.output_dir) if ranks.is_main else []
            if earlier:  # this run's (check_one_run refused others'), written before it died
                log.info("removing what this run wrote before it died (%s)", ", ".join(earlier))
                _roll_back(cfg.output_dir, TrainState(0, 0, None))
        if cfg.init_adapter is None:
            return TrainState(0, 0, None)
        version, adapter = save_next_version(policy, adapter_root, ranks)
        ranks.barrier()  # on disk before any rank serves it
        return TrainState(0, version, adapter)

    saved = json.loads((path / STATE_FILE).read_text())
    load_adapter_weights(policy, path / "adapter")
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    for group in optimizer.param_groups:
        # The loaded state carries the settings it was saved with: this run's win (they differ only
        # with --allow-config-change, which run_identity logged).
        group.update(lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    rng = torch.load(path / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available() and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"])
    version_, internal, gauss = saved["python_random"]
    random.setstate((version_, tuple(internal), gauss))
    prompts.load_state_dict(saved["prompts"])
    adapter = None if saved["adapter"] is None else adapter_root / saved["adapter"]
    sampled = saved.get("overlap_sampled_version") if cfg.overlap else None  # checkpoints before it: none
    if sampled and not version_dir(adapter_root, sampled).is_dir():
        log.warning(
            "%s is gone: step %d is sampled from version %d, not from version %d as the run that wrote %s "
            "sampled it (the resumed run's samples differ from an uninterrupted run's)",
            version_dir(adapter_root, sampled), saved["step"] + 1, saved["policy_version"], sampled, path,
        )  # fmt: skip
        sampled = None
    state = TrainState(saved["step"], saved["policy_version"], adapter, sampled)
    if ranks.is_main:
        _roll_back(cfg.output_dir, state)
        if state.adapter is not None:
            _check_served_adapter(state.adapter, path / "adapter", policy)
    ranks.barrier()  # output_dir rolled back, the served adapter in place, before any rank goes on
    log.info("resuming from %s: step %d done, policy version %d", path, state.step, state.version)
    return state


def _roll_back(output_dir: Path, state: TrainState) -> None:
    """Undo what a run did after `state`: its metrics rows, samples files, adapter versions and
    checkpoints, and the temp dirs of the writes and deletes its death interrupted."""
    drop_steps_after(output_dir / "metrics.jsonl", state.step)
    drop_samples_after(output_dir / "samples", state.step)
    for root in (output_dir / "adapters", output_dir / "checkpoints"):
        for leftover in root.iterdir() if root.is_dir() else []:
            if _TEMP.match(leftover.name):
                shutil.rmtree(leftover)
    for version, newer in versions(output_dir / "adapters").items():
        if version > state.version:
            remove_tree(newer)
    for newer in _complete(output_dir / "checkpoints"):
        if _step(newer) > state.step:
            remove_tree(newer)


def _check_served_adapter(served: Path, checkpointed: Path, policy: PeftModel) -> None:
    """The server loads adapters from output_dir/adapters only: put the checkpoint's there if it is
    missing (a checkpoint from another output_dir), refuse if another adapter holds its version."""
    if not served.exists():
        save_adapter(policy, served.parent, int(served.name[1:]))
    elif not filecmp.cmp(served / ADAPTER_WEIGHTS, checkpointed / ADAPTER_WEIGHTS, shallow=False):
        raise ConfigError(
            f"{served} is not the adapter of checkpoint {checkpointed.parent}: resume into the checkpoint's "
            "own output_dir or one without that adapter version"
        )


def _complete(root: Path) -> list[Path]:
    """Checkpoint directories under `root`: named step-N, with their state file written (temp dirs
    are hidden `.step-N-*` ones)."""
    if not root.is_dir():
        return []
    return [p for p in root.iterdir() if _NAME.fullmatch(p.name) and (p / STATE_FILE).is_file()]


def _step(path: Path) -> int:
    return int(_NAME.fullmatch(path.name).group(1))
