"""The service's fault handling over a fake engine: versions, slots, sibling failures, sleep leases,
a dead engine. The same faults against real vLLM processes: test_server_faults.py."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from rollout_server.app import build_app
from rollout_server.service import RolloutService
from shared.config import ServerConfig
from shared.errors import AdapterBusyError
from shared.schemas import LoadLoraAdapterRequest, RolloutRequest
from tests.fakes import FakeEngine, write_base_config, write_fake_adapter


@pytest.fixture
def cfg(tmp_path: Path) -> ServerConfig:
    for v in ("v1", "v2", "v3", "w1"):
        write_fake_adapter(tmp_path / "adapters" / v)
    return ServerConfig(
        model=str(write_base_config(tmp_path / "base")),
        adapter_root=tmp_path / "adapters",
        max_lora_rank=8,
        max_model_len=64,
        max_loras=2,
        adapter_slot_wait_s=0.3,
    )


def load(name: str, path: str, version: int | None = None) -> LoadLoraAdapterRequest:
    return LoadLoraAdapterRequest(lora_name=name, lora_path=path, version=version)


def request(adapter: str | None = "p", prompts: list[str] = ["a"]) -> RolloutRequest:  # noqa: B006
    return RolloutRequest(prompts=prompts, n=2, max_tokens=3, adapter=adapter)


def test_the_load_request_sets_the_version_that_every_rollout_is_stamped_with(cfg: ServerConfig) -> None:
    async def scenario() -> None:
        service = RolloutService(cfg, FakeEngine())
        assert (await service.load_adapter(load("p", "v1", version=7))).version == 7
        assert (await service.rollout(request())).policy_version == 7
        assert (await service.load_adapter(load("p", "v2"))).version == 8  # unnumbered: the next one
        assert (await service.load_adapter(load("p", "v3", version=3))).version == 3  # a resumed learner's
        assert (await service.rollout(request())).policy_version == 3

    asyncio.run(scenario())


def test_each_version_gets_its_own_engine_name(cfg: ServerConfig) -> None:
    async def scenario() -> None:
        engine = FakeEngine()
        service = RolloutService(cfg, engine)
        await service.load_adapter(load("p", "v1"))
        engine.gate = asyncio.Event()
        running = asyncio.create_task(service.rollout(request()))
        await asyncio.sleep(0)
        await service.load_adapter(load("p", "v2"))
        names = {lora.engine_name for lora in engine.loras.values()}
        assert names == {"p#1", "p#2"}  # vLLM compares LoRARequests by name: one name per version
        engine.gate.set()
        await running

    asyncio.run(scenario())


def test_a_third_version_waits_for_a_slot_then_answers_409(cfg: ServerConfig) -> None:
    async def scenario() -> None:
        engine = FakeEngine()
        service = RolloutService(cfg, engine)
        await service.load_adapter(load("p", "v1"))
        engine.gate = asyncio.Event()
        on_v1 = asyncio.create_task(service.rollout(request()))
        await asyncio.sleep(0)
        await service.load_adapter(load("p", "v2"))
        on_v2 = asyncio.create_task(service.rollout(request()))
        await asyncio.sleep(0)
        with pytest.raises(AdapterBusyError, match="adapter slots"):  # v1 and v2 both serve requests
            await service.load_adapter(load("p", "v3"))
        assert service.models()[1].version == 2 and len(engine.loras) == 2
        # Once v1's request ends, v3 fits: the load that was waiting goes through.
        waiting = asyncio.create_task(service.load_adapter(load("p", "v3")))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        engine.gate.set()
        await asyncio.gather(on_v1, on_v2)
        assert (await waiting).version == 3
        assert sorted(engine.loras) == [3]  # v1 and v2 dropped once unused

    asyncio.run(scenario())


def test_idle_adapters_take_no_slot(cfg: ServerConfig) -> None:
    """Three adapters served by a 2-slot engine: the idle ones wait in vLLM's cache, so loads pass."""

    async def scenario() -> None:
        service = RolloutService(cfg, FakeEngine())
        await service.load_adapter(load("p", "v1"))
        await service.load_adapter(load("q", "w1"))
        assert (await asyncio.wait_for(service.load_adapter(load("r", "v2")), 5)).version == 1
        assert (await service.rollout(request("p"))).policy_version == 1

    asyncio.run(scenario())


def test_one_failing_prompt_cancels_its_siblings_and_releases_the_adapter_once(cfg: ServerConfig) -> None:
    async def scenario() -> None:
        engine = FakeEngine()
        service = RolloutService(cfg, engine)
        await service.load_adapter(load("p", "v1"))
        engine.gate = asyncio.Event()  # never set: the good prompts would wait forever
        engine.fail_prompt = list(b"bad")
        with pytest.raises(RuntimeError, match="engine failure"):
            await asyncio.wait_for(service.rollout(request(prompts=["a", "bad", "c", "d"])), 5)
        assert len(engine.cancelled) == 3  # the siblings were cancelled, not left generating
        assert service._in_flight == 0 and dict(service._users) == {1: 0}
        # The swap that follows drops v1 at once: no request holds it.
        engine.gate = None
        await service.load_adapter(load("p", "v2"))
        assert engine.removed == [1]

    asyncio.run(scenario())


def test_a_sleep_lease_wakes_the_server_by_itself(cfg: ServerConfig) -> None:
    async def scenario() -> None:
        service = RolloutService(cfg, FakeEngine())
        state = await service.sleep(1, lease_s=0.2)
        assert state.is_sleeping and 0 < state.wakes_in_s <= 0.2
        await asyncio.sleep(0.4)
        assert not service.sleep_state().is_sleeping
        # A /wake_up before the lease ends cancels it; a later sleep without a lease stays asleep.
        await service.sleep(1, lease_s=0.2)
        await service.wake_up()
        await service.sleep(1)
        await asyncio.sleep(0.4)
        assert service.sleep_state().is_sleeping and service.sleep_state().wakes_in_s is None

    asyncio.run(scenario())


def test_a_dead_engine_fails_health_refuses_work_and_triggers_exit(cfg: ServerConfig) -> None:
    engine = FakeEngine()
    deaths: list[str] = []

    def on_death(app: FastAPI, reason: str) -> None:
        deaths.append(reason)

    app = build_app(cfg, api_key="", engine_factory=lambda _: engine, on_engine_death=on_death)
    with TestClient(app) as client:
        assert client.get("/health").status_code == 200
        engine.dead = "engine core exited"
        health = client.get("/health")
        assert health.status_code == 503 and "engine core exited" in health.json()["detail"]
        rollout = client.post("/v1/rollouts", json={"prompts": ["a"], "n": 1})
        assert rollout.status_code == 503 and "engine core exited" in rollout.json()["detail"]
        assert client.post("/wake_up").status_code == 503
        for _ in range(40):  # the watchdog polls once a second
            if deaths:
                break
            client.portal.call(asyncio.sleep, 0.1)
        assert deaths == ["engine core exited"]
