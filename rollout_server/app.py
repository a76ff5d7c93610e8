"""The app factory: `build_app(cfg)` returns a FastAPI app whose lifespan owns the engine."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from rollout_server.engine import RolloutEngine, VllmEngine
from rollout_server.guard import RequestGuard
from rollout_server.http_errors import STATUS, error_body, is_openai_path
from rollout_server.openai_routes import openai_router, unserved_parameters
from rollout_server.routes import UPLOADS_PREFIX, router
from rollout_server.service import RolloutService
from shared.config import ServerConfig
from shared.errors import UnsupportedFeatureError
from shared.schemas import RolloutRequest

log = logging.getLogger("rollout_server")


def build_app(
    cfg: ServerConfig,
    *,
    api_key: str | None = None,
    engine_factory: Callable[[ServerConfig], RolloutEngine] = VllmEngine,
    on_engine_death: Callable[[FastAPI, str], None] | None = None,
) -> FastAPI:
    """The rollout server. `api_key` (default: $ROLLOUT_API_KEY; empty = none) guards every route but /health.

    `engine_factory` builds the engine inside the lifespan; tests of the HTTP layer pass a fake.
    `on_engine_death(app, reason)` runs once when the engine dies: the CLI has uvicorn shut down
    (answering what is in flight) and exit with ENGINE_DEAD_EXIT_CODE, for a supervisor to restart
    the server. By default this process gets SIGTERM.
    """
    on_engine_death = on_engine_death or _exit_nonzero

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = engine_factory(cfg)
        await warm_up(engine)
        app.state.service = service = RolloutService(cfg, engine)
        log.info("engine ready on %s (model runner %s); serving %s", engine.device, engine.model_runner, cfg.model)
        watchdog = asyncio.create_task(_watch_engine(service, lambda reason: on_engine_death(app, reason)))
        try:
            yield
        finally:
            watchdog.cancel()
            await service.close()  # the sample file gets every line already queued
            engine.shutdown()

    app = FastAPI(title="GRPO rollout server", version="0.1.0", lifespan=lifespan)
    key = (api_key if api_key is not None else os.environ.get("ROLLOUT_API_KEY")) or None
    app.add_middleware(
        RequestGuard,
        api_key=key,
        max_body_bytes=cfg.max_body_bytes,
        status=STATUS,
        error_body=error_body,
        streamed={UPLOADS_PREFIX: cfg.max_upload_bytes},
    )
    app.include_router(router)
    app.include_router(openai_router)

    def handler(status: int) -> Callable[[Request, Exception], JSONResponse]:
        def respond(request: Request, exc: Exception) -> JSONResponse:
            path = request.scope["path"]
            # An OpenAI client's parameter these routes do not take: a 400 saying what to do instead.
            if isinstance(exc, RequestValidationError) and is_openai_path(path) and (why := unserved_parameters(exc)):
                return JSONResponse(error_body(path, 400, why, UnsupportedFeatureError), status_code=400)
            return JSONResponse(error_body(path, status, _detail(exc), type(exc)), status_code=status)

        return respond

    for exc_type, status in STATUS.items():  # domain errors -> HTTP: http_errors.py
        app.add_exception_handler(exc_type, handler(status))
    app.add_exception_handler(HTTPException, _http_exception)
    return app


WARM_UP_REQUEST_ID = "warm-up"


async def warm_up(engine: RolloutEngine) -> None:
    """Generate once before the server answers anything, /health included (uvicorn serves nothing
    until the lifespan has started). vLLM does work at the first request that start-up does not:
    on CPU, torch inductor compiles C++ there, and in a container without g++ or Python's headers
    the engine died on it (measured) after /health had already answered ok. A failure here fails
    the start, which a supervisor sees as an exit."""
    started = time.monotonic()
    prompt_token_ids = engine.tokenize("Hello", {}) or [0]
    request = RolloutRequest(prompt_token_ids=[prompt_token_ids], n=1, max_tokens=2)
    await engine.generate(prompt_token_ids, request, seed=0, lora=None, request_id=WARM_UP_REQUEST_ID)
    log.info("warm-up: the engine generated its first tokens in %.1f s", time.monotonic() - started)


async def _http_exception(request: Request, exc: Exception) -> Response:
    """FastAPI's own refusals (a body that is not JSON, a wrong method) in OpenAI's shape on its
    routes; FastAPI's answer elsewhere."""
    assert isinstance(exc, HTTPException)
    path = request.scope["path"]
    if not is_openai_path(path):
        return await http_exception_handler(request, exc)
    body = error_body(path, exc.status_code, _cut(str(exc.detail), _MAX_DETAIL_CHARS))
    return JSONResponse(body, exc.status_code, headers=exc.headers)


_MAX_SHOWN_ERRORS = 10
_MAX_LOC_CHARS = 64  # an extra key's name is echoed, and may be megabytes long
_MAX_DETAIL_CHARS = 2000


def _detail(exc: Exception) -> str:
    """The error as one line of text that always serializes.

    A schema refusal lists where and why, never the input: FastAPI's default 422 echoes it, and an
    echoed NaN or lone surrogate cannot be written as JSON (a 500, and a reset keep-alive connection).
    """
    if isinstance(exc, RequestValidationError):
        errors = exc.errors()
        shown = ["{}: {}".format(".".join(_cut(str(part)) for part in e["loc"]), e["msg"]) for e in errors]
        text = "; ".join(shown[:_MAX_SHOWN_ERRORS])
        if len(shown) > _MAX_SHOWN_ERRORS:
            text += f"; and {len(shown) - _MAX_SHOWN_ERRORS} more errors"
    else:
        text = str(exc)
    text = _cut(text, _MAX_DETAIL_CHARS)
    # A field name from the request (an extra key) may hold a lone surrogate.
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _cut(text: str, limit: int = _MAX_LOC_CHARS) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


ENGINE_DEAD_EXIT_CODE = 3


async def _watch_engine(service: RolloutService, on_death: Callable[[str], None], period_s: float = 1.0) -> None:
    """Poll the engine's health; on its death, log the reason and call `on_death` once."""
    while (reason := service.dead_reason()) is None:
        await asyncio.sleep(period_s)
    log.error("%s: shutting down so that a supervisor restarts the server", reason)
    on_death(reason)


def _exit_nonzero(app: FastAPI, reason: str) -> None:
    os.kill(os.getpid(), signal.SIGTERM)
