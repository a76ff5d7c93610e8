"""What a run depends on, recorded with its checkpoints and compared when one is resumed.

A run's identity is its settings (config.yaml's, the API key left out), each data file's sha256
and row count, and its model's fingerprint. `grpo-learner` writes it to
output_dir/run_identity.json and every checkpoint takes a copy (checkpoint.save_if_due). A resume
compares the checkpoint's with its own before any model loads (`checked`): settings in
SAFE_TO_CHANGE may differ, and are logged; any other difference is refused with the list of them
(`field: old -> new`, the data file's rows and sha256, the model), unless allow_config_change.

The model's fingerprint is cheap rather than proof: the sha256 of every file at the top of the
model directory by name and size, read whole up to 4 MiB (config.json, the tokenizer), and for a
larger file (the weights) FINGERPRINT_SAMPLES pieces of 64 KiB spread evenly over it. A moved or
copied directory keeps its fingerprint (the path is not in it); a rebuilt, re-quantized or
fine-tuned model changes it, unless every changed byte falls between the samples. A Hub id
(no local directory) is compared by its name.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from learner import checkpoint
from learner.data import Data
from shared.config import LearnerConfig
from shared.errors import ConfigError

log = logging.getLogger("learner")

SAFE_TO_CHANGE = frozenset(
    {
        # How long the run goes and how often it checkpoints: the steps it takes are the same.
        "steps",
        "save_steps",
        "save_total_limit",
        "eval_steps",
        "resume",
        "allow_config_change",
        # How much disk the run's adapter versions take (learner.retention).
        "keep_adapters",
        # What it reports.
        "sample_every",
        "report_to",
        "tracker_samples",
        # Where things are: the data's and the model's contents are compared instead of their paths.
        "output_dir",
        "data",
        "eval_data",
        "model",
        # How the rollout servers are reached, waited for and checked.
        "server_url",
        "adapter_transfer",
        "api_key",
        "server_start_timeout_s",
        "server_wait_s",
        "sleep_lease_s",
        "sleep_server",
        "canary_tolerance",
        # Memory, not the update: the same gradients, summed in other orders.
        "micro_batch_size",
        "logprob_chunk_size",
        "gradient_checkpointing",
        # The same products, rounded in another order.
        "fused_lora",
    }
)
"""The LearnerConfig fields a resume may change without allow_config_change (top-level names; a
nested field counts as its parent's). Everything else (the learning rate, the loss, LoRA,
sampling, the local server's settings, the seed, the held-out split, fields added later) changes
what the resumed steps compute, and is refused."""

BEFORE_THE_SETTING = {"loss.importance_sampling": "token_truncate"}
"""What the code did before a setting came with another default: a checkpoint that predates the
setting ran with this value, not the default."""
REMOVED = frozenset({"max_staleness"})
"""Settings taken out that changed nothing a step computed (one step ahead, max_staleness never
dropped a rollout): a checkpoint that has one differs in nothing."""

FINGERPRINT_SAMPLES = 32
_WHOLE = 4 * 2**20
_PIECE = 64 * 2**10


def of(cfg: LearnerConfig, data: Data, model_dir: str) -> dict[str, Any]:
    """The identity of the run `cfg` over `data` (what load_data(cfg) read) and `model_dir`, as JSON values."""
    files = {"data": (cfg.data, len(data.train) + (len(data.eval) if cfg.eval_data is None else 0))}
    if cfg.eval_data is not None:
        files["eval_data"] = (cfg.eval_data, len(data.eval))
    return {
        "config": checkpoint.run_settings(cfg),
        "data": {
            role: {"path": str(path), "sha256": _sha256(path), "rows": rows} for role, (path, rows) in files.items()
        },
        "model": {"model": model_dir, "fingerprint": _fingerprint(Path(model_dir))},
    }


@dataclass(frozen=True)
class Comparison:
    """How a resuming run's identity differs from its checkpoint's."""

    refused: list[str] = field(default_factory=list)
    """Differences a resume may not make: settings outside SAFE_TO_CHANGE, data, model."""
    allowed: list[str] = field(default_factory=list)
    """Differences in SAFE_TO_CHANGE settings."""


def compare(old: dict[str, Any], new: dict[str, Any]) -> Comparison:
    """What differs from `old` (the checkpoint's identity) in `new` (the resuming run's): settings as
    'name: old -> new' in name order, then data files, then the model. A setting `old` predates is
    no difference at its default (the checkpoint's run behaved as the default does), or at the
    value BEFORE_THE_SETTING gives; a REMOVED one is none at all."""
    defaults = _flat(checkpoint.run_settings(LearnerConfig()))
    before, after = _flat(old["config"]), _flat(new["config"])
    comparison = Comparison()
    for name in sorted(before.keys() | after.keys()):
        if name not in before and after[name] == BEFORE_THE_SETTING.get(name, defaults.get(name)):
            continue
        if name not in after and name in REMOVED:
            continue
        if before.get(name, _ABSENT) != after.get(name, _ABSENT):
            line = f"{name}: {_show(before.get(name, _ABSENT))} -> {_show(after.get(name, _ABSENT))}"
            safe = name.split(".")[0] in SAFE_TO_CHANGE
            (comparison.allowed if safe else comparison.refused).append(line)
    for role in sorted(old["data"].keys() | new["data"].keys()):
        was, now = old["data"].get(role), new["data"].get(role)
        if was is None or now is None:
            comparison.refused.append(f"{role}: {was and was['path']} -> {now and now['path']}")
            continue
        changes = [f"{key} {was[key]} -> {now[key]}" for key in ("rows", "sha256") if was[key] != now[key]]
        if changes:
            comparison.refused.append(f"{role.replace('_', ' ')} file {now['path']}: {', '.join(changes)}")
    was, now = old["model"], new["model"]
    if (was["fingerprint"] or was["model"]) != (now["fingerprint"] or now["model"]):  # a Hub id: its name
        comparison.refused.append(f"model: {_model(was)} -> {_model(now)}")
    return comparison


def checked(cfg: LearnerConfig, data: Data, model_dir: str) -> dict[str, Any]:
    """This run's identity (`of`), once a resume is found to change only what it may.

    Resuming a checkpoint whose identity differs otherwise raises ConfigError listing the
    differences, unless `cfg.allow_config_change` (then they are logged as a warning); so does a
    checkpoint that recorded none (written before identities were). Safe differences are logged.
    """
    identity = of(cfg, data, model_dir)
    path = checkpoint.resume_point(cfg)
    if path is None:
        return identity
    recorded = path / checkpoint.IDENTITY_FILE
    if not recorded.is_file():
        if not cfg.allow_config_change:
            raise ConfigError(
                f"{path} records no run identity ({recorded.name}: written before the learner recorded them), so "
                "this resume's settings, data and model cannot be checked against its: pass --allow-config-change "
                "to resume it unchecked"
            )
        log.warning("resuming %s unchecked (--allow-config-change): it records no run identity", path)
        return identity
    comparison = compare(json.loads(recorded.read_text()), identity)
    if comparison.refused and not cfg.allow_config_change:
        raise ConfigError(
            f"{path} is a checkpoint of a run with other settings, data or model than these: "
            f"{'; '.join(comparison.refused)}. Resume with the checkpoint's, or pass --allow-config-change to go "
            f"on with these (a resume may change {', '.join(sorted(SAFE_TO_CHANGE))} without it)"
        )
    if comparison.refused:
        log.warning("resuming %s with changes (--allow-config-change): %s", path, "; ".join(comparison.refused))
    if comparison.allowed:
        log.info("resuming %s with changed settings: %s", path, "; ".join(comparison.allowed))
    return identity


_ABSENT = object()


def _show(value: Any) -> str:
    return "(absent)" if value is _ABSENT else repr(value)


def _model(identity: dict[str, Any]) -> str:
    fingerprint = identity["fingerprint"]
    return f"{identity['model']} " + ("(a Hub id)" if fingerprint is None else f"(fingerprint {fingerprint[:12]})")


def _flat(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as one level of dotted names: {'loss': {'beta': 0.04}} -> {'loss.beta': 0.04}."""
    out: dict[str, Any] = {}
    for name, value in settings.items():
        if isinstance(value, dict) and value:
            out |= _flat(value, f"{prefix}{name}.")
        else:
            out[prefix + name] = value
    return out


def _sha256(path: Path) -> str:
    """A data file's sha256; a directory's (datasets' save_to_disk) over its files' paths and contents."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with file.open("rb") as f:
            for block in iter(lambda: f.read(2**20), b""):
                digest.update(block)
    return digest.hexdigest()


def _fingerprint(model_dir: Path) -> str | None:
    """The model directory's fingerprint (see the module docstring); None for a Hub id."""
    if not model_dir.is_dir():
        return None
    digest = hashlib.sha256()
    for file in sorted(p for p in model_dir.iterdir() if p.is_file()):
        size = file.stat().st_size
        digest.update(f"{file.name}\0{size}\0".encode())
        with file.open("rb") as f:
            if size <= _WHOLE:
                digest.update(f.read())
                continue
            for i in range(FINGERPRINT_SAMPLES):
                f.seek((size - _PIECE) * i // (FINGERPRINT_SAMPLES - 1))
                digest.update(f.read(_PIECE))
    return digest.hexdigest()
