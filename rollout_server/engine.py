"""The engine interface the service drives, and its vLLM implementation.

`RolloutEngine` is the seam: `VllmEngine` is the real thing; unit tests of the HTTP layer put a
fake with the same methods behind the same service.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from pydantic import JsonValue

from shared.config import ServerConfig
from shared.device import check_gpu_usable
from shared.errors import EngineDeadError, InvalidRequestError
from shared.prompts import prompt_token_ids
from shared.schemas import Completion, Prompt, RolloutRequest, TokenLogprobs

log = logging.getLogger("rollout_server")


class Generated(NamedTuple):
    """What the engine generates for one prompt."""

    completions: list[Completion]
    """Exactly `request.n`."""
    prompt_logprobs: list[TokenLogprobs | None] | None
    """With `request.prompt_logprobs`: PromptRollout.prompt_logprobs; else None."""


@dataclass(frozen=True)
class LoraHandle:
    """One loaded adapter version as the engine knows it, by `int_id`."""

    name: str
    int_id: int
    path: str

    @property
    def engine_name(self) -> str:
        """The version's own name in the engine, `name#int_id`.

        vLLM's LoRARequest hashes and compares by name only: two versions under one name merge in
        the worker's set of active adapters, and with requests in flight on both the engine dies
        (KeyError in punica_wrapper). A name per version keeps them apart.
        """
        return f"{self.name}#{self.int_id}"


class RolloutEngine(Protocol):
    """What the service needs from an inference engine."""

    device: str
    """'cuda' or 'cpu': whether sleeping can release memory."""
    max_model_len: int
    """Longest prompt + completion the engine serves: ServerConfig.max_model_len, or when that is
    None the model's own limit."""
    vocab_size: int
    """Token ids a prompt may hold are 0 .. vocab_size - 1."""
    model_runner: str
    """The engine's model runner, as /health names it (HealthResponse.model_runner)."""

    def tokenize(self, prompt: Prompt, chat_template_kwargs: Mapping[str, JsonValue]) -> list[int]:
        """Token ids of a prompt: a text as the tokenizer encodes it (BOS when it adds one), or a
        conversation through the chat template (shared.prompts), with `chat_template_kwargs`. A
        conversation the template refuses is an InvalidRequestError."""
        ...

    def decode(self, token_ids: list[int]) -> str:
        """The text of `token_ids`, special tokens included (what the sample log shows of a prompt)."""
        ...

    def token_texts(self, token_ids: list[int]) -> list[str]:
        """Each token decoded alone, special tokens included (a character split over several tokens
        shows as U+FFFD in each), for OpenAI-style logprobs."""
        ...

    async def generate(
        self,
        prompt_token_ids: list[int],
        request: RolloutRequest,
        seed: int | None,
        lora: LoraHandle | None,
        request_id: str,
    ) -> Generated:
        """Exactly `request.n` completions of one prompt (and its prompt log-probabilities when asked)."""
        ...

    async def add_lora(self, lora: LoraHandle) -> None:
        """Load an adapter version; raises if the engine refuses it."""
        ...

    async def remove_lora(self, int_id: int) -> None:
        """Drop an adapter version no request uses any more."""
        ...

    async def load_weights(self, directory: str) -> None:
        """Replace the served weights in place by a checkpoint's (safetensors in `directory`, the
        base model's tensor names), and drop every prefix-cache entry computed with the old ones.
        No request may be running: vLLM does not protect them."""
        ...

    async def merge_adapter(self, adapter_dir: str | None) -> None:
        """Serve the base model's weights with the peft LoRA in `adapter_dir` merged in (None: the
        base's own), merged by the engine itself from the adapter's files and the base checkpoint
        (`inplace_merge`), and drop every prefix-cache entry computed with the old weights. No
        request may be running."""
        ...

    async def sleep(self, level: int) -> None:
        """Release device memory (level 1: offload weights; level 2: discard them)."""
        ...

    async def wake_up(self, level: int) -> None:
        """Undo `sleep(level)`; after level 2 the weights are reloaded from disk."""
        ...

    def dead_reason(self) -> str | None:
        """Why the engine can no longer serve (its process died, its loop failed); None while it lives."""
        ...

    def shutdown(self) -> None:
        """Stop the engine and its processes."""
        ...


def _by_id(step: dict) -> TokenLogprobs:
    """vLLM's {token id: Logprob} at one position, as plain log-probabilities."""
    return {token_id: logprob.logprob for token_id, logprob in step.items()}


def engine_args(cfg: ServerConfig, device: str):
    """vLLM's `AsyncEngineArgs` for `cfg` on `device` ("cuda" or "cpu")."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    return AsyncEngineArgs(
        model=cfg.model,
        # Merged serving never sends a LoRARequest: without LoRA layers the engine runs at base speed.
        enable_lora=cfg.adapter_serving == "lora",
        max_lora_rank=cfg.max_lora_rank,
        max_loras=cfg.max_loras,
        max_model_len=cfg.max_model_len,
        dtype=cfg.dtype,
        seed=cfg.seed,
        # The learner compares its logprobs (at the sampling temperature) with these.
        logprobs_mode="processed_logprobs",
        enable_sleep_mode=cfg.enable_sleep_mode and device == "cuda",
        # Level 1 otherwise keeps the CUDA-graph pool (~0.5-1 GB) on the GPU while the learner trains;
        # with this vLLM 0.32 backs it up to CPU memory and restores it in place on wake.
        sleep_mode_offload_cudagraph=cfg.enable_sleep_mode and device == "cuda",
        gpu_memory_utilization=cfg.gpu_memory_utilization,
        # On CPU the model runs in the engine core process, not a third spawned one (whose imports
        # took ~15 s): start to /health 40 s instead of 55 s (medians of 8, tiny model, 2 cores).
        # vLLM's CPU platform keeps "uni" only with VLLM_ENABLE_V1_MULTIPROCESSING=0 (VllmEngine).
        distributed_executor_backend="uni" if device == "cpu" else None,
        # Gives vLLM's worker `merge_adapter`, which merged serving's in-place swaps call.
        worker_extension_cls=(
            "rollout_server.inplace_merge.InPlaceMergeExtension"
            if cfg.adapter_serving == "merged" and cfg.merged_swap == "inplace"
            else ""
        ),
    )


class VllmEngine:
    """`RolloutEngine` over vLLM's in-process `AsyncLLM`, with LoRA enabled unless adapters are
    served merged into the weights."""

    def __init__(self, cfg: ServerConfig) -> None:
        # vLLM is imported here, not at module import: the fake-engine tests and `--help` must not
        # pay for (or need) it.
        import torch
        from vllm.v1.engine.async_llm import AsyncLLM

        check_gpu_usable(torch.cuda.is_available(), torch.__version__, torch.version.cuda)  # no silent CPU
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self._model = cfg.model
        if self.device == "cpu":
            # Tiny models need little KV cache; vLLM's CPU default (4 GiB) is wasteful here.
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
            # Else vLLM's CPU platform turns engine_args' "uni" executor back into "mp". AsyncLLM
            # still starts its engine core as a process of its own: only the worker moves into it.
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            # The engine core (spawned: it reads this at start) now runs the model itself, and no
            # longer gets the threads vLLM set for its worker (one core left to the scheduler). At
            # torch's default, 2 threads on 2 cores, each rollout took 1.5-5 s instead of 0.2 s.
            # ServerConfig.cpu_threads has the figures of other settings.
            if cfg.cpu_threads is not None:
                os.environ["OMP_NUM_THREADS"] = str(cfg.cpu_threads)
            os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) - 1)))
        self._llm = AsyncLLM.from_engine_args(engine_args(cfg, self.device))
        self._tokenizer = self._llm.get_tokenizer()
        self.max_model_len = self._llm.model_config.max_model_len  # derived by vLLM when cfg's is None
        # A vLLM issue reported LoRA silently ignored after a level-1 wake under the v2 runner.
        self.model_runner = "v2" if self._llm.vllm_config.use_v2_model_runner else "v1"
        # vLLM's own bound on prompt ids: the model's embedding rows or the tokenizer's ids, whichever
        # is larger (Qwen's embeddings have rows no token uses).
        self.vocab_size = max(self._llm.model_config.get_vocab_size(), self._tokenizer.max_token_id + 1)

    @property
    def async_llm(self):
        """The vLLM AsyncLLM this engine drives (bench/direct_rollouts.py compares the server with it)."""
        return self._llm

    def tokenize(self, prompt: Prompt, chat_template_kwargs: Mapping[str, JsonValue]) -> list[int]:
        from jinja2 import TemplateError

        try:
            return prompt_token_ids(self._tokenizer, prompt, chat_template_kwargs=chat_template_kwargs)
        except (TemplateError, ValueError) as e:
            # The template's own raise_exception (roles must alternate, ...) or transformers' refusal
            # to continue a final message the template drops: the request's, not the server's.
            raise InvalidRequestError(f"the model's chat template cannot render the conversation: {e}") from e

    def decode(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(token_ids)

    def token_texts(self, token_ids: list[int]) -> list[str]:
        return [self._tokenizer.decode([token_id]) for token_id in token_ids]

    async def generate(
        self,
        prompt_token_ids: list[int],
        request: RolloutRequest,
        seed: int | None,
        lora: LoraHandle | None,
        request_id: str,
    ) -> Generated:
        from vllm import SamplingParams, TokensPrompt
        from vllm.exceptions import VLLMValidationError
        from vllm.lora.request import LoRARequest
        from vllm.sampling_params import RequestOutputKind
        from vllm.v1.engine.exceptions import EngineDeadError as VllmEngineDeadError

        try:
            params = SamplingParams(
                n=request.n,
                max_tokens=request.max_tokens,
                temperature=request.temperature,
                top_p=request.top_p,
                top_k=request.top_k,
                seed=seed,
                stop=request.stop or None,
                logprobs=request.logprobs,  # the sampled token's logprob at every position (+ the top k)
                prompt_logprobs=request.prompt_logprobs,
                # The default streaming kind can end with fewer than n completions (measured: 6 of 8).
                output_kind=RequestOutputKind.FINAL_ONLY,
            )
        except VLLMValidationError as e:
            raise InvalidRequestError(str(e)) from e
        lora_request = LoRARequest(lora.engine_name, lora.int_id, lora.path) if lora else None
        final = None
        try:
            # Cancelling this coroutine (a sibling failed, the client left) aborts the request in vLLM.
            async for output in self._llm.generate(
                TokensPrompt(prompt_token_ids=prompt_token_ids),
                params,
                request_id,
                lora_request=lora_request,
            ):
                final = output
        except VllmEngineDeadError as e:
            raise EngineDeadError(self.dead_reason() or "the vLLM engine core is dead") from e
        assert final is not None and len(final.outputs) == request.n, "vLLM lost completions"
        completions = [
            Completion(
                text=out.text,
                token_ids=list(out.token_ids),
                logprobs=[step[tok].logprob for tok, step in zip(out.token_ids, out.logprobs or [], strict=True)],
                finish_reason=out.finish_reason,
                stop_reason=out.stop_reason,
                top_logprobs=[_by_id(step) for step in out.logprobs or []] if request.logprobs else None,
            )
            for out in sorted(final.outputs, key=lambda o: o.index)
        ]
        prompt_logprobs = None
        if request.prompt_logprobs is not None:
            prompt_logprobs = [None if step is None else _by_id(step) for step in final.prompt_logprobs or []]
        return Generated(completions, prompt_logprobs)

    async def add_lora(self, lora: LoraHandle) -> None:
        from vllm.lora.request import LoRARequest

        if not await self._llm.add_lora(LoRARequest(lora.engine_name, lora.int_id, lora.path)):
            raise RuntimeError(f"vLLM refused adapter {lora.name!r} at {lora.path}")

    async def remove_lora(self, int_id: int) -> None:
        await self._llm.remove_lora(int_id)

    async def load_weights(self, directory: str) -> None:
        from vllm.v1.engine.exceptions import EngineDeadError as VllmEngineDeadError

        try:
            # Runs in the engine core between steps; tensors cannot be passed instead of a path (the
            # RPC turns them into lists). The reload also points vLLM's model path at `directory`.
            await self._llm.collective_rpc("reload_weights", kwargs={"weights_path": directory})
            # The cache is keyed by token ids only: KV computed by the old weights would be reused.
            reset = await self._llm.reset_prefix_cache()
        except VllmEngineDeadError as e:
            raise EngineDeadError(self.dead_reason() or "the vLLM engine core is dead") from e
        if not reset:  # vLLM keeps the cache while requests hold blocks of it
            raise RuntimeError("vLLM did not reset its prefix cache after a weight reload: a request still runs")

    async def merge_adapter(self, adapter_dir: str | None) -> None:
        from vllm.v1.engine.exceptions import EngineDeadError as VllmEngineDeadError

        try:
            # Runs in the engine core between steps; paths, not tensors (the RPC turns tensors into
            # lists). The base is named: a rewrite's reload points vLLM's own model path elsewhere.
            (merged,) = await self._llm.collective_rpc("merge_adapter", args=(self._model, adapter_dir))
            reset = await self._llm.reset_prefix_cache()  # keyed by token ids only, as in load_weights
        except VllmEngineDeadError as e:
            raise EngineDeadError(self.dead_reason() or "the vLLM engine core is dead") from e
        if not reset:
            raise RuntimeError("vLLM did not reset its prefix cache after a merge: a request still runs")
        log.info(
            "merged %s in place: %d modules in %.3f s", adapter_dir or "nothing", merged["modules"], merged["seconds"]
        )

    async def sleep(self, level: int) -> None:
        # On CPU vLLM logs "sleep mode is not supported on CPU, ignore it." and releases nothing;
        # the service still keeps the state machine, so calling it is harmless.
        await self._llm.sleep(level)

    async def wake_up(self, level: int) -> None:
        await self._llm.wake_up()
        if level == 2 and self.device == "cuda":
            # Level 2 discarded the weights; bring them back from the model directory (named: a
            # merged serving's reload pointed vLLM's own model path at its merged copy).
            await self._llm.collective_rpc("reload_weights", kwargs={"weights_path": self._model})
        await self._llm.reset_prefix_cache()

    def dead_reason(self) -> str | None:
        if not self._llm.errored:
            return None
        return "the vLLM engine core is dead (its process exited or its output loop failed; traceback in this log)"

    def shutdown(self) -> None:
        self._llm.shutdown()
