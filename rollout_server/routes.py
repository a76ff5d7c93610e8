"""HTTP routes: validate, call the service, return a schema. Errors map to HTTP in http_errors.py,
and each route declares those it raises (`responses=`) so the OpenAPI schema lists every status it
answers; the API key and the body size are checked before routing, in guard.py."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from rollout_server.http_errors import UNPARSED_BODY, error_responses
from rollout_server.samples_page import INITIAL_LIMIT, SAMPLES_PAGE_HEADERS, render_page
from rollout_server.service import RolloutService
from rollout_server.uploads import SHA256_PATTERN
from shared.errors import (
    AdapterBusyError,
    AdapterLoadError,
    AdapterNotFoundError,
    AdapterVersionError,
    EngineDeadError,
    InvalidRequestError,
    MergedAdapterError,
    SampleNotFoundError,
    ServerAsleepError,
)
from shared.schemas import (
    AdapterDigest,
    AdapterDigestRequest,
    AdapterInfo,
    AdapterUpload,
    HealthResponse,
    LoadLoraAdapterRequest,
    ModelCard,
    ModelsResponse,
    RewardCurvesResponse,
    RolloutKind,
    RolloutRequest,
    RolloutResponse,
    SampleRecord,
    SampleScores,
    SamplesResponse,
    SleepState,
    UnloadLoraAdapterRequest,
)

T = TypeVar("T")


def get_service(request: Request) -> RolloutService:
    """The service the app's lifespan created."""
    return request.app.state.service


ServiceDep = Annotated[RolloutService, Depends(get_service)]


router = APIRouter()


@router.get("/health", responses=error_responses(EngineDeadError, public=True))
async def health(service: ServiceDep) -> HealthResponse:
    if (reason := service.dead_reason()) is not None:
        raise EngineDeadError(reason)
    engine = service.engine
    return HealthResponse(
        is_sleeping=service.sleep_state().is_sleeping, device=engine.device, model_runner=engine.model_runner
    )


@router.post(
    "/v1/rollouts",
    responses=error_responses(
        UNPARSED_BODY,
        RequestValidationError,
        InvalidRequestError,
        AdapterNotFoundError,
        AdapterVersionError,
        MergedAdapterError,
        ServerAsleepError,
        EngineDeadError,
    ),
)
async def rollouts(body: RolloutRequest, service: ServiceDep, request: Request) -> RolloutResponse:
    return await cancelled_on_disconnect(request, service.rollout(body))


async def cancelled_on_disconnect(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Await `work`, cancelling it if the client disconnects first (vLLM then aborts its requests).

    The body has been read, so the next ASGI message is the disconnect (or comes after the response).
    """
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        task.cancel()

    watcher = asyncio.create_task(watch())
    try:
        return await task
    except asyncio.CancelledError:
        if not task.cancelled() or asyncio.current_task().cancelling():
            raise  # this handler itself was cancelled
        # Undeclared in the OpenAPI schema: no client is left to read it (it shows in the access log).
        raise HTTPException(499, "the client disconnected; its rollout was aborted") from None
    finally:
        watcher.cancel()


@router.post(
    "/v1/load_lora_adapter",
    responses=error_responses(
        UNPARSED_BODY,
        RequestValidationError,
        AdapterLoadError,
        AdapterBusyError,
        MergedAdapterError,
        ServerAsleepError,
        EngineDeadError,
    ),
)
async def load_lora_adapter(body: LoadLoraAdapterRequest, service: ServiceDep) -> AdapterInfo:
    return await service.load_adapter(body)


@router.post("/v1/adapter_digest", responses=error_responses(UNPARSED_BODY, RequestValidationError, AdapterLoadError))
async def adapter_digest(body: AdapterDigestRequest, service: ServiceDep) -> AdapterDigest:
    """The sha256 of a directory under the adapter root (null: none there): a learner compares it
    with its own hash to learn whether it shares the adapter folder or must upload."""
    return await service.adapter_digest(body.lora_path)


UPLOADS_PREFIX = "/v1/adapter_uploads/"


@router.put(
    UPLOADS_PREFIX + "{sha256}",
    openapi_extra={
        "requestBody": {
            "required": True,
            "description": "an uncompressed tar of the adapter's files (flat, as peft saves them)",
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        }
    },
    responses=error_responses(RequestValidationError, AdapterLoadError),
)
async def upload_adapter(
    sha256: Annotated[str, PathParam(pattern=SHA256_PATTERN, description="adapter_sha256 of the files sent")],
    request: Request,
    service: ServiceDep,
) -> AdapterUpload:
    """Place an adapter sent by a learner that does not share the adapter root under
    uploads/<sha256>, to load from there; refused unless its files hash to `sha256`. Bounded by
    the server's max_upload_bytes, not max_body_bytes."""
    return await service.upload_adapter(sha256, request.stream())


@router.post(
    "/v1/unload_lora_adapter",
    # 503s only in merged serving, where an unload reloads the base weights.
    responses=error_responses(
        UNPARSED_BODY, RequestValidationError, AdapterNotFoundError, ServerAsleepError, EngineDeadError
    ),
)
async def unload_lora_adapter(body: UnloadLoraAdapterRequest, service: ServiceDep) -> dict[str, str]:
    await service.unload_adapter(body.lora_name)
    return {"unloaded": body.lora_name}


@router.get("/v1/models", responses=error_responses())
async def models(service: ServiceDep) -> ModelsResponse:
    return ModelsResponse(data=service.models())


@router.get(
    "/v1/models/{model_id:path}", responses=error_responses(RequestValidationError, AdapterNotFoundError, openai=True)
)
async def model(model_id: str, service: ServiceDep) -> ModelCard:
    """OpenAI's retrieve-model route: the base model or a served adapter, by its id in /v1/models."""
    for card in service.models():
        if card.id == model_id:
            return card
    raise AdapterNotFoundError(
        f"the model {model_id!r} does not exist here: GET /v1/models lists the base model and the served adapters"
    )


@router.post("/sleep", responses=error_responses(RequestValidationError, EngineDeadError))
async def sleep(
    service: ServiceDep,
    level: Annotated[int, Query(ge=1, le=2)] = 1,
    lease_s: Annotated[float | None, Query(gt=0, le=86_400, description="wake by itself after this")] = None,
) -> SleepState:
    return await service.sleep(level, lease_s)


@router.post("/wake_up", responses=error_responses(EngineDeadError))
async def wake_up(service: ServiceDep) -> SleepState:
    return await service.wake_up()


@router.get("/is_sleeping", responses=error_responses())
async def is_sleeping(service: ServiceDep) -> SleepState:
    return service.sleep_state()


@router.get("/v1/samples", responses=error_responses(RequestValidationError))
async def samples(
    service: ServiceDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 10,
    adapter: str | None = None,
    run: Annotated[str | None, Query(description="only the rollouts of this learner run")] = None,
    kind: Annotated[RolloutKind | None, Query(description="only rollouts of this kind")] = None,
    tokens: Annotated[bool, Query(description="false: without token ids and logprobs (texts only)")] = True,
) -> SamplesResponse:
    return SamplesResponse(samples=service.samples.recent(limit, adapter, run=run, kind=kind, tokens=tokens))


@router.get("/v1/samples/curves", responses=error_responses())
async def reward_curves(service: ServiceDep) -> RewardCurvesResponse:
    """Each run's mean reward per step, from every score posted (also of rollouts the log dropped)."""
    return RewardCurvesResponse(curves=service.samples.curves())


@router.post(
    "/v1/samples/{rollout_id}/scores",
    responses=error_responses(UNPARSED_BODY, RequestValidationError, SampleNotFoundError, InvalidRequestError),
)
async def post_scores(rollout_id: str, body: SampleScores, service: ServiceDep) -> SampleRecord:
    return await service.samples.attach_scores(rollout_id, body)


# response_class=Response: no media type of its own, so the errors stay declared as JSON.
@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}},
        **error_responses(),
    },
)
async def metrics(service: ServiceDep) -> Response:
    return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get(
    "/ui",
    response_class=Response,  # as /metrics: the errors stay declared as JSON
    responses={
        200: {"description": "the samples page", "content": {"text/html": {"schema": {"type": "string"}}}},
        **error_responses(),
    },
)
async def samples_page(service: ServiceDep) -> HTMLResponse:
    """The samples page: recent rollouts with their prompts, completions and scores, each run's
    reward curve and two versions side by side, refreshed every 3 s. With an API key, open it as
    /ui?key=<key> (a browser sends no Authorization header when it navigates); the page sends the
    key on as the Bearer header."""
    samples = service.samples.recent(INITIAL_LIMIT, tokens=False)
    initial = {
        "samples": [s.model_dump(mode="json") for s in samples],
        "curves": [c.model_dump(mode="json") for c in service.samples.curves()],
    }
    return HTMLResponse(render_page(initial), headers=SAMPLES_PAGE_HEADERS)
