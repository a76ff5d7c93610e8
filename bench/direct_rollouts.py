"""The rollout server's HTTP overhead: the same rollouts through a running server (as the learner's
RolloutClient asks for them) and through vLLM's AsyncLLM in this process, built with the server's
engine settings, taken in turn so that both meet the same machine. Run by bench/compare_trl.py.

    .venv/bin/python bench/direct_rollouts.py REQUEST.json RESULT.json

REQUEST.json: {"url" (the server, serving no adapter yet), "server" (its settings: ServerConfig
fields), "model", "prompt_token_ids", "n", "max_tokens", "temperature", "seed", "repeats"}. An
engine is built here as the server builds it (rollout_server.engine.VllmEngine, the same
settings; its processes spin idle as long as the server's do, rollout_server/idle_spin.py).
Three ways, `repeats` rounds of each in rotating order, from the base model after a warm-up each:

- http: the server, as the learner's RolloutClient asks it; with the server's own time for each
  (its `rollout_latency_seconds`, from request validated to response built), so that the
  difference is HTTP + JSON at both ends;
- direct: vLLM's AsyncLLM of the engine here, each prompt i sent as the server sends it (one
  request of n completions seeded seed + i * n, the sampled token's logprob at every position,
  the final output only, all prompts at once);
- service: the server's RolloutService over that same engine, in this process (no HTTP).

The server's overhead over AsyncLLM is then HTTP + JSON plus service against direct: both on one
engine, so that the difference is the server's own code. http against direct compares two engine
instances (the server's and this one), which differ by more than that on 2 cores (a batch varies
+-50% from one to the next; each instance sets its engine's threads by itself), so it is reported
but not read as the overhead.

RESULT.json: {"http": {"seconds": [...], "server_seconds": [...], "token_ids": the last batch's
completions, per prompt}, "direct": {"seconds": [...], "token_ids": ...}, "service": {"seconds":
[...]}}; seconds[i] of every way form round i.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import time
import uuid
from pathlib import Path

import httpx
import uvloop

from learner.rollout_client import RolloutClient
from rollout_server.engine import VllmEngine
from rollout_server.idle_spin import IDLE_SPIN_VAR, limit_idle_spin_from_env
from rollout_server.service import RolloutService
from shared.config import ServerConfig
from shared.schemas import RolloutRequest

# vLLM spawns its engine processes, which import this module: there, as in the server's, idle
# spinning is limited to what measure() puts in the environment.
limit_idle_spin_from_env()


async def direct_rollout(llm, request: dict) -> tuple[float, list[list[list[int]]]]:
    """Seconds for one batch of every prompt's n completions through `llm`, and their token ids."""
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
        async for output in llm.generate(TokensPrompt(prompt_token_ids=ids), params, uuid.uuid4().hex):
            final = output
        return [list(out.token_ids) for out in sorted(final.outputs, key=lambda o: o.index)]

    start = time.perf_counter()
    token_ids = await asyncio.gather(*(one_prompt(i, ids) for i, ids in enumerate(request["prompt_token_ids"])))
    return time.perf_counter() - start, token_ids


def server_rollout_seconds(url: str) -> float:
    """The server's total time in rollouts so far (its latency histogram's sum)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return float(re.search(r"^rollout_latency_seconds_sum (\S+)$", text, re.MULTILINE).group(1))


def rollout_body(request: dict) -> RolloutRequest:
    """The batch of REQUEST.json as the server takes it."""
    return RolloutRequest(
        prompt_token_ids=request["prompt_token_ids"],
        n=request["n"],
        max_tokens=request["max_tokens"],
        temperature=request["temperature"],
        seed=request["seed"],
    )


def http_rollout(client: RolloutClient, request: dict) -> tuple[float, list[list[list[int]]]]:
    """Seconds for the same batch through the server, and its token ids."""
    body = rollout_body(request)
    start = time.perf_counter()
    response = client.generate(body, expected_version=0)
    seconds = time.perf_counter() - start
    return seconds, [[c.token_ids for c in r.completions] for r in response.results]


async def service_rollout(service: RolloutService, request: dict) -> float:
    """Seconds for the same batch through the server's RolloutService, in this process."""
    body = rollout_body(request)
    start = time.perf_counter()
    await service.rollout(body)
    return time.perf_counter() - start


async def measure(request: dict) -> dict:
    cfg = ServerConfig(model=request["model"], **request["server"])
    os.environ[IDLE_SPIN_VAR] = str(cfg.engine_idle_spin_s)
    engine = VllmEngine(cfg)  # the server's engine, with the server's arguments
    llm = engine.async_llm
    service = RolloutService(cfg, engine)  # the server's rollout path on that engine, without HTTP
    client = RolloutClient(request["url"])
    # Before each rollout the other engine's processes stop spinning (engine_idle_spin_s after their
    # last message), so that neither way pays for the other's.
    settle_s = cfg.engine_idle_spin_s + 0.05
    try:
        # The learner's client blocks; nothing else runs on this loop meanwhile.
        http_rollout(client, request)  # warm-up
        await direct_rollout(llm, request)
        await service_rollout(service, request)
        http_s, server_s, direct_s, service_s = [], [], [], []
        for i in range(request["repeats"]):
            ways = ["http", "direct", "service"]
            for way in ways[i % 3 :] + ways[: i % 3]:
                await asyncio.sleep(settle_s)
                if way == "http":
                    before = server_rollout_seconds(request["url"])
                    seconds, http_ids = http_rollout(client, request)
                    server_s.append(server_rollout_seconds(request["url"]) - before)
                    http_s.append(seconds)
                elif way == "direct":
                    seconds, direct_ids = await direct_rollout(llm, request)
                    direct_s.append(seconds)
                else:
                    service_s.append(await service_rollout(service, request))
        return {
            "http": {"seconds": http_s, "server_seconds": server_s, "token_ids": http_ids},
            "direct": {"seconds": direct_s, "token_ids": direct_ids},
            "service": {"seconds": service_s},
        }
    finally:
        client.close()
        engine.shutdown()


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
