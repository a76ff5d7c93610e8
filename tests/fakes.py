"""A fake engine behind the real `RolloutService`, for tests of the HTTP layer only.

Integration tests use real vLLM; this fake exists so the service's bookkeeping (versions,
sleep state, bounds, auth, samples) is tested in milliseconds.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from pathlib import Path

import torch
from pydantic import JsonValue
from safetensors.torch import load_file, save_file

from rollout_server.engine import Generated, LoraHandle
from rollout_server.merge import merged_weights
from shared.config import ServerConfig
from shared.schemas import Completion, Prompt, RolloutRequest

BASE_CONFIG = {
    "hidden_size": 16,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "intermediate_size": 32,
}


class FakeEngine:
    """Completions encode which adapter version made them: token ids [int_id, i, seed]. Merged
    serving's weights are the tensors `load_weights` last read, or BASE_WEIGHTS with the adapter
    `merge_adapter` last got merged in (by the real merge math)."""

    device = "cpu"
    vocab_size = 256  # it tokenizes to bytes
    model_runner = "fake"

    def __init__(self, max_model_len: int = 64) -> None:
        self.max_model_len = max_model_len  # a real engine's: ServerConfig's, or the model's own
        self.loras: dict[int, LoraHandle] = {}
        self.removed: list[int] = []
        self.sleep_calls: list[int] = []
        self.gate: asyncio.Event | None = None  # when set, generate() waits on it
        self.dead: str | None = None  # a reason: the engine is dead
        self.fail_prompt: list[int] | None = None  # generate() of this prompt raises
        self.cancelled: list[str] = []  # request ids cancelled while generating
        self.weights: dict[str, torch.Tensor] = {}  # what load_weights last read, or merge_adapter merged
        self.weight_loads = 0  # load_weights and merge_adapter calls so far: the weights changed
        self.merges: list[str | None] = []  # each merge_adapter's adapter_dir
        self.generated_on: list[int] = []  # weight_loads at each generate() call
        self.requests: list[tuple[list[int], RolloutRequest]] = []  # each generate()'s prompt and request
        self.rendered: list[tuple[str | list[dict], dict]] = []  # each tokenize()'s prompt (as JSON) and keywords

    def tokenize(self, prompt: Prompt, chat_template_kwargs: Mapping[str, JsonValue]) -> list[int]:
        self.rendered.append(
            (prompt if isinstance(prompt, str) else [m.model_dump() for m in prompt], dict(chat_template_kwargs))
        )
        text = prompt if isinstance(prompt, str) else "".join(f"{m.role}:{m.content}" for m in prompt)
        return list(text.encode())

    def decode(self, token_ids: list[int]) -> str:
        return bytes(t % 256 for t in token_ids).decode(errors="replace")

    def token_texts(self, token_ids: list[int]) -> list[str]:
        # Its completions' ids are labels ([int_id, i, seed]), not bytes of a text.
        return [f"<{t}>" for t in token_ids]

    async def generate(
        self,
        prompt_token_ids: list[int],
        request: RolloutRequest,
        seed: int | None,
        lora: LoraHandle | None,
        request_id: str,
    ) -> Generated:
        if prompt_token_ids == self.fail_prompt:
            raise RuntimeError(f"engine failure on request {request_id}")
        self.requests.append((prompt_token_ids, request))
        loads = self.weight_loads
        self.generated_on.append(loads)
        if self.gate is not None:
            try:
                await self.gate.wait()
            except asyncio.CancelledError:
                self.cancelled.append(request_id)
                raise
        lora_id = lora.int_id if lora else 0
        assert lora is None or lora.int_id in self.loras, "generated with a removed adapter"
        assert self.weight_loads == loads, "the weights were reloaded under a running request"
        completions = [
            Completion(
                text=f"v{lora_id}-{i}",
                token_ids=[lora_id, i, seed or 0],
                logprobs=[-1.0, -2.0, -3.0],
                finish_reason="length",
                # the sampled token, then the next k ids, each a nat less likely
                top_logprobs=[
                    {t: lp, **{t + j: lp - j for j in range(1, request.logprobs + 1)}}
                    for t, lp in zip([lora_id, i, seed or 0], [-1.0, -2.0, -3.0], strict=True)
                ]
                if request.logprobs
                else None,
            )
            for i in range(request.n)
        ]
        prompt_logprobs = None
        if request.prompt_logprobs is not None:  # token t at position p: -t / 100, its neighbour t + 1 more likely
            prompt_logprobs = [None] + [
                {t: -t / 100, **({t + 1: -t / 100 + 0.5} if request.prompt_logprobs else {})}
                for t in prompt_token_ids[1:]
            ]
        return Generated(completions, prompt_logprobs)

    async def add_lora(self, lora: LoraHandle) -> None:
        self.loras[lora.int_id] = lora

    async def remove_lora(self, int_id: int) -> None:
        del self.loras[int_id]
        self.removed.append(int_id)

    async def load_weights(self, directory: str) -> None:
        self.weights = {k: v for f in sorted(Path(directory).glob("*.safetensors")) for k, v in load_file(f).items()}
        self.weight_loads += 1

    async def merge_adapter(self, adapter_dir: str | None) -> None:
        self.weights = dict(BASE_WEIGHTS)
        if adapter_dir is not None:
            config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
            adapter = load_file(Path(adapter_dir) / "adapter_model.safetensors")
            self.weights |= merged_weights(BASE_WEIGHTS, adapter, config)
        self.merges.append(adapter_dir)
        self.weight_loads += 1

    async def sleep(self, level: int) -> None:
        self.sleep_calls.append(level)

    async def wake_up(self, level: int) -> None:
        pass

    def dead_reason(self) -> str | None:
        return self.dead

    def shutdown(self) -> None:
        pass


BASE_WEIGHTS = {
    "model.layers.0.self_attn.q_proj.weight": torch.full((16, 16), 0.5),
    "model.layers.0.self_attn.k_proj.weight": torch.full((8, 16), -1.0),
}
"""Layer 0 attention of BASE_CONFIG: what merged serving merges into (q_proj) or copies (k_proj)."""


def fake_server_config(tmp_path: Path, **overrides) -> ServerConfig:
    """A server config over a fake base in `tmp_path`, with small bounds the HTTP tests reach."""
    limits = {
        "max_lora_rank": 8,
        "max_n": 16,
        "max_tokens": 32,
        "max_prompts": 4,
        "max_prompt_chars": 100,
        "max_model_len": 64,
    }
    return ServerConfig(
        model=str(write_base_config(tmp_path / "base")),
        adapter_root=tmp_path / "adapters",
        **{**limits, **overrides},
    )


def write_base_config(model_dir: Path) -> Path:
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(BASE_CONFIG))
    save_file(BASE_WEIGHTS, str(model_dir / "model.safetensors"))
    return model_dir


def write_fake_adapter(
    path: Path, *, rank: int = 4, hidden: int = 16, fmt: str = "safetensors", value: float = 1.0, layer: int = 0
) -> Path:
    """A peft-shaped LoRA for q_proj of BASE_CONFIG (or of another hidden size: a wrong base): A is
    all `value`, B all ones, alpha 8, so merged into q_proj it adds 8 * value (alpha / r * r * value)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": 8}))
    tensors = {
        f"base_model.model.model.layers.{layer}.self_attn.q_proj.lora_A.weight": torch.full((rank, hidden), value),
        f"base_model.model.model.layers.{layer}.self_attn.q_proj.lora_B.weight": torch.ones(hidden, rank),
    }
    if fmt == "safetensors":
        save_file(tensors, str(path / "adapter_model.safetensors"))
    else:
        torch.save(tensors, path / "adapter_model.bin")
    return path
