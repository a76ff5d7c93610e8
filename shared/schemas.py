"""Wire schemas of the rollout server's HTTP API: the one definition both processes import.

`rollout_server.routes` serves these models; `learner.rollout_client` sends and parses them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- rollouts -------------------------------------------------------------------------------


class ChatMessage(_Wire):
    """One turn of a conversation, as chat templates take it."""

    role: str = Field(min_length=1)
    """'system', 'user', 'assistant', ... (whatever the model's chat template knows)."""
    content: str


Prompt = str | list[ChatMessage]
"""A prompt text, or a conversation that the model's chat template renders with the generation
prompt (the assistant turn to be completed)."""


def prompt_chars(prompt: Prompt) -> int:
    """Characters of a prompt: its text, or the contents of its messages."""
    return len(prompt) if isinstance(prompt, str) else sum(len(m.content) for m in prompt)


class RolloutRequest(_Wire):
    """K completions for each of a list of prompts (text or token ids, not both)."""

    prompts: list[Prompt] | None = None
    """Prompt texts (tokenized as the model's tokenizer does: a BOS token when it adds one) or
    conversations (rendered by the model's chat template, with the generation prompt)."""
    prompt_token_ids: list[list[int]] | None = None
    """Prompts as token ids, used verbatim."""
    n: int = Field(8, ge=1)
    """Completions per prompt."""
    max_tokens: int = Field(64, ge=1)
    """Longest completion, in tokens."""
    temperature: float = Field(1.0, ge=0)
    """Sampling temperature; 0 is greedy."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling mass."""
    top_k: int = Field(-1, ge=-1)
    """Top-k sampling; -1 disables it."""
    seed: int | None = None
    """Seed of prompt 0's first completion. Prompt i is sent to vLLM with seed + i * n, and vLLM
    seeds its completion j with that + j, so completion (i, j) samples with seed + i * n + j: one
    stream per completion, the request using seeds seed .. seed + P * n - 1. None: fresh randomness."""
    stop: list[str] = Field(default_factory=list)
    """Strings that end a completion (excluded from it)."""
    adapter: str | None = None
    """Name of a loaded LoRA adapter; None samples from the base model."""

    @model_validator(mode="after")
    def _one_prompt_kind(self) -> RolloutRequest:
        if (self.prompts is None) == (self.prompt_token_ids is None):
            raise ValueError("give exactly one of 'prompts' and 'prompt_token_ids'")
        if self.prompt_token_ids is not None and any(not ids for ids in self.prompt_token_ids):
            raise ValueError("'prompt_token_ids' holds an empty prompt")
        if self.prompts is not None and any(isinstance(p, list) and not p for p in self.prompts):
            raise ValueError("'prompts' holds a conversation with no message")
        if self.temperature == 0 and self.n > 1:
            raise ValueError("temperature 0 is greedy decoding: all n completions would be equal; use n=1")
        return self

    @property
    def num_prompts(self) -> int:
        """How many prompts the request holds."""
        return len(self.prompts if self.prompts is not None else self.prompt_token_ids or [])


FinishReason = Literal["stop", "length", "abort"]


class Completion(_Wire):
    """One sampled completion."""

    text: str
    token_ids: list[int]
    logprobs: list[float]
    """Sampler log-probability of each sampled token, at the sampling temperature."""
    finish_reason: FinishReason | None


class PromptRollout(_Wire):
    """A prompt and its K completions."""

    prompt: Prompt | None
    """The prompt as sent (None when it was sent as token ids)."""
    prompt_token_ids: list[int]
    completions: list[Completion]


class RolloutResponse(_Wire):
    """What `POST /v1/rollouts` returns."""

    rollout_id: str
    adapter: str | None
    """Adapter that produced the completions; None for the base model."""
    policy_version: int
    """Version of that adapter (1 for its first load); 0 for the base model."""
    results: list[PromptRollout]
    created_at: datetime


# --- adapters (vLLM's own endpoint shapes) ----------------------------------------------------


class LoadLoraAdapterRequest(_Wire):
    """Load, or atomically replace, a LoRA adapter under a name."""

    lora_name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$")
    lora_path: str
    """Directory of a peft adapter (safetensors), under the server's adapter root."""


class UnloadLoraAdapterRequest(_Wire):
    """Stop serving an adapter."""

    lora_name: str


class AdapterInfo(_Wire):
    """An adapter the server serves."""

    lora_name: str
    version: int
    lora_path: str
    loaded_at: datetime


class ModelCard(_Wire):
    """An entry of `GET /v1/models`."""

    id: str
    kind: Literal["base", "lora"]
    version: int
    """0 for the base model."""
    root: str
    """Base model directory, or the adapter's directory."""


class ModelsResponse(_Wire):
    """What `GET /v1/models` returns."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


# --- standby ----------------------------------------------------------------------------------


class SleepState(_Wire):
    """What `/sleep`, `/wake_up` and `/is_sleeping` return."""

    is_sleeping: bool
    level: Literal[1, 2] | None
    """Level of the current sleep; None when awake."""
    released: str
    """What sleeping released on this device (on CPU vLLM cannot release anything)."""


# --- samples ----------------------------------------------------------------------------------


class SampleScores(_Wire):
    """Rewards and advantages the learner attaches to a rollout, shaped [prompt][completion]."""

    rewards: list[list[float]]
    advantages: list[list[float]]
    step: int | None = None

    @model_validator(mode="after")
    def _same_shape(self) -> SampleScores:
        if [len(r) for r in self.rewards] != [len(a) for a in self.advantages]:
            raise ValueError("'rewards' and 'advantages' must have the same [prompt][completion] shape")
        return self


class SampleRecord(_Wire):
    """A recorded rollout, for a person to inspect mid-training."""

    rollout_id: str
    created_at: datetime
    adapter: str | None
    policy_version: int
    results: list[PromptRollout]
    scores: SampleScores | None = None


class SamplesResponse(_Wire):
    """What `GET /v1/samples` returns, newest first."""

    samples: list[SampleRecord]


class HealthResponse(_Wire):
    """What `GET /health` returns."""

    status: Literal["ok"] = "ok"
    is_sleeping: bool
