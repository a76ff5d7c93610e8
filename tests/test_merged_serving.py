"""Merged adapter serving (--adapter-serving merged): the merge math with hand-derived values, and
the service's swaps over a fake engine, with both --merged-swap modes (real vLLM:
test_merged_serving_integration.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from rollout_server.app import build_app
from rollout_server.cli import parse_config
from rollout_server.merge import lora_pairs, lora_scaling, merged_stacked, merged_weights, stacked_layout
from rollout_server.service import RolloutService
from shared.adapter_hash import adapter_sha256
from shared.config import ServerConfig
from shared.errors import AdapterLoadError, AdapterVersionError, ServerAsleepError
from shared.schemas import LoadLoraAdapterRequest, RolloutRequest
from tests.fakes import BASE_WEIGHTS, FakeEngine, write_base_config, write_fake_adapter

Q = "model.layers.0.self_attn.q_proj.weight"
PEFT_Q = "base_model.model.model.layers.0.self_attn.q_proj"

# --- the math ----------------------------------------------------------------------------------


def test_merged_weight_is_w_plus_alpha_over_r_times_b_a() -> None:
    # r = 2, alpha = 4: scaling 2.
    # B @ A = [[1, 0], [0, -1]] @ [[1, 2, 3], [0, 1, 0]] = [[1, 2, 3], [0, -1, 0]]
    # W + 2 * B @ A = [[1, 0, 0], [0, 1, 0]] + [[2, 4, 6], [0, -2, 0]] = [[3, 4, 6], [0, -1, 0]]
    base = {Q: torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), "model.norm.weight": torch.ones(3)}
    adapter = {
        f"{PEFT_Q}.lora_A.weight": torch.tensor([[1.0, 2.0, 3.0], [0.0, 1.0, 0.0]]),
        f"{PEFT_Q}.lora_B.weight": torch.tensor([[1.0, 0.0], [0.0, -1.0]]),
    }
    merged = merged_weights(base, adapter, {"r": 2, "lora_alpha": 4})
    assert merged.keys() == {Q}  # only what the adapter targets
    torch.testing.assert_close(merged[Q], torch.tensor([[3.0, 4.0, 6.0], [0.0, -1.0, 0.0]]))
    assert base[Q][0, 0] == 1.0  # the base tensor is not modified in place


@pytest.mark.parametrize(
    ("adapter_config", "scaling"),
    [
        ({"r": 4, "lora_alpha": 8}, 2.0),  # alpha / r
        ({"r": 4, "lora_alpha": 8, "use_rslora": True}, 4.0),  # alpha / sqrt(r) = 8 / 2
        ({"r": 4, "lora_alpha": 8, "use_rslora": False, "rank_pattern": {}, "use_dora": False}, 2.0),  # peft's keys
        ({"r": 4}, 2.0),  # no lora_alpha: peft's default 8
    ],
)
def test_scaling_follows_peft(adapter_config: dict, scaling: float) -> None:
    assert lora_scaling(adapter_config) == scaling


def test_merge_keeps_the_base_dtype_and_rounds_once() -> None:
    # A bfloat16 base, a float32 adapter: 1 + 1 * (1 * 0.01) = 1.01 in float32, then rounded once to
    # the nearest bfloat16 (spacing 2^-7 above 1): 1.0078125 (1.015625 is farther).
    base = {Q: torch.tensor([[1.0]], dtype=torch.bfloat16)}
    adapter = {f"{PEFT_Q}.lora_A.weight": torch.tensor([[0.01]]), f"{PEFT_Q}.lora_B.weight": torch.tensor([[1.0]])}
    merged = merged_weights(base, adapter, {"r": 1, "lora_alpha": 1})
    assert merged[Q].dtype == torch.bfloat16
    assert merged[Q].item() == 1.0078125


def test_peft_names_map_to_checkpoint_names() -> None:
    keys = [
        f"{PEFT_Q}.lora_A.weight",
        f"{PEFT_Q}.lora_B.weight",
        "base_model.model.model.layers.1.mlp.down_proj.lora_A.default.weight",  # with the adapter's name
        "base_model.model.model.layers.1.mlp.down_proj.lora_B.default.weight",
    ]
    assert lora_pairs(keys) == {
        "model.layers.0.self_attn.q_proj.weight": (keys[0], keys[1]),
        "model.layers.1.mlp.down_proj.weight": (keys[2], keys[3]),
    }


@pytest.mark.parametrize(
    ("keys", "needle"),
    [
        ([f"{PEFT_Q}.lora_A.weight"], "without its other half"),
        (["base_model.model.model.embed_tokens.lora_embedding_A"], "only lora_A / lora_B"),  # embedding LoRA
        ([f"{PEFT_Q}.lora_magnitude_vector.weight"], "only lora_A / lora_B"),  # DoRA
        (["base_model.model.model.layers.0.self_attn.q_proj.bias"], "only lora_A / lora_B"),  # bias="all"
        (["base_model.model.lm_head.modules_to_save.default.weight"], "only lora_A / lora_B"),
    ],
)
def test_what_a_merge_cannot_apply_is_refused(keys: list[str], needle: str) -> None:
    with pytest.raises(AdapterLoadError, match=needle):
        lora_pairs(keys)


@pytest.mark.parametrize(
    ("adapter_config", "needle"),
    [
        ({"r": 4, "lora_alpha": 8, "use_dora": True}, "use_dora"),
        ({"r": 4, "lora_alpha": 8, "fan_in_fan_out": True}, "fan_in_fan_out"),
        ({"r": 4, "lora_alpha": 8, "rank_pattern": {"q_proj": 2}}, "rank_pattern"),
        ({"r": 4, "lora_alpha": 8, "alpha_pattern": {"q_proj": 2}}, "alpha_pattern"),
        ({"r": 4, "lora_alpha": "8"}, "lora_alpha"),
    ],
)
def test_lora_variants_a_plain_merge_gets_wrong_are_refused(adapter_config: dict, needle: str) -> None:
    with pytest.raises(AdapterLoadError, match=needle):
        lora_scaling(adapter_config)


@pytest.mark.parametrize(
    ("base", "a_shape", "b_shape", "needle"),
    [
        ({}, (1, 3), (2, 1), "does not hold"),
        ({Q: torch.zeros(2, 4)}, (1, 3), (2, 1), "cannot add"),  # another base's width
        ({Q: torch.zeros(2, 3)}, (2, 3), (2, 1), "rank 2"),  # A and B of different ranks
    ],
)
def test_a_merge_that_does_not_fit_the_base_is_refused(
    base: dict, a_shape: tuple[int, int], b_shape: tuple[int, int], needle: str
) -> None:
    adapter = {f"{PEFT_Q}.lora_A.weight": torch.ones(a_shape), f"{PEFT_Q}.lora_B.weight": torch.ones(b_shape)}
    with pytest.raises(AdapterLoadError, match=needle):
        merged_weights(base, adapter, {"r": 1, "lora_alpha": 1})


# --- the math of an in-place merge: vLLM's stacked weights --------------------------------------

PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}  # Qwen2's


def test_a_stacked_projection_names_its_module_and_every_shard_in_order() -> None:
    attn, mlp = "model.layers.0.self_attn", "model.layers.1.mlp"
    names = [f"{attn}.k_proj.weight", f"{attn}.o_proj.weight", f"{mlp}.up_proj.weight", f"{mlp}.gate_proj.weight"]
    assert stacked_layout(names, PACKED) == {
        # k_proj alone targeted: the whole stack is listed (it is repacked whole), in vLLM's order
        f"{attn}.qkv_proj": [f"{attn}.q_proj.weight", f"{attn}.k_proj.weight", f"{attn}.v_proj.weight"],
        f"{attn}.o_proj": [f"{attn}.o_proj.weight"],  # packed nowhere: a module of its own
        f"{mlp}.gate_up_proj": [f"{mlp}.gate_proj.weight", f"{mlp}.up_proj.weight"],  # up before gate: once
    }
    assert stacked_layout(["lm_head.weight"], PACKED) == {"lm_head": ["lm_head.weight"]}  # no parent module


def test_a_stacked_merge_adds_each_shards_delta_to_its_own_rows() -> None:
    # A qkv weight of 4 rows, input 2: q = rows 0-1, k = row 2, v = row 3. Scaling 2.
    # q: B @ A = [[1], [-1]] @ [[1, 0]] = [[1, 0], [-1, 0]]; x 2 = [[2, 0], [-2, 0]]: rows 0-1 become
    #    [[1, 0], [0, 1]] + that = [[3, 0], [-2, 1]].
    # k: B @ A = [[1]] @ [[1, 2]] = [[1, 2]]; x 2 = [[2, 4]]: row 2 becomes [2, 2] + [2, 4] = [4, 6].
    # v: no LoRA: row 3 stays [3, 3].
    base = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    loras = {
        0: (torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0], [-1.0]])),
        1: (torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0]])),
    }
    merged = merged_stacked(base, [2, 1, 1], loras, 2.0)
    torch.testing.assert_close(merged, torch.tensor([[3.0, 0.0], [-2.0, 1.0], [4.0, 6.0], [3.0, 3.0]]))
    assert base[2].tolist() == [2.0, 2.0]  # the base is not modified in place


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_stacked_merge_is_the_rewrite_merge_bit_for_bit(dtype: torch.dtype) -> None:
    """The in-place swap serves exactly what the rewrite path serves: the same rounding, per shard."""
    generator = torch.Generator().manual_seed(0)
    names = [f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv"]
    base = {
        name: torch.randn(rows, 16, generator=generator).to(dtype) for name, rows in zip(names, [16, 8, 8], strict=True)
    }
    adapter = {}
    for name in names[:2]:  # q and k; v keeps the base
        peft = f"base_model.model.{name.removesuffix('.weight')}"
        adapter[f"{peft}.lora_A.weight"] = torch.randn(4, 16, generator=generator)
        adapter[f"{peft}.lora_B.weight"] = torch.randn(base[name].shape[0], 4, generator=generator)
    rewritten = base | merged_weights(base, adapter, {"r": 4, "lora_alpha": 8})
    pairs = lora_pairs(adapter)
    loras = {i: (adapter[pairs[n][0]], adapter[pairs[n][1]]) for i, n in enumerate(names) if n in pairs}
    stacked = merged_stacked(torch.cat([base[n] for n in names]), [16, 8, 8], loras, 2.0)
    assert torch.equal(stacked, torch.cat([rewritten[n] for n in names]))


# --- the service, over a fake engine -------------------------------------------------------------


def merged_config(tmp_path: Path, merged_swap: str) -> ServerConfig:
    return ServerConfig(
        model=str(write_base_config(tmp_path / "base")),
        adapter_root=tmp_path / "adapters",
        adapter_serving="merged",
        merged_swap=merged_swap,
        max_lora_rank=8,
        max_model_len=64,
    )


@pytest.fixture(params=["inplace", "rewrite"])
def cfg(tmp_path: Path, request: pytest.FixtureRequest) -> ServerConfig:
    return merged_config(tmp_path, request.param)


def rollout(client: TestClient, adapter: str | None = None) -> dict:
    r = client.post("/v1/rollouts", json={"prompts": ["hi"], "n": 2, "max_tokens": 3, "adapter": adapter})
    assert r.status_code == 200, r.text
    return r.json()


def load(client: TestClient, path: str, name: str = "policy", **body) -> dict:
    r = client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_the_flag_comes_from_the_config() -> None:
    assert parse_config(["--model", "m", "--adapter-serving", "merged"])[0].adapter_serving == "merged"
    assert ServerConfig(model="m").adapter_serving == "lora"
    assert parse_config(["--model", "m", "--merged-swap", "rewrite"])[0].merged_swap == "rewrite"
    assert ServerConfig(model="m").merged_swap == "inplace"


def test_a_merged_adapter_is_served_with_no_lora_and_the_base_comes_back_on_unload(cfg: ServerConfig) -> None:
    root = cfg.adapter_root
    write_fake_adapter(root / "v1")  # q_proj += 8 * 1
    write_fake_adapter(root / "v2", value=2.0)  # q_proj += 8 * 2
    write_fake_adapter(root / "other")
    engine = FakeEngine()
    with TestClient(build_app(cfg, api_key="", engine_factory=lambda _: engine)) as client:
        assert rollout(client)["policy_version"] == 0  # nothing merged: the base serves

        assert load(client, "v1")["sha256"] == adapter_sha256(root / "v1")
        torch.testing.assert_close(engine.weights[Q], torch.full((16, 16), 0.5 + 8.0))
        k = "model.layers.0.self_attn.k_proj.weight"
        torch.testing.assert_close(engine.weights[k], BASE_WEIGHTS[k])  # untargeted: the base's, unchanged
        body = rollout(client, "policy")
        assert body["policy_version"] == 1
        assert body["results"][0]["completions"][0]["token_ids"][0] == 0  # the engine got no LoRA
        assert engine.loras == {}

        # From the pristine base, never from v1's merge: 0.5 + 16, not 0.5 + 8 + 16.
        assert load(client, "v2", version=7)["version"] == 7
        torch.testing.assert_close(engine.weights[Q], torch.full((16, 16), 0.5 + 16.0))
        assert rollout(client, "policy")["policy_version"] == 7

        r = client.post("/v1/rollouts", json={"prompts": ["hi"], "max_tokens": 3})
        assert r.status_code == 409 and "'policy' is merged" in r.json()["detail"]
        r = client.post("/v1/load_lora_adapter", json={"lora_name": "second", "lora_path": "other"})
        assert r.status_code == 409 and "unload it before loading 'second'" in r.json()["detail"]
        assert client.post("/v1/rollouts", json={"prompts": ["hi"], "adapter": "second"}).status_code == 404
        models = client.get("/v1/models").json()["data"]
        assert [(m["id"], m["kind"], m["version"], m["sha256"]) for m in models] == [
            ("base", "base", 0, None),
            ("policy", "lora", 7, adapter_sha256(root / "v2")),
        ]

        assert client.post("/v1/unload_lora_adapter", json={"lora_name": "policy"}).status_code == 200
        loads = engine.weight_loads
        assert loads == 3  # v1, v2, the base
        torch.testing.assert_close(engine.weights[Q], BASE_WEIGHTS[Q])
        assert rollout(client)["policy_version"] == 0
        assert client.post("/v1/rollouts", json={"prompts": ["hi"], "adapter": "policy"}).status_code == 404
        assert load(client, "other", name="second")["version"] == 1  # another name, once unloaded


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda root: write_fake_adapter(root / "bad", layer=5), "does not hold"),  # a layer the base lacks
        (lambda root: write_fake_adapter(root / "bad", rank=16), "max_lora_rank=8"),  # check_adapter's refusal
    ],
)
def test_an_adapter_that_cannot_be_merged_is_refused_and_the_old_version_serves_on(
    cfg: ServerConfig, make: Callable[[Path], object], needle: str
) -> None:
    write_fake_adapter(cfg.adapter_root / "v1")
    make(cfg.adapter_root)
    engine = FakeEngine()
    with TestClient(build_app(cfg, api_key="", engine_factory=lambda _: engine)) as client:
        load(client, "v1")
        r = client.post("/v1/load_lora_adapter", json={"lora_name": "policy", "lora_path": "bad"})
        assert r.status_code == 400 and needle in r.json()["detail"] and "lora_path 'bad'" in r.json()["detail"]
        assert engine.weight_loads == 1  # refused before the drain: the engine was never touched
        assert rollout(client, "policy")["policy_version"] == 1
        assert load(client, "v1")["version"] == 2  # the refused load took no version number


async def until(condition: Callable[[], bool]) -> None:
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out")


def test_a_swap_waits_for_running_rollouts_and_new_ones_wait_for_the_swap(cfg: ServerConfig) -> None:
    """v1 rollout running -> load v2 -> a rollout arrives: the v1 rollout finishes on v1's weights,
    then the weights are swapped, then the new rollout runs on v2's and is stamped 2."""

    async def scenario(service: RolloutService, engine: FakeEngine) -> None:
        write_fake_adapter(cfg.adapter_root / "v1")
        write_fake_adapter(cfg.adapter_root / "v2", value=2.0)
        request = RolloutRequest(prompts=["a"], n=1, max_tokens=3, adapter="p")
        await service.load_adapter(LoadLoraAdapterRequest(lora_name="p", lora_path="v1"))
        engine.gate = asyncio.Event()
        running = asyncio.create_task(service.rollout(request))
        await until(lambda: len(engine.generated_on) == 1)
        swap = asyncio.create_task(service.load_adapter(LoadLoraAdapterRequest(lora_name="p", lora_path="v2")))
        await until(lambda: not service._weights_ready.is_set())  # the merge is written; the drain began
        arriving = asyncio.create_task(service.rollout(request))
        await asyncio.sleep(0.05)
        assert engine.weight_loads == 1 and len(engine.generated_on) == 1  # both wait
        engine.gate.set()
        old = await running
        await swap
        new = await arriving
        assert old.policy_version == 1 and new.policy_version == 2
        assert engine.generated_on == [1, 2]  # each ran on its own version's weights
        torch.testing.assert_close(engine.weights[Q], torch.full((16, 16), 0.5 + 16.0))

    run(cfg, scenario)


def test_a_rollout_pinned_during_a_swap_is_checked_against_the_version_it_would_run_on(cfg: ServerConfig) -> None:
    """v1 rollout running -> load v2 -> rollouts pinned to 1 and to 2 arrive: both wait for the swap,
    then the one pinned to 1 is refused (it would run on v2's weights) and the one pinned to 2 runs."""

    def pinned(version: int) -> RolloutRequest:
        return RolloutRequest(prompts=["a"], n=1, max_tokens=3, adapter="p", version=version)

    async def scenario(service: RolloutService, engine: FakeEngine) -> None:
        write_fake_adapter(cfg.adapter_root / "v1")
        write_fake_adapter(cfg.adapter_root / "v2", value=2.0)
        await service.load_adapter(LoadLoraAdapterRequest(lora_name="p", lora_path="v1"))
        engine.gate = asyncio.Event()
        running = asyncio.create_task(service.rollout(pinned(1)))
        await until(lambda: len(engine.generated_on) == 1)
        swap = asyncio.create_task(service.load_adapter(LoadLoraAdapterRequest(lora_name="p", lora_path="v2")))
        await until(lambda: not service._weights_ready.is_set())
        pinned_1 = asyncio.create_task(service.rollout(pinned(1)))
        pinned_2 = asyncio.create_task(service.rollout(pinned(2)))
        await asyncio.sleep(0.05)
        assert not pinned_1.done()  # version 1 still serves, but the swap is under way: it waits
        engine.gate.set()
        assert (await running).policy_version == 1
        await swap
        with pytest.raises(AdapterVersionError, match="serves version 2"):
            await pinned_1
        assert (await pinned_2).policy_version == 2
        assert engine.generated_on == [1, 2]  # the refused rollout generated nothing

    run(cfg, scenario)


def run(cfg: ServerConfig, scenario: Callable[[RolloutService, FakeEngine], Awaitable[None]]) -> None:
    async def main() -> None:
        engine = FakeEngine()
        service = RolloutService(cfg, engine)
        try:
            await scenario(service, engine)
        finally:
            await service.close()

    asyncio.run(main())


def test_waking_from_level_2_reloads_the_merged_weights_and_unload_waits_for_wake(cfg: ServerConfig) -> None:
    async def scenario(service: RolloutService, engine: FakeEngine) -> None:
        write_fake_adapter(cfg.adapter_root / "v1")
        await service.load_adapter(LoadLoraAdapterRequest(lora_name="p", lora_path="v1"))
        await service.sleep(2)
        with pytest.raises(ServerAsleepError):
            await service.unload_adapter("p")  # a reload on a sleeping engine: refused, still merged
        await service.wake_up()
        assert engine.weight_loads == 2  # level 2 discarded them: the merged weights again, not the base's
        torch.testing.assert_close(engine.weights[Q], torch.full((16, 16), 0.5 + 8.0))
        await service.unload_adapter("p")
        torch.testing.assert_close(engine.weights[Q], BASE_WEIGHTS[Q])

    run(cfg, scenario)


def test_merged_checkpoints_are_deleted_when_replaced_and_on_close(tmp_path: Path) -> None:
    cfg = merged_config(tmp_path, "rewrite")

    async def scenario() -> None:
        service = RolloutService(cfg, FakeEngine())
        write_fake_adapter(cfg.adapter_root / "v1")
        root = service._merged_root
        assert root is not None and root.is_dir()
        for _ in range(3):
            await service.load_adapter(LoadLoraAdapterRequest(lora_name="p", lora_path="v1"))
        assert len(list(root.iterdir())) == 1  # only the served one
        await service.close()
        assert not root.exists()

    asyncio.run(scenario())


def test_merged_serving_needs_a_safetensors_base(cfg: ServerConfig) -> None:
    (Path(cfg.model) / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="needs a safetensors checkpoint"):
        RolloutService(cfg, FakeEngine())


def test_an_inplace_swap_hands_the_engine_the_adapter_directory_and_writes_nothing(tmp_path: Path) -> None:
    cfg = merged_config(tmp_path, "inplace")

    async def scenario() -> None:
        engine = FakeEngine()
        service = RolloutService(cfg, engine)
        v1, v2 = write_fake_adapter(cfg.adapter_root / "v1"), write_fake_adapter(cfg.adapter_root / "v2", value=2.0)
        for name in ("v1", "v2"):
            await service.load_adapter(LoadLoraAdapterRequest(lora_name="p", lora_path=name))
        await service.unload_adapter("p")
        assert engine.merges == [str(v1), str(v2), None]  # None: the base's own weights
        assert service._merged_root is None and engine.loras == {}
        await service.close()

    asyncio.run(scenario())


class RewritingEngine(FakeEngine):
    """Rewrites the adapter directory `rewrite` (once) just before merging an adapter: a learner
    saving over a directory while a server loads it."""

    rewrite: Path | None = None

    async def merge_adapter(self, adapter_dir: str | None) -> None:
        if self.rewrite is not None:
            write_fake_adapter(self.rewrite, value=3.0)
            self.rewrite = None
        await super().merge_adapter(adapter_dir)


def test_an_adapter_rewritten_while_the_engine_merges_it_is_refused_and_the_old_one_merged_again(
    tmp_path: Path,
) -> None:
    cfg = merged_config(tmp_path, "inplace")
    engine = RewritingEngine()
    v1 = write_fake_adapter(cfg.adapter_root / "v1")
    v2 = write_fake_adapter(cfg.adapter_root / "v2", value=2.0)
    with TestClient(build_app(cfg, api_key="", engine_factory=lambda _: engine)) as client:
        load(client, "v1")
        engine.rewrite = v2
        r = client.post("/v1/load_lora_adapter", json={"lora_name": "policy", "lora_path": "v2"})
        assert r.status_code == 400 and "'v2' changed while it was loaded" in r.json()["detail"], r.text
        assert engine.merges == [str(v1), str(v2), str(v1)]  # v1 merged again, from the pristine base
        torch.testing.assert_close(engine.weights[Q], torch.full((16, 16), 0.5 + 8.0))
        assert rollout(client, "policy")["policy_version"] == 1
