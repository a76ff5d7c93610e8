"""A fake engine behind the real `RolloutService`, for tests of the HTTP layer only.

Integration tests use real vLLM; this fake exists so the service's bookkeeping (versions,
sleep state, bounds, auth, samples) is tested in milliseconds.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from rollout_server.engine import LoraHandle
from shared.schemas import Completion, Prompt, RolloutRequest

BASE_CONFIG = {
    "hidden_size": 16,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "intermediate_size": 32,
}


class FakeEngine:
    """Completions encode which adapter version made them: token ids [int_id, i, seed]."""

    device = "cpu"
    vocab_size = 256  # it tokenizes to bytes

    def __init__(self, max_model_len: int = 64) -> None:
        self.max_model_len = max_model_len  # a real engine's: ServerConfig's, or the model's own
        self.loras: dict[int, LoraHandle] = {}
        self.removed: list[int] = []
        self.sleep_calls: list[int] = []
        self.gate: asyncio.Event | None = None  # when set, generate() waits on it
        self.dead: str | None = None  # a reason: the engine is dead
        self.fail_prompt: list[int] | None = None  # generate() of this prompt raises
        self.cancelled: list[str] = []  # request ids cancelled while generating

    def tokenize(self, prompt: Prompt) -> list[int]:
        text = prompt if isinstance(prompt, str) else "".join(f"{m.role}:{m.content}" for m in prompt)
        return list(text.encode())

    async def generate(
        self,
        prompt_token_ids: list[int],
        request: RolloutRequest,
        seed: int | None,
        lora: LoraHandle | None,
        request_id: str,
    ) -> list[Completion]:
        if prompt_token_ids == self.fail_prompt:
            raise RuntimeError(f"engine failure on request {request_id}")
        if self.gate is not None:
            try:
                await self.gate.wait()
            except asyncio.CancelledError:
                self.cancelled.append(request_id)
                raise
        lora_id = lora.int_id if lora else 0
        assert lora is None or lora.int_id in self.loras, "generated with a removed adapter"
        return [
            Completion(
                text=f"v{lora_id}-{i}",
                token_ids=[lora_id, i, seed or 0],
                logprobs=[-1.0, -2.0, -3.0],
                finish_reason="length",
            )
            for i in range(request.n)
        ]

    async def add_lora(self, lora: LoraHandle) -> None:
        self.loras[lora.int_id] = lora

    async def remove_lora(self, int_id: int) -> None:
        del self.loras[int_id]
        self.removed.append(int_id)

    async def sleep(self, level: int) -> None:
        self.sleep_calls.append(level)

    async def wake_up(self, level: int) -> None:
        pass

    def dead_reason(self) -> str | None:
        return self.dead

    def shutdown(self) -> None:
        pass


def write_base_config(model_dir: Path) -> Path:
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(BASE_CONFIG))
    return model_dir


def write_fake_adapter(path: Path, *, rank: int = 4, hidden: int = 16, fmt: str = "safetensors") -> Path:
    """A peft-shaped LoRA for q_proj of BASE_CONFIG (or of another hidden size: a wrong base)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": 8}))
    tensors = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(rank, hidden),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.ones(hidden, rank),
    }
    if fmt == "safetensors":
        save_file(tensors, str(path / "adapter_model.safetensors"))
    else:
        torch.save(tensors, path / "adapter_model.bin")
    return path
