"""The app factory: `build_app(cfg)` returns a FastAPI app whose lifespan owns the engine."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from rollout_server.engine import RolloutEngine, VllmEngine
from rollout_server.routes import public, router
from rollout_server.service import RolloutService
from shared.config import ServerConfig
from shared.errors import (
    AdapterLoadError,
    AdapterNotFoundError,
    InvalidRequestError,
    SampleNotFoundError,
    ServerAsleepError,
)

log = logging.getLogger("rollout_server")

# Domain errors -> HTTP, in one place.
_STATUS = {
    ServerAsleepError: 503,
    AdapterLoadError: 400,
    AdapterNotFoundError: 404,
    SampleNotFoundError: 404,
    InvalidRequestError: 422,
}


def build_app(
    cfg: ServerConfig,
    *,
    api_key: str | None = None,
    engine_factory: Callable[[ServerConfig], RolloutEngine] = VllmEngine,
) -> FastAPI:
    """The rollout server. `api_key` (default: $ROLLOUT_API_KEY; empty = none) guards every route but /health.

    `engine_factory` builds the engine inside the lifespan; tests of the HTTP layer pass a fake.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = engine_factory(cfg)
        app.state.service = RolloutService(cfg, engine)
        log.info("engine ready on %s; serving %s", engine.device, cfg.model)
        try:
            yield
        finally:
            engine.shutdown()

    app = FastAPI(title="GRPO rollout server", version="0.1.0", lifespan=lifespan)
    app.state.api_key = (api_key if api_key is not None else os.environ.get("ROLLOUT_API_KEY")) or None
    app.include_router(public)
    app.include_router(router)

    def handler(status: int) -> Callable[[Request, Exception], JSONResponse]:
        def respond(_: Request, exc: Exception) -> JSONResponse:
            return JSONResponse({"detail": str(exc)}, status_code=status)

        return respond

    for exc_type, status in _STATUS.items():
        app.add_exception_handler(exc_type, handler(status))
    return app
