"""The rollout server a run needs (learner/serving.py): its context sized to the workload, and
`grpo-learner --prepare-server DIR` writing flags that `grpo-rollout-server @DIR/server.args` reads."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from learner.cli import main as learner_main
from learner.serving import (
    ENGINE_THREADS_MIN_PARAMS,
    SERVER_ARGS_FILE,
    local_server_settings,
    server_settings,
    workload_model_len,
)
from rollout_server.cli import parse_config as server_config
from shared.config import LearnerConfig, SamplingConfig


def model_with(tmp_path: Path, config: dict) -> str:
    (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path)


@pytest.mark.parametrize(
    ("prompt_tokens", "max_tokens", "config", "expected"),
    [
        (128, 64, {"max_position_embeddings": 32768}, 256),  # 192, rounded up to 256
        (128, 128, {"max_position_embeddings": 32768}, 256),  # 256 exactly: no rounding
        (1000, 300, {"max_position_embeddings": 131072}, 1536),  # 1300 -> 1536, not the model's 131k
        (128, 64, {"max_position_embeddings": 200}, 200),  # never above the model's own limit
        (128, 64, {"text_config": {"max_position_embeddings": 160}}, 160),  # Gemma-3's nesting
        (128, 64, {}, 256),  # no limit given: vLLM's derivation decides whether 256 fits
    ],
)
def test_the_servers_context_is_the_workloads(
    tmp_path: Path, prompt_tokens: int, max_tokens: int, config: dict, expected: int
) -> None:
    cfg = LearnerConfig(max_prompt_tokens=prompt_tokens, sampling=SamplingConfig(max_tokens=max_tokens))
    assert workload_model_len(cfg, model_with(tmp_path, config)) == expected


def test_prepare_server_writes_flags_the_server_reads(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "served"
    argv = ["--mode", "supervised", "--data", "examples/supervised.jsonl", "--model", str(tiny_model_dir)]
    learner_main(
        [*argv, "--output-dir", str(tmp_path / "run"), "--sampling-max-tokens", "300", "--prepare-server", str(out)]
    )
    # Flags given after the file override it, as the compose services give host, port and root.
    cfg, _ = server_config([f"@{out / SERVER_ARGS_FILE}", "--host", "0.0.0.0", "--adapter-root", "/adapters"])
    # On CPU the learner's base is float32 (not 4-bit): the server serves the model directory itself.
    assert cfg.model == str(tiny_model_dir) and not (out / "served-base").exists()
    assert (cfg.dtype, cfg.adapter_serving, cfg.max_lora_rank) == ("float32", "merged", 8)
    assert cfg.max_model_len == 512  # 128 + 300 -> 512, the tiny model's max_position_embeddings
    assert (cfg.host, cfg.adapter_root) == ("0.0.0.0", Path("/adapters"))
    assert not (tmp_path / "run" / "adapters").exists()  # prepared, not trained


def test_the_learners_server_settings_override_the_workloads(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "served"
    learner_main(["--model", str(tiny_model_dir), "--server", '{"max_model_len": 300}', "--prepare-server", str(out)])
    cfg, _ = server_config([f"@{out / SERVER_ARGS_FILE}"])
    assert cfg.max_model_len == 300


def test_the_local_servers_start_up_time_is_a_setting(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    """A first CUDA start takes minutes; the limit is the user's (here one the tiny model misses)."""
    argv = ["--model", str(tiny_model_dir), "--output-dir", str(tmp_path), "--server-start-timeout-s", "1"]
    with pytest.raises(SystemExit) as exited:
        learner_main(argv)
    assert exited.value.code == 2
    assert "did not answer /health within 1 s" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the engine's CPU threads")
def test_the_local_server_gets_every_core_while_the_learner_waits_on_it(tiny_model_dir: Path) -> None:
    """On CPU without overlap the learner and its local server take turns: the engine of a model
    worth splitting gets every core. A tiny model, overlap (both run at once), a prepared server
    (another machine, perhaps) or an explicit setting keep their own."""
    cores, big, model = len(os.sched_getaffinity(0)), ENGINE_THREADS_MIN_PARAMS, str(tiny_model_dir)
    assert local_server_settings(LearnerConfig(model=model), model, big)["cpu_threads"] == cores
    assert "cpu_threads" not in local_server_settings(LearnerConfig(model=model), model, big - 1)
    overlap = LearnerConfig(model=model, overlap=True, sleep_server=False)
    assert "cpu_threads" not in local_server_settings(overlap, model, big)
    assert "cpu_threads" not in server_settings(LearnerConfig(model=model), model)
    assert local_server_settings(LearnerConfig(model=model, server={"cpu_threads": 1}), model, big)["cpu_threads"] == 1
