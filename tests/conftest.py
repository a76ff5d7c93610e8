"""Session fixtures: the tiny models, built once per test session (no hub, seeded)."""

from __future__ import annotations

from pathlib import Path

import pytest

from learner.tiny_model import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with random (seeded) weights, no warm-up."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def warm_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model after the default addition warm-up (about 20 s on 2 cores)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-warm") / "model", seed=0, warmup="addition")
