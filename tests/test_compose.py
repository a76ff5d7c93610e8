"""docker-compose.yml, checked as far as it can be without a Docker engine (none on CI).

Against the Compose Specification's JSON schema (the copy check-jsonschema vendors), and each
service's command against the CLI it runs: the flags must parse into a valid config.
"""

from __future__ import annotations

import importlib.resources
import json
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

from learner.cli import parse_config as learner_config
from rollout_server.app import build_app
from rollout_server.cli import parse_config as server_config

COMPOSE = yaml.safe_load(Path("docker-compose.yml").read_text())
PYPROJECT = tomllib.loads(Path("pyproject.toml").read_text())
ENV = {"MODEL_DIR": "/models/m", "DATA": "/data/train.jsonl", "ROLLOUT_API_KEY": "k"}


def interpolate(text: str) -> str:
    """Compose's `${VAR}`, `${VAR:-default}` and `${VAR:?message}`, from ENV (a missing `:?` fails)."""

    def one(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if name in ENV:
            return ENV[name]
        assert op != ":?", f"${{{name}}} is required: {arg}"
        return arg if op == ":-" else ""

    return re.sub(r"\$\{(\w+)(?:(:[-?])([^}]*))?\}", one, text)


def test_the_file_is_valid_against_the_compose_specification() -> None:
    schema_file = importlib.resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema = json.loads(schema_file.read_text())
    jsonschema.validators.validator_for(schema)(schema).validate(COMPOSE)


def test_a_wrong_key_is_caught_by_the_schema() -> None:
    """The check above can fail: a misspelt service key is refused."""
    schema_file = importlib.resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema = json.loads(schema_file.read_text())
    broken = {"services": {"rollout": {"image": "x", "healthcheck": {"tests": ["CMD", "true"]}}}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validators.validator_for(schema)(schema).validate(broken)


def test_the_rollout_command_parses_and_its_healthcheck_route_exists() -> None:
    argv = shlex.split(interpolate(COMPOSE["services"]["rollout"]["command"]))
    assert argv[0] == "grpo-rollout-server" and argv[0] in PYPROJECT["project"]["scripts"]
    cfg, _ = server_config(argv[1:])
    assert (cfg.host, cfg.port, cfg.adapter_root) == ("0.0.0.0", 8000, Path("/adapters"))
    healthcheck = " ".join(COMPOSE["services"]["rollout"]["healthcheck"]["test"])
    assert f"127.0.0.1:{cfg.port}/health" in healthcheck
    assert "/health" in {route.path for route in build_app(cfg).routes}  # no engine starts: no lifespan


def test_the_learner_command_parses_and_meets_the_server() -> None:
    argv = shlex.split(interpolate(COMPOSE["services"]["learner"]["command"]))
    assert argv[0] == "grpo-learner" and argv[0] in PYPROJECT["project"]["scripts"]
    cfg = learner_config(argv[1:])
    assert cfg.server_url == ["http://rollout:8000"] and cfg.mode == "supervised"
    # The adapters volume is the server's adapter root and the learner's <output_dir>/adapters.
    volumes = COMPOSE["services"]["learner"]["volumes"]
    assert f"adapters:{cfg.output_dir}/adapters" in volumes
    assert "adapters:/adapters" in COMPOSE["services"]["rollout"]["volumes"]


def test_the_image_installs_dependency_groups_that_exist() -> None:
    dockerfile = COMPOSE["x-image"]["build"]["dockerfile_inline"]
    groups = re.findall(r"--group (\w+)", dockerfile)
    assert groups and set(groups) <= set(PYPROJECT["dependency-groups"])
    assert "cpu" not in groups  # the image is the CUDA engine's


REPLICAS = sorted(name for name in COMPOSE["services"] if re.fullmatch(r"rollout-\d+", name))


def test_the_multi_gpu_replicas_each_have_a_gpu_and_the_shared_adapters() -> None:
    assert [f"rollout-{i}" for i in range(len(REPLICAS))] == REPLICAS and len(REPLICAS) >= 2
    gpus = []
    for name in REPLICAS:
        service = COMPOSE["services"][name]
        assert service["profiles"] == ["multi-gpu"]
        cfg, _ = server_config(shlex.split(interpolate(service["command"]))[1:])
        assert (cfg.host, cfg.port, cfg.adapter_root) == ("0.0.0.0", 8000, Path("/adapters"))
        assert "adapters:/adapters" in service["volumes"]
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        gpus += device["device_ids"]
    learner = COMPOSE["services"]["learner-ddp"]
    (device,) = learner["deploy"]["resources"]["reservations"]["devices"]
    gpus += device["device_ids"]
    assert len(gpus) == len(set(gpus)), f"two services reserve the same GPU: {gpus}"


def test_the_ddp_learner_runs_one_rank_per_gpu_against_every_replica() -> None:
    learner = COMPOSE["services"]["learner-ddp"]
    argv = shlex.split(interpolate(learner["command"]))
    assert argv[0] == "torchrun" and argv[2:4] == ["-m", "learner.cli"]
    (device,) = learner["deploy"]["resources"]["reservations"]["devices"]
    assert argv[1] == f"--nproc_per_node={len(device['device_ids'])}"
    cfg = learner_config(argv[4:])
    assert cfg.server_url == [f"http://{name}:8000" for name in REPLICAS]
    assert not cfg.sleep_server  # the replicas have GPUs of their own
    assert f"adapters:{cfg.output_dir}/adapters" in learner["volumes"]
    assert set(learner["depends_on"]) == set(REPLICAS)


def test_the_one_gpu_services_start_without_a_profile() -> None:
    assert all("profiles" not in COMPOSE["services"][name] for name in ("rollout", "learner"))
