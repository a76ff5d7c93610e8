"""docker-compose.yml (the CPU default) and docker-compose.gpu.yml, checked without running them.

`make compose-check` runs the CPU file for real (CI does, where a Docker engine starts). Here: both
files against the Compose Specification's JSON schema (the copy check-jsonschema vendors); each
service's command against the CLI it runs; each setup's prepare step run on the tiny model, with the
container paths mapped to host ones, so that its server command is parsed with the flags the
prepare step writes (the same base as the learner's, a workload-sized --max-model-len); the
Dockerfile against the files; and, where the image is built, each healthcheck's interpreter in it.
"""

from __future__ import annotations

import importlib.resources
import json
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

from learner.cli import main as learner_main
from learner.cli import parse_config as learner_config
from rollout_server.app import build_app
from rollout_server.cli import parse_config as server_config
from shared.config import LearnerConfig, ServerConfig

PYPROJECT = tomllib.loads(Path("pyproject.toml").read_text())
DOCKERFILE = Path("Dockerfile").read_text()
GPU_ENV = {"MODEL_DIR": "/models/m", "DATA": "/data/train.jsonl"}
FILES = {"cpu": ("docker-compose.yml", {}), "gpu": ("docker-compose.gpu.yml", GPU_ENV)}


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's `${VAR}`, `${VAR:-default}` and `${VAR:?message}`, from `env` (a missing `:?` fails)."""

    def one(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if name in env:
            return env[name]
        assert op != ":?", f"${{{name}}} is required: {arg}"
        return arg if op == ":-" else ""

    return re.sub(r"\$\{(\w+)(?:(:[-?])([^}]*))?\}", one, text)


def load(engine: str) -> dict:
    path, env = FILES[engine]
    return yaml.safe_load(interpolate(Path(path).read_text(), env))


CPU, GPU = load("cpu"), load("gpu")


def argv(service: dict) -> list[str]:
    return shlex.split(service["command"])


def schema_validator() -> jsonschema.protocols.Validator:
    schema_file = importlib.resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema = json.loads(schema_file.read_text())
    return jsonschema.validators.validator_for(schema)(schema)


@pytest.mark.parametrize("engine", ["cpu", "gpu"])
def test_the_file_is_valid_against_the_compose_specification(engine: str) -> None:
    schema_validator().validate(load(engine))


def test_a_wrong_key_is_caught_by_the_schema() -> None:
    """The check above can fail: a misspelt service key is refused."""
    broken = {"services": {"rollout": {"image": "x", "healthcheck": {"tests": ["CMD", "true"]}}}}
    with pytest.raises(jsonschema.ValidationError):
        schema_validator().validate(broken)


def test_the_cpu_default_needs_no_variable() -> None:
    """A bare `docker compose up` must not stop at a `${VAR:?}` (interpolation fails on one: above)."""
    assert ":?" not in Path("docker-compose.yml").read_text()
    with pytest.raises(AssertionError, match=r"\$\{MODEL_DIR\} is required"):
        interpolate(Path("docker-compose.gpu.yml").read_text(), {})


def image(compose: dict) -> str:
    return compose["services"]["prepare"]["image"]


@pytest.mark.parametrize("engine", ["cpu", "gpu"])
def test_the_image_is_built_once_for_its_engine_from_groups_that_exist(engine: str) -> None:
    compose = load(engine)
    # prepare, which every other service waits for, builds it; the others run it.
    assert [name for name, service in compose["services"].items() if "build" in service] == ["prepare"]
    assert {service["image"] for service in compose["services"].values()} == {image(compose)}
    build = compose["services"]["prepare"]["build"]
    assert build["args"]["ENGINE"] == engine and engine in PYPROJECT["dependency-groups"]
    assert 'pip install --no-cache-dir --quiet -r requirements.txt --group "$ENGINE"' in DOCKERFILE
    assert build.get("dockerfile", "Dockerfile") == "Dockerfile" and "dockerfile_inline" not in build


def test_the_gpu_base_image_is_the_vllm_the_gpu_group_pins() -> None:
    (base,) = re.findall(r"^ARG BASE_IMAGE=(\S+)$", DOCKERFILE, re.MULTILINE)
    (vllm,) = [r for r in PYPROJECT["dependency-groups"]["gpu"] if r.startswith("vllm")]
    assert vllm.startswith("vllm==") and base == f"vllm/vllm-openai:v{vllm.removeprefix('vllm==')}"
    assert "BASE_IMAGE" not in GPU["services"]["prepare"]["build"]["args"]  # the pinned default
    assert CPU["services"]["prepare"]["build"]["args"]["BASE_IMAGE"] == "debian:bookworm"  # make compose-base's tag


def test_the_build_context_leaves_local_state_out() -> None:
    ignored = Path(".dockerignore").read_text().split()
    assert {".git", ".venv", "runs", "bench/.venv-trl"} <= set(ignored)


def healthchecks() -> list[tuple[str, str, list[str]]]:
    return [
        (engine, name, service["healthcheck"]["test"])
        for engine, compose in (("cpu", CPU), ("gpu", GPU))
        for name, service in compose["services"].items()
        if "healthcheck" in service
    ]


def test_every_healthcheck_asks_the_servers_health_route_with_the_images_interpreter() -> None:
    assert {name for _, name, _ in healthchecks()} >= {"rollout", "rollout-0", "rollout-1"}
    for _, _, test in healthchecks():
        assert test[:2] == ["CMD", "/opt/venv/bin/python"]
        assert "http://127.0.0.1:8000/health" in test[-1]
    # Both engines create that interpreter: the venv is made outside the engine branches' apt step.
    assert "python3 -m venv /opt/venv; else python3 -m venv --system-site-packages /opt/venv; fi" in DOCKERFILE
    assert "/health" in {route.path for route in build_app(ServerConfig(model="m")).routes}


def test_every_healthchecks_interpreter_runs_in_the_built_image() -> None:
    """In the image `make compose-check` builds (the CPU one; the GPU image is not built here)."""
    if shutil.which("docker") is None or subprocess.run(["docker", "info"], capture_output=True).returncode:
        pytest.skip("no Docker engine answers here")
    if subprocess.run(["docker", "image", "inspect", image(CPU)], capture_output=True).returncode:
        pytest.skip(f"{image(CPU)} is not built (make compose-check builds it)")
    for engine, name, test in healthchecks():
        if engine == "cpu":
            run = ["docker", "run", "--rm", image(CPU), test[1], "-c", "import urllib.request"]
            done = subprocess.run(run, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, f"{name}'s healthcheck interpreter {test[1]}: {done.stderr}"


class Container:
    """A service's container paths mapped to folders on this machine, for running its command here."""

    def __init__(self, mounts: dict[str, Path]) -> None:
        self.mounts = mounts

    def host(self, argv: list[str]) -> list[str]:
        def one(arg: str) -> str:
            for inside, outside in self.mounts.items():
                if arg.lstrip("@") == inside or arg.lstrip("@").startswith(inside + "/"):
                    return arg.replace(inside, str(outside), 1)
            return arg

        return [one(arg) for arg in argv]


def prepared_server(compose: dict, rollout: str, paths: Container) -> ServerConfig:
    """Run the prepare service's command here, then parse `rollout`'s command with what it wrote."""
    prepare = argv(compose["services"]["prepare"])
    assert prepare[0] == "grpo-learner" and prepare[0] in PYPROJECT["project"]["scripts"]
    learner_main(paths.host(prepare[1:]))
    server = argv(compose["services"][rollout])
    assert server[0] == "grpo-rollout-server" and server[0] in PYPROJECT["project"]["scripts"]
    assert server[1] == "@/served/server.args"  # what the prepare step wrote, into the served volume
    cfg, _ = server_config(paths.host(server[1:]))
    return cfg


def learner_of(compose: dict, name: str) -> LearnerConfig:
    command = argv(compose["services"][name])
    return learner_config(command[4:] if command[0] == "torchrun" else command[1:])


# What the run's server depends on (learner.serving): the same in the prepare step and the learner.
SERVED_FIELDS = {"mode", "data", "model", "load_in_4bit", "lora", "max_prompt_tokens", "sampling", "server"}


@pytest.mark.parametrize(
    ("engine", "rollout", "learner"),
    [("cpu", "rollout", "learner"), ("gpu", "rollout", "learner"), ("gpu", "rollout-0", "learner-ddp")],
)
def test_the_server_samples_the_learners_base_with_a_workload_context(
    engine: str, rollout: str, learner: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    compose = load(engine)
    prepare_cfg = learner_config(argv(compose["services"]["prepare"])[1:])
    learner_cfg = learner_of(compose, learner)
    assert prepare_cfg.model_dump(include=SERVED_FIELDS) == learner_cfg.model_dump(include=SERVED_FIELDS)
    # The tiny model stands in for the image's (CPU) or the user's MODEL_DIR (GPU).
    model_dir = "/opt/tiny-model" if engine == "cpu" else "/model"
    assert learner_cfg.model == model_dir
    paths = Container(
        {model_dir: tiny_model_dir, "/served": tmp_path / "served", "/runs": tmp_path / "runs", "/adapters": tmp_path}
        | {"/data/train.jsonl": Path("examples/supervised.jsonl").resolve()}
    )
    cfg = prepared_server(compose, rollout, paths)
    # On CPU the learner's base is not 4-bit: the server loads the model directory itself (with a
    # 4-bit learner it would load <served>/served-base, the learner's dequantized weights).
    assert cfg.model == str(tiny_model_dir)
    assert cfg.max_model_len == 256  # 128 prompt + 64 (or 4) completion tokens, rounded up
    assert (cfg.host, cfg.port, cfg.adapter_root) == ("0.0.0.0", 8000, tmp_path)


@pytest.mark.parametrize("engine", ["cpu", "gpu"])
def test_the_learner_meets_its_server_shares_its_adapters_and_resumes(engine: str) -> None:
    compose = load(engine)
    learner, rollout = compose["services"]["learner"], compose["services"]["rollout"]
    cfg = learner_of(compose, "learner")
    assert cfg.server_url == ["http://rollout:8000"] and cfg.resume == "auto"
    # The adapters volume is the server's adapter root and the learner's <output_dir>/adapters.
    assert f"adapters:{cfg.output_dir}/adapters" in learner["volumes"] and "adapters:/adapters" in rollout["volumes"]
    assert f"runs:{cfg.output_dir}" in learner["volumes"]  # checkpoints outlive the container
    assert learner["restart"] == "on-failure" and rollout["restart"] == "unless-stopped"
    assert learner["depends_on"] == {"rollout": {"condition": "service_healthy"}}
    assert rollout["depends_on"] == {"prepare": {"condition": "service_completed_successfully"}}
    assert "served:/served:ro" in rollout["volumes"] and "served:/served" in compose["services"]["prepare"]["volumes"]
    assert rollout["ports"] == ["127.0.0.1:8000:8000"]  # the host's loopback only: no key needed
    assert "vllm-cache:/root/.cache/vllm" in rollout["volumes"]  # a restart skips vLLM's compile


def test_the_cpu_learner_checkpoints_long_before_its_run_ends() -> None:
    """compose-check kills it after its first checkpoint and watches it resume and train on."""
    cfg = learner_of(CPU, "learner")
    assert cfg.save_steps > 0 and cfg.steps >= 10 * cfg.save_steps


REPLICAS = sorted(name for name in GPU["services"] if re.fullmatch(r"rollout-\d+", name))


def test_the_multi_gpu_replicas_each_have_a_gpu_and_the_shared_adapters() -> None:
    assert [f"rollout-{i}" for i in range(len(REPLICAS))] == REPLICAS and len(REPLICAS) >= 2
    gpus = []
    for name in REPLICAS:
        service = GPU["services"][name]
        assert service["profiles"] == ["multi-gpu"]
        assert argv(service)[1] == "@/served/server.args"
        assert "adapters:/adapters" in service["volumes"] and "served:/served:ro" in service["volumes"]
        assert service["depends_on"] == {"prepare": {"condition": "service_completed_successfully"}}
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        gpus += device["device_ids"]
    learner = GPU["services"]["learner-ddp"]
    (device,) = learner["deploy"]["resources"]["reservations"]["devices"]
    gpus += device["device_ids"]
    assert len(gpus) == len(set(gpus)), f"two services reserve the same GPU: {gpus}"


def test_the_ddp_learner_runs_one_rank_per_gpu_against_every_replica() -> None:
    learner = GPU["services"]["learner-ddp"]
    command = argv(learner)
    assert command[0] == "torchrun" and command[2:4] == ["-m", "learner.cli"]
    (device,) = learner["deploy"]["resources"]["reservations"]["devices"]
    assert command[1] == f"--nproc_per_node={len(device['device_ids'])}"
    cfg = learner_of(GPU, "learner-ddp")
    assert cfg.server_url == [f"http://{name}:8000" for name in REPLICAS]
    assert not cfg.sleep_server  # the replicas have GPUs of their own
    assert f"adapters:{cfg.output_dir}/adapters" in learner["volumes"]
    assert set(learner["depends_on"]) == set(REPLICAS)
    assert learner["ipc"] == "host"  # NCCL's shared-memory transport between the ranks


def test_the_one_gpu_services_start_without_a_profile() -> None:
    assert all("profiles" not in GPU["services"][name] for name in ("prepare", "rollout", "learner"))
    for name in ("prepare", "rollout", "learner"):
        (device,) = GPU["services"][name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["count"] == 1 and device["capabilities"] == ["gpu"]
