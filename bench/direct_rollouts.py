"""Rollouts through vLLM's AsyncLLM in this process, with the rollout server's engine settings: the
baseline against which bench/compare_trl.py measures the server's HTTP overhead.

    .venv/bin/python bench/direct_rollouts.py REQUEST.json RESULT.json

REQUEST.json: {"model", "adapter" (a peft adapter directory), "max_lora_rank", "prompt_token_ids",
"n", "max_tokens", "temperature", "seed", "repeats"}. The engine is built as
rollout_server.engine.VllmEngine builds it, from the server's defaults (ServerConfig) but float32
and that rank; its processes spin idle as long as the server's do (rollout_server/idle_spin.py).
Each prompt i is sent as the server sends it: one request of n completions seeded seed + i * n, the
sampled token's logprob at every position, the final output only. For the base model, then through
the adapter: one warm-up batch, then `repeats` timed batches (all prompts at once, as the server
runs them), on the event loop the server runs on.

RESULT.json: {"base" | "lora": {"seconds": [...], "token_ids": the last batch's completions, per
prompt}}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
import uuid
from pathlib import Path

import uvloop

from rollout_server.idle_spin import IDLE_SPIN_VAR, limit_idle_spin_from_env
from shared.config import ServerConfig

# vLLM spawns its engine processes, which import this module: there, as in the server's, idle
# spinning is limited to what main() puts in the environment.
limit_idle_spin_from_env()


async def rollout(llm, request: dict, lora) -> tuple[float, list[list[list[int]]]]:
    """Seconds for one batch of every prompt's n completions, and their token ids."""
    from vllm import SamplingParams, TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    async def one_prompt(i: int, ids: list[int]) -> list[list[int]]:
        params = SamplingParams(
            n=request["n"],
            max_tokens=request["max_tokens"],
            temperature=request["temperature"],
            seed=request["seed"] + i * request["n"],
            logprobs=0,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        final = None
        async for output in llm.generate(
            TokensPrompt(prompt_token_ids=ids), params, uuid.uuid4().hex, lora_request=lora
        ):
            final = output
        return [list(out.token_ids) for out in sorted(final.outputs, key=lambda o: o.index)]

    start = time.perf_counter()
    token_ids = await asyncio.gather(*(one_prompt(i, ids) for i, ids in enumerate(request["prompt_token_ids"])))
    return time.perf_counter() - start, token_ids


async def measure(request: dict) -> dict:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.lora.request import LoRARequest
    from vllm.v1.engine.async_llm import AsyncLLM

    cfg = ServerConfig(model=request["model"], dtype="float32", max_lora_rank=request["max_lora_rank"])
    os.environ[IDLE_SPIN_VAR] = str(cfg.engine_idle_spin_s)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # as the server sets it on CPU
    llm = AsyncLLM.from_engine_args(
        AsyncEngineArgs(
            model=cfg.model,
            enable_lora=True,
            max_lora_rank=cfg.max_lora_rank,
            max_loras=cfg.max_loras,
            max_model_len=cfg.max_model_len,
            dtype=cfg.dtype,
            seed=cfg.seed,
            logprobs_mode="processed_logprobs",
        )
    )
    try:
        lora = LoRARequest("policy#1", 1, request["adapter"])
        await llm.add_lora(lora)
        result = {}
        for name, lora_request in (("base", None), ("lora", lora)):
            await rollout(llm, request, lora_request)  # warm-up
            timed = [await rollout(llm, request, lora_request) for _ in range(request["repeats"])]
            result[name] = {"seconds": [s for s, _ in timed], "token_ids": timed[-1][1]}
        return result
    finally:
        llm.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("request", type=Path, help="JSON written by bench/compare_trl.py")
    parser.add_argument("result", type=Path, help="where to write the timings (JSON)")
    args = parser.parse_args()
    # The server's event loop: uvicorn runs uvloop when it is installed, as it is with vLLM.
    result = uvloop.run(measure(json.loads(args.request.read_text())))
    args.result.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
