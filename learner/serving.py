"""The rollout server a run needs: the base it serves and the flags it starts with.

One definition for the learner's local server and for `grpo-learner --prepare-server DIR`, which
writes the same for a server started elsewhere (docker compose: a container of its own). Both then
sample from the weights the learner computes with (a 4-bit learner's dequantized base, not the
original bf16 weights) with a context sized to the run's workload, not the model's whole context:
vLLM refuses to start when its KV cache cannot hold one sequence of the model's full length
(Llama-3.2-3B: 131k positions at gpu_memory_utilization 0.35 of 24 GB).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from learner.local_server import lora_rank_slot, server_flags
from learner.model import adapter_serving, served_base, server_dtype
from shared.config import LearnerConfig

SERVER_ARGS_FILE = "server.args"
"""What --prepare-server writes: the server's flags, one argument per line, for
`grpo-rollout-server @DIR/server.args` (flags after it override it)."""

MODEL_LEN_MULTIPLE = 256


def workload_model_len(cfg: LearnerConfig, model_dir: str) -> int:
    """The longest sequence a run sends the server, rounded up to a multiple of 256: a prompt is
    truncated to `max_prompt_tokens` (its chat template included) and a completion stops at
    `sampling.max_tokens`. At most the model's `max_position_embeddings` (config.json, or its
    `text_config`), above which vLLM refuses to start."""
    needed = cfg.max_prompt_tokens + cfg.sampling.max_tokens
    rounded = -(-needed // MODEL_LEN_MULTIPLE) * MODEL_LEN_MULTIPLE
    config = json.loads((Path(model_dir) / "config.json").read_text())
    limit = config.get("max_position_embeddings") or config.get("text_config", {}).get("max_position_embeddings")
    return min(rounded, limit) if limit else rounded


def server_settings(cfg: LearnerConfig, model_dir: str) -> dict[str, Any]:
    """ServerConfig fields by name for the run's server (`cfg.server` overrides each): the learner's
    dtype and adapter serving on this device, LoRA buffers of the adapter's rank, and the workload's
    max_model_len."""
    return {
        "dtype": server_dtype(),
        "adapter_serving": adapter_serving(),
        "max_lora_rank": lora_rank_slot(cfg.lora.r),
        "max_model_len": workload_model_len(cfg, model_dir),
        **cfg.server,
    }


ENGINE_THREADS_MIN_PARAMS = 10_000_000
"""From this many base parameters on, the learner's local server's engine gets every core (below,
a decode step is too little work to split: the fixed cost of each parallel region dominates)."""


def local_server_settings(cfg: LearnerConfig, model_dir: str, base_params: int) -> dict[str, Any]:
    """`server_settings` for the learner's local server, which shares the learner's machine. On
    CPU without `overlap` the learner waits while the server samples and the server idles while
    the learner trains, so the engine of a model of `base_params` >= ENGINE_THREADS_MIN_PARAMS
    gets every core (`cpu_threads`; the server's own default keeps one for its API process).
    Measured on 2 cores: the 25M bench model's 4 x 8 x 256-token rollouts took 6.4 s with 2
    threads instead of 10.5 s with 1 (bench/compare_trl.py); the 0.59M tiny model's 0.57 s
    instead of 0.44 s. With `overlap` both run at once and the default stays."""
    settings = server_settings(cfg, model_dir)
    if not torch.cuda.is_available() and not cfg.overlap and base_params >= ENGINE_THREADS_MIN_PARAMS:
        settings.setdefault("cpu_threads", len(os.sched_getaffinity(0)))
    return settings


def prepare_server(cfg: LearnerConfig, policy: PeftModel, model_dir: str, out_dir: Path) -> Path:
    """Write what a server for this run loads into `out_dir`: the base it must serve
    (out_dir/served-base when the learner's base is 4-bit, else `model_dir` itself) and its flags
    (out_dir/server.args, written atomically). Returns the flags file."""
    out_dir.mkdir(parents=True, exist_ok=True)
    served = served_base(policy, model_dir, cfg, out_dir / "served-base")
    args = ["--model", served, *server_flags(server_settings(cfg, model_dir))]
    fd, tmp = tempfile.mkstemp(prefix=f".{SERVER_ARGS_FILE}-", dir=out_dir)
    with os.fdopen(fd, "w") as f:
        f.write("".join(f"{arg}\n" for arg in args))
    final = out_dir / SERVER_ARGS_FILE
    os.replace(tmp, final)
    return final
