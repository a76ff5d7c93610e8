"""HTTP routes: validate, call the service, return a schema. Errors map to HTTP in app.py."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from rollout_server.service import RolloutService
from shared.schemas import (
    AdapterInfo,
    HealthResponse,
    LoadLoraAdapterRequest,
    ModelsResponse,
    RolloutRequest,
    RolloutResponse,
    SampleRecord,
    SampleScores,
    SamplesResponse,
    SleepState,
    UnloadLoraAdapterRequest,
)


def get_service(request: Request) -> RolloutService:
    """The service the app's lifespan created."""
    return request.app.state.service


ServiceDep = Annotated[RolloutService, Depends(get_service)]


def require_api_key(request: Request, authorization: Annotated[str | None, Header()] = None) -> None:
    """With an API key configured, demand `Authorization: Bearer <key>`."""
    expected: str | None = request.app.state.api_key
    if expected is None:
        return
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.encode(), expected.encode()):
        raise HTTPException(401, "missing or wrong API key (send 'Authorization: Bearer <ROLLOUT_API_KEY>')")


public = APIRouter()
router = APIRouter(dependencies=[Depends(require_api_key)])


@public.get("/health")
async def health(service: ServiceDep) -> HealthResponse:
    return HealthResponse(is_sleeping=service.sleep_state().is_sleeping)


@router.post("/v1/rollouts")
async def rollouts(body: RolloutRequest, service: ServiceDep) -> RolloutResponse:
    return await service.rollout(body)


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(body: LoadLoraAdapterRequest, service: ServiceDep) -> AdapterInfo:
    return await service.load_adapter(body)


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(body: UnloadLoraAdapterRequest, service: ServiceDep) -> dict[str, str]:
    await service.unload_adapter(body.lora_name)
    return {"unloaded": body.lora_name}


@router.get("/v1/models")
async def models(service: ServiceDep) -> ModelsResponse:
    return ModelsResponse(data=service.models())


@router.post("/sleep")
async def sleep(service: ServiceDep, level: Annotated[int, Query(ge=1, le=2)] = 1) -> SleepState:
    return await service.sleep(level)


@router.post("/wake_up")
async def wake_up(service: ServiceDep) -> SleepState:
    return await service.wake_up()


@router.get("/is_sleeping")
async def is_sleeping(service: ServiceDep) -> SleepState:
    return service.sleep_state()


@router.get("/v1/samples")
async def samples(
    service: ServiceDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 10,
    adapter: str | None = None,
) -> SamplesResponse:
    return SamplesResponse(samples=service.samples.recent(limit, adapter))


@router.post("/v1/samples/{rollout_id}/scores")
async def post_scores(rollout_id: str, body: SampleScores, service: ServiceDep) -> SampleRecord:
    return service.samples.attach_scores(rollout_id, body)


@router.get("/metrics")
async def metrics(service: ServiceDep) -> Response:
    return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)
