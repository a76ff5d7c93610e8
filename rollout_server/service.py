"""The server's state: adapters and their versions, the sleep state machine, recorded samples.

Routes call this; this calls the engine. Everything here runs on the event loop, so a check
followed by a state change with no `await` between them is atomic.

Adapters are served one of two ways (ServerConfig.adapter_serving). lora: each version is a vLLM
LoRA, and versions of several names serve side by side. merged: one adapter at a time is merged
into the weights the engine samples from; a load drains (new rollouts wait, running ones finish
on the old weights), changes the engine's weights in place (ServerConfig.merged_swap: the engine
merges the adapter itself, or reloads a merged checkpoint written before the drain) and publishes
the version, all before any waiting rollout starts: a rollout runs on one version, the one it is
stamped with.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge, Histogram
from prometheus_client import Counter as PromCounter

from rollout_server.adapters import (
    adapter_digest,
    check_adapter,
    check_mergeable,
    directory_digest,
    shown_path,
    write_merged,
)
from rollout_server.engine import Generated, LoraHandle, RolloutEngine
from rollout_server.samples import SampleStore, cut_text
from rollout_server.uploads import prune_uploads, receive_upload
from shared.config import ServerConfig
from shared.errors import (
    AdapterBusyError,
    AdapterLoadError,
    AdapterNotFoundError,
    AdapterVersionError,
    ConfigError,
    EngineDeadError,
    InvalidRequestError,
    MergedAdapterError,
    ServerAsleepError,
)
from shared.schemas import (
    PROMPT_TEXT_CHARS,
    AdapterDigest,
    AdapterInfo,
    AdapterUpload,
    LoadLoraAdapterRequest,
    ModelCard,
    PromptRollout,
    RolloutRequest,
    RolloutResponse,
    SampleRecord,
    SleepState,
    prompt_chars,
)

log = logging.getLogger("rollout_server")


@dataclass(frozen=True)
class _Served:
    handle: LoraHandle
    version: int
    loaded_at: datetime
    sha256: str
    """`adapter_sha256` of the adapter directory, as loaded."""
    merged: bool = False
    """Merged serving: this adapter is merged into the weights the engine samples from."""
    merged_dir: Path | None = None
    """Merged serving with merged_swap='rewrite': the checkpoint written for it (the base with it
    merged in), which the engine reloaded."""


class _Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = PromCounter(
            "rollout_requests", "Rollout requests by outcome", ["outcome"], registry=self.registry
        )
        self.completions = PromCounter("rollout_completions", "Completions generated", registry=self.registry)
        self.tokens = PromCounter("rollout_generated_tokens", "Completion tokens generated", registry=self.registry)
        self.latency = Histogram("rollout_latency_seconds", "Rollout request latency", registry=self.registry)
        self.in_flight = Gauge("rollout_in_flight", "Rollout requests being generated", registry=self.registry)
        self.sleeping = Gauge("rollout_sleeping", "1 while the server sleeps", registry=self.registry)
        self.adapter_version = Gauge(
            "rollout_adapter_version", "Serving version", ["lora_name"], registry=self.registry
        )


class RolloutService:
    """Serves rollouts from the base model or a named adapter version, and sleeps on request."""

    def __init__(self, cfg: ServerConfig, engine: RolloutEngine) -> None:
        self.cfg = cfg
        self.engine = engine
        self.samples = SampleStore(cfg)
        self.metrics = _Metrics()
        self._base_config = json.loads((Path(cfg.model) / "config.json").read_text())
        self._adapters: dict[str, _Served] = {}
        self._versions: Counter[str] = Counter()  # never reset, so versions only grow per name
        self._next_int_id = 1
        self._users: Counter[int] = Counter()  # in-flight requests per adapter int_id
        self._retired: set[int] = set()  # replaced versions to drop once no request uses them
        self._sleep_level: int | None = None
        self._lease: asyncio.Task | None = None  # wakes the server when a sleep's lease ends
        self._wake_at: float | None = None  # time.monotonic() of that
        self._slot_freed = asyncio.Event()  # set whenever a request releases an adapter version
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._lock = asyncio.Lock()  # one load/unload/sleep/wake at a time
        self._weights_ready = asyncio.Event()  # cleared while merged serving swaps weights
        self._weights_ready.set()
        self._merged_root: Path | None = None  # merged_swap='rewrite': where merged checkpoints are written
        if cfg.adapter_serving == "merged":
            if not any(Path(cfg.model).glob("*.safetensors")):
                raise ConfigError(f"adapter_serving='merged' needs a safetensors checkpoint in {cfg.model}")
            if cfg.merged_swap == "rewrite":
                self._merged_root = Path(tempfile.mkdtemp(prefix="rollout-merged-"))

    async def close(self) -> None:
        """Flush the sample log and delete the merged checkpoints."""
        await self.samples.close()
        if self._merged_root is not None:
            await asyncio.to_thread(shutil.rmtree, self._merged_root, ignore_errors=True)

    # --- rollouts -----------------------------------------------------------------------------

    async def rollout(self, request: RolloutRequest) -> RolloutResponse:
        """K completions per prompt from the requested adapter's current version (which must be
        `request.version`, when that is given)."""
        self._check_bounds(request)
        self._check_engine()
        # A merged serving's swap is under way: start on the new weights. Re-checked after every
        # wake-up (another swap may begin first); from here to _acquire nothing awaits, so the
        # version read (and checked against request.version) below is the one the whole rollout
        # runs on.
        while not self._weights_ready.is_set():
            await self._weights_ready.wait()
        if self._sleep_level is not None:
            self.metrics.requests.labels("asleep").inc()
            raise ServerAsleepError("the server is asleep (POST /wake_up first); no rollout was generated")
        served = self._serving(request.adapter, request.version)
        prompt_ids = request.prompt_token_ids or [
            self.engine.tokenize(p, request.chat_template_kwargs) for p in request.prompts or []
        ]
        vocab_size = self.engine.vocab_size
        for i, ids in enumerate(prompt_ids):
            if not ids:
                raise InvalidRequestError(f"prompt {i} has no token: the engine cannot complete an empty prompt")
            if min(ids) < 0 or max(ids) >= vocab_size:
                bad = next(t for t in ids if not 0 <= t < vocab_size)
                raise InvalidRequestError(
                    f"prompt {i} holds token id {bad}, outside the model's vocabulary (ids 0 .. {vocab_size - 1}, "
                    f"vocab_size={vocab_size})"
                )
            if len(ids) + request.max_tokens > self.engine.max_model_len:
                raise InvalidRequestError(
                    f"prompt {i} has {len(ids)} tokens; with max_tokens={request.max_tokens} it exceeds "
                    f"max_model_len={self.engine.max_model_len}"
                )
        # A merged adapter is in the weights themselves: the engine gets no LoRA.
        handle = served.handle if served and not served.merged else None
        rollout_id = uuid.uuid4().hex
        start = time.perf_counter()
        self._acquire(handle)
        try:
            generated = await self._generate_all(prompt_ids, request, handle, rollout_id)
        except asyncio.CancelledError:  # the client left (or the server stops)
            self.metrics.requests.labels("cancelled").inc()
            raise
        except Exception:
            self.metrics.requests.labels("error").inc()
            raise
        finally:
            await self._release(handle)
        prompts = request.prompts or [None] * len(prompt_ids)
        results = [
            PromptRollout(prompt=p, prompt_token_ids=ids, completions=g.completions, prompt_logprobs=g.prompt_logprobs)
            for p, ids, g in zip(prompts, prompt_ids, generated, strict=True)
        ]
        response = RolloutResponse(
            rollout_id=rollout_id,
            adapter=request.adapter,
            policy_version=served.version if served else 0,
            results=results,
            created_at=datetime.now(UTC),
        )
        await self.samples.add(
            SampleRecord(
                **response.model_dump(),
                run=request.run,
                kind=request.kind,
                prompt_texts=[cut_text(self.engine.decode(ids), PROMPT_TEXT_CHARS) for ids in prompt_ids],
            )
        )
        self.metrics.requests.labels("ok").inc()
        self.metrics.latency.observe(time.perf_counter() - start)
        self.metrics.completions.inc(sum(len(r.completions) for r in results))
        self.metrics.tokens.inc(sum(len(c.token_ids) for r in results for c in r.completions))
        return response

    async def _generate_all(
        self, prompt_ids: list[list[int]], request: RolloutRequest, handle: LoraHandle | None, rollout_id: str
    ) -> list[Generated]:
        """Each prompt's completions; the first failure cancels the other prompts (vLLM aborts them)
        and is raised as itself."""
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [
                    group.create_task(
                        self.engine.generate(
                            ids,
                            request,
                            # vLLM seeds child j of an n > 1 request with seed + j: striding prompts
                            # by n gives every completion of the request its own stream.
                            None if request.seed is None else request.seed + i * request.n,
                            handle,
                            f"{rollout_id}-{i}",
                        )
                    )
                    for i, ids in enumerate(prompt_ids)
                ]
        except BaseExceptionGroup as failed:
            raise failed.exceptions[0] from None
        return [task.result() for task in tasks]

    def _check_bounds(self, request: RolloutRequest) -> None:
        cfg = self.cfg
        if request.n > cfg.max_n:
            raise InvalidRequestError(f"n={request.n} exceeds the server's max_n={cfg.max_n}")
        if request.max_tokens > cfg.max_tokens:
            raise InvalidRequestError(
                f"max_tokens={request.max_tokens} exceeds the server's max_tokens={cfg.max_tokens}"
            )
        if request.num_prompts == 0:
            raise InvalidRequestError("the request holds no prompt")
        if request.num_prompts > cfg.max_prompts:
            raise InvalidRequestError(
                f"{request.num_prompts} prompts exceed the server's max_prompts={cfg.max_prompts}"
            )
        for i, prompt in enumerate(request.prompts or []):
            if prompt_chars(prompt) > cfg.max_prompt_chars:
                raise InvalidRequestError(
                    f"prompt {i} has {prompt_chars(prompt)} characters, more than "
                    f"max_prompt_chars={cfg.max_prompt_chars}"
                )

    def _acquire(self, handle: LoraHandle | None) -> None:
        self._in_flight += 1
        self.metrics.in_flight.set(self._in_flight)
        self._idle.clear()
        if handle:
            self._users[handle.int_id] += 1

    async def _release(self, handle: LoraHandle | None) -> None:
        self._in_flight -= 1
        self.metrics.in_flight.set(self._in_flight)
        if self._in_flight == 0:
            self._idle.set()
        if handle:
            self._users[handle.int_id] -= 1
            await self._drop_if_unused(handle.int_id)
            self._slot_freed.set()

    # --- adapters -----------------------------------------------------------------------------

    def _served(self, name: str) -> _Served:
        served = self._adapters.get(name)
        if served is None:
            raise AdapterNotFoundError(f"no adapter named {name!r} is loaded (GET /v1/models lists them)")
        return served

    def _serving(self, adapter: str | None, version: int | None) -> _Served | None:
        """What a rollout of `adapter` (None: the base) runs on. MergedAdapterError for the base
        while an adapter is merged into the weights: it would sample the adapter's weights.

        AdapterVersionError unless the adapter's served version is `version` (None: any). An
        adapter not held at all is that error too, not AdapterNotFoundError (404): a server that
        missed a publish has fallen behind, which its pool must tell from a wrong name."""
        if adapter is None:
            if (merged := self._merged()) is not None:
                raise MergedAdapterError(
                    f"adapter {merged.handle.name!r} is merged into the weights this server samples from "
                    "(--adapter-serving merged): the base model is served again once it is unloaded"
                )
            return None  # the request's version is None or 0 (RolloutRequest checks it)
        served = self._adapters.get(adapter)
        if version is not None and (served is None or served.version != version):
            serves = "no version" if served is None else f"version {served.version}"
            raise AdapterVersionError(
                f"asked for adapter {adapter!r} version {version}, this server serves {serves} of it; "
                "no completion was generated"
            )
        return self._served(adapter)

    def _merged(self) -> _Served | None:
        """The adapter merged into the served weights, if any."""
        return next((s for s in self._adapters.values() if s.merged), None)

    async def load_adapter(self, request: LoadLoraAdapterRequest) -> AdapterInfo:
        """Load `lora_path` as the next version of `lora_name`; the old version serves on failure.

        Requests already running keep the version they started with; the old version is removed
        from the engine once the last of them finishes.

        The answer's sha256 is `adapter_sha256` of the directory, hashed before the engine (or the
        merge) reads it and again after: a directory rewritten in between hashes otherwise the
        second time and is refused (AdapterLoadError; the engine drops what it read), so the hash
        reported is that of the bytes loaded. Not caught: a rewrite undone byte for byte before
        the second hash, and, in LoRA serving, a rewrite after the load (vLLM reads the directory
        again to reload an adapter it evicted from its CPU cache). Version directories are written
        once, to a temp dir renamed into place, and never rewritten.
        """
        # Off the event loop: checking reads every tensor of the adapter, hashing every byte.
        path = await asyncio.to_thread(
            check_adapter,
            self.cfg.adapter_root,
            request.lora_path,
            base_config=self._base_config,
            max_rank=self.cfg.max_lora_rank,
        )
        sha256 = await asyncio.to_thread(adapter_digest, path, lora_path=request.lora_path)
        if self.cfg.adapter_serving == "merged":
            return await self._load_merged(request, path, sha256)
        async with self._lock:
            self._check_engine()
            if self._sleep_level is not None:
                raise ServerAsleepError("the server is asleep (POST /wake_up first); no adapter was loaded")
            await self._wait_for_slot(request.lora_name)
            handle = LoraHandle(request.lora_name, self._next_int_id, str(path))
            self._next_int_id += 1
            try:
                await self.engine.add_lora(handle)
            except Exception as e:  # the engine's own refusal: report it, keep the old version
                # Named as the client gave it: the engine's message may hold the host path.
                reason = str(e).replace(str(path), request.lora_path)
                raise AdapterLoadError(f"the engine refused lora_path {request.lora_path!r}: {reason}") from e
            try:
                await self._check_unchanged(path, sha256, request.lora_path)
            except BaseException:
                await self.engine.remove_lora(handle.int_id)  # never published: no request uses it
                raise
            old = self._adapters.get(request.lora_name)
            served = _Served(handle, self._next_version(request), datetime.now(UTC), sha256)
            self._adapters[request.lora_name] = served
            if old:
                self._retired.add(old.handle.int_id)
                await self._drop_if_unused(old.handle.int_id)
        return self._published(served)

    async def adapter_digest(self, lora_path: str) -> AdapterDigest:
        """How this server sees `lora_path` under its adapter root: its sha256, or None if absent."""
        sha256 = await asyncio.to_thread(directory_digest, self.cfg.adapter_root, lora_path)
        return AdapterDigest(lora_path=lora_path, sha256=sha256)

    async def upload_adapter(self, sha256: str, chunks: AsyncIterator[bytes]) -> AdapterUpload:
        """Place the adapter streamed as a tar in `chunks` under <adapter_root>/uploads/<sha256>
        (`uploads.receive_upload`), then delete the oldest uploads no served version loads from."""
        placed, answer = await receive_upload(
            chunks, self.cfg.adapter_root, sha256, max_bytes=self.cfg.max_upload_bytes
        )
        in_use = {Path(s.handle.path).resolve() for s in self._adapters.values()} | {placed}
        for old in await asyncio.to_thread(
            prune_uploads, self.cfg.adapter_root, keep=self.cfg.max_uploads_kept, in_use=in_use
        ):
            log.info("deleted the upload %s (over max_uploads_kept=%d)", old.name, self.cfg.max_uploads_kept)
        return answer

    def _next_version(self, request: LoadLoraAdapterRequest) -> int:
        version = request.version or self._versions[request.lora_name] + 1
        self._versions[request.lora_name] = max(self._versions[request.lora_name], version)
        return version

    async def _check_unchanged(self, path: Path, sha256: str, lora_path: str) -> None:
        """AdapterLoadError unless the adapter directory `path` still hashes to `sha256`, its hash
        before it was read."""
        now = await asyncio.to_thread(adapter_digest, path, lora_path=lora_path)
        if now != sha256:
            raise AdapterLoadError(
                f"lora_path {lora_path!r} changed while it was loaded (sha256 {sha256[:12]}... before, "
                f"{now[:12]}... after): write each version to a new directory, renamed into place"
            )

    def _published(self, served: _Served) -> AdapterInfo:
        self.metrics.adapter_version.labels(served.handle.name).set(served.version)
        return AdapterInfo(
            lora_name=served.handle.name,
            version=served.version,
            lora_path=shown_path(self.cfg.adapter_root, served.handle.path),
            sha256=served.sha256,
            loaded_at=served.loaded_at,
        )

    async def _load_merged(self, request: LoadLoraAdapterRequest, path: Path, sha256: str) -> AdapterInfo:
        """Merge the adapter at `path` (hashing to `sha256`) into the base weights and serve them as
        the next version of `lora_name`; the old version serves on if the adapter cannot be merged.

        Rollouts already running finish on the old weights first, and rollouts that arrive during
        the swap start on the new ones.
        """
        async with self._lock:
            self._check_engine()
            if self._sleep_level is not None:
                raise ServerAsleepError("the server is asleep (POST /wake_up first); no adapter was loaded")
            old = self._merged()
            if old is not None and old.handle.name != request.lora_name:
                raise MergedAdapterError(
                    f"adapter {old.handle.name!r} is merged into the served weights, and merged serving holds "
                    f"one adapter: unload it before loading {request.lora_name!r}"
                )
            handle = LoraHandle(request.lora_name, self._next_int_id, str(path))
            self._next_int_id += 1
            if self.cfg.merged_swap == "inplace":
                served = await self._merge_inplace(request, handle, sha256, old)
            else:
                served = await self._merge_rewrite(request, handle, sha256, old)
        return self._published(served)

    async def _merge_inplace(
        self, request: LoadLoraAdapterRequest, handle: LoraHandle, sha256: str, old: _Served | None
    ) -> _Served:
        """merged_swap='inplace': the engine merges the adapter into its copy of the base weights."""
        path = Path(handle.path)
        # Off the event loop, and before the drain: what the engine's merge would refuse is refused
        # here, with rollouts going on meanwhile.
        await asyncio.to_thread(check_mergeable, Path(self.cfg.model), path, lora_path=request.lora_path)
        async with self._drained():
            try:
                await self.engine.merge_adapter(str(path))
                await self._check_unchanged(path, sha256, request.lora_path)  # the engine read it
            except BaseException:
                # A merge that failed part-way leaves some layers new, a rewritten directory all of
                # them: serve the old weights.
                await self.engine.merge_adapter(old.handle.path if old else None)
                raise
            served = _Served(handle, self._next_version(request), datetime.now(UTC), sha256, merged=True)
            self._adapters[request.lora_name] = served  # before any waiting rollout starts
        return served

    async def _merge_rewrite(
        self, request: LoadLoraAdapterRequest, handle: LoraHandle, sha256: str, old: _Served | None
    ) -> _Served:
        """merged_swap='rewrite': write the merged checkpoint, and the engine reloads it."""
        assert self._merged_root is not None
        path, merged_dir = Path(handle.path), self._merged_root / str(handle.int_id)
        try:
            # Off the event loop, and before the drain: rollouts go on meanwhile.
            await asyncio.to_thread(write_merged, Path(self.cfg.model), path, merged_dir, lora_path=request.lora_path)
            await self._check_unchanged(path, sha256, request.lora_path)  # the merge read it
            async with self._drained():
                try:
                    await self.engine.load_weights(str(merged_dir))
                except BaseException:
                    # A reload that failed part-way leaves some layers new: serve the old ones.
                    await self.engine.load_weights(str(old.merged_dir if old else self.cfg.model))
                    raise
                served = _Served(
                    handle, self._next_version(request), datetime.now(UTC), sha256, merged=True, merged_dir=merged_dir
                )
                self._adapters[request.lora_name] = served  # before any waiting rollout starts
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, merged_dir, ignore_errors=True)
            raise
        if old is not None:
            await asyncio.to_thread(shutil.rmtree, old.merged_dir, ignore_errors=True)
        return served

    @contextlib.asynccontextmanager
    async def _drained(self) -> AsyncIterator[None]:
        """Run the body with no rollout running: new rollouts wait until it ends, and it starts once
        those running have finished (on the weights they started with)."""
        self._weights_ready.clear()
        try:
            await self._idle.wait()
            yield
        finally:
            self._weights_ready.set()

    def _in_use_after_load(self) -> int:
        """Adapter versions requests use once a new version is loaded: those running, plus the new
        one. Idle versions take no slot (vLLM evicts them from its cache and reloads them from disk
        on their next request)."""
        return len({int_id for int_id, users in self._users.items() if users > 0}) + 1

    async def _wait_for_slot(self, name: str) -> None:
        """Wait until the engine's max_loras slots can hold a new version of `name` next to the
        versions requests are using, at most adapter_slot_wait_s; AdapterBusyError after that."""
        slots, deadline = self.cfg.max_loras, time.monotonic() + self.cfg.adapter_slot_wait_s
        while (needed := self._in_use_after_load()) > slots:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AdapterBusyError(
                    f"a new version of {name!r} needs {needed} of the engine's {slots} adapter slots: older "
                    f"versions still serve requests after {self.cfg.adapter_slot_wait_s:.0f} s; retry when they end"
                )
            self._slot_freed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._slot_freed.wait(), remaining)

    async def unload_adapter(self, name: str) -> None:
        """Stop serving `name`; running requests finish on it first. A merged adapter gives the
        engine the base weights back (its copy of them, or reloaded from the model directory)."""
        async with self._lock:
            served = self._served(name)
            if served.merged:
                self._check_engine()
                if self._sleep_level is not None:
                    raise ServerAsleepError("the server is asleep (POST /wake_up first); the adapter stays merged")
                async with self._drained():
                    if served.merged_dir is None:
                        await self.engine.merge_adapter(None)
                    else:
                        await self.engine.load_weights(self.cfg.model)
                    del self._adapters[name]
                if served.merged_dir is not None:
                    await asyncio.to_thread(shutil.rmtree, served.merged_dir, ignore_errors=True)
            else:
                del self._adapters[name]
                self._retired.add(served.handle.int_id)
                await self._drop_if_unused(served.handle.int_id)
        self.metrics.adapter_version.remove(name)

    async def _drop_if_unused(self, int_id: int) -> None:
        if int_id in self._retired and self._users[int_id] == 0:
            self._retired.discard(int_id)
            del self._users[int_id]
            await self.engine.remove_lora(int_id)

    @property
    def base_model_id(self) -> str:
        """The base model's id in GET /v1/models: its directory's name (answers show no host path)."""
        return Path(self.cfg.model).resolve().name

    def adapter_of(self, model: str) -> str | None:
        """The adapter an OpenAI-style `model` names: None for the base model (`base_model_id`, or
        `--model` as the server was started with it), which wins over an adapter of the same name;
        AdapterNotFoundError when it names neither."""
        if model in (self.base_model_id, self.cfg.model):
            return None
        if model not in self._adapters:
            raise AdapterNotFoundError(
                f"the model {model!r} does not exist here: it is neither the base model {self.base_model_id!r} "
                "nor a loaded adapter (GET /v1/models lists them)"
            )
        return model

    def token_texts(self, token_ids: list[int]) -> list[str]:
        """Each token's text, decoded alone."""
        return self.engine.token_texts(token_ids)

    def models(self) -> list[ModelCard]:
        """The base model and every served adapter with its version."""
        base = self.base_model_id
        cards = [ModelCard(id=base, kind="base", version=0, root=base, sha256=None)]
        cards += [
            ModelCard(
                id=name,
                kind="lora",
                version=s.version,
                root=shown_path(self.cfg.adapter_root, s.handle.path),
                sha256=s.sha256,
            )
            for name, s in self._adapters.items()
        ]
        return cards

    # --- standby ------------------------------------------------------------------------------

    async def sleep(self, level: int, lease_s: float | None = None) -> SleepState:
        """Stop taking rollouts, let running ones finish, then release memory. Idempotent.

        With `lease_s`, the server wakes by itself that many seconds later unless /wake_up comes
        first (a learner that dies asleep cannot strand it); each call sets the lease anew.
        """
        async with self._lock:
            self._check_engine()
            if self._sleep_level is None:
                self._sleep_level = level  # from here on, rollouts get 503
                self.metrics.sleeping.set(1)
                await self._idle.wait()
                await self.engine.sleep(level)
            self._set_lease(lease_s)
        return self.sleep_state()

    async def wake_up(self) -> SleepState:
        """Restore what sleep released and serve again, with the same adapters. Idempotent."""
        async with self._lock:
            self._check_engine()
            self._set_lease(None)
            if self._sleep_level is not None:
                await self.engine.wake_up(self._sleep_level)
                if self._sleep_level == 2 and (merged := self._merged()) is not None:
                    # Level 2 discarded the weights and the engine reloaded the base's.
                    if merged.merged_dir is None:
                        await self.engine.merge_adapter(merged.handle.path)
                    else:
                        await self.engine.load_weights(str(merged.merged_dir))
                self._sleep_level = None
                self.metrics.sleeping.set(0)
        return self.sleep_state()

    def _set_lease(self, lease_s: float | None) -> None:
        if self._lease is not None and self._lease is not asyncio.current_task():
            self._lease.cancel()
        self._lease, self._wake_at = None, None
        if lease_s is not None:
            self._wake_at = time.monotonic() + lease_s
            self._lease = asyncio.create_task(self._wake_after(lease_s))

    async def _wake_after(self, lease_s: float) -> None:
        await asyncio.sleep(lease_s)
        log.warning("the sleep lease of %.0f s ended with no /wake_up: waking up", lease_s)
        await self.wake_up()

    # --- engine health ------------------------------------------------------------------------

    def dead_reason(self) -> str | None:
        """Why the engine cannot serve any more; None while it lives."""
        return self.engine.dead_reason()

    def _check_engine(self) -> None:
        if (reason := self.engine.dead_reason()) is not None:
            raise EngineDeadError(f"{reason}; the server is exiting so that its supervisor restarts it")

    def sleep_state(self) -> SleepState:
        """Whether the server sleeps, at which level, and what that released on this device."""
        level = self._sleep_level
        if level is None:
            released = "nothing (awake)"
        elif self.engine.device != "cuda":
            released = (
                "nothing: vLLM sleep mode needs CUDA, so on CPU the weights and KV cache stay in "
                "memory; the server only refuses rollouts until /wake_up"
            )
        elif level == 1:
            released = "model weights offloaded to CPU memory; KV cache freed"
        else:
            released = "model weights and KV cache discarded; weights reload from disk on /wake_up"
        wakes_in_s = None if self._wake_at is None else max(0.0, self._wake_at - time.monotonic())
        return SleepState(is_sleeping=level is not None, level=level, released=released, wakes_in_s=wakes_in_s)
