"""Training rows, served as shuffled batches of prompts and tokenized one way for sampling and scoring.

learner.data reads the files these rows come from.
"""

from __future__ import annotations

import random
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, JsonValue, model_validator

from shared.config import LearnerConfig
from shared.prompts import prompt_token_ids
from shared.schemas import Prompt, RolloutRequest


class UnsupervisedRow(BaseModel):
    """`{"text": ...}` (a document: its opening is the prompt) or TRL's prompt-only `{"prompt": ...}`
    (a text or a conversation); the reward needs no label."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    text: str | None = Field(None, min_length=1)
    """The document of a `{"text"}` row; None for a `{"prompt"}` row."""
    prompt: Annotated[Prompt, Field(min_length=1)]
    """The prompt as given: a `{"text"}` row's text, or a `{"prompt"}` row's text or conversation."""
    extra: dict[str, JsonValue] = Field(default_factory=dict)
    """The row's other columns, by name (reward functions take them as keyword columns)."""

    @model_validator(mode="before")
    @classmethod
    def _text_is_the_prompt(cls, data: Any) -> Any:
        """A `{"text"}` row's prompt is its text, so every row has `prompt` as given."""
        if isinstance(data, dict) and data.get("text") is not None:
            if data.get("prompt") is not None:
                raise ValueError("a row has a text or a prompt, not both")
            return {**data, "prompt": data["text"]}
        return data

    @property
    def prompt_text(self) -> str:
        """The prompt as one line of text (a conversation's last message) for logs."""
        return self.prompt if isinstance(self.prompt, str) else self.prompt[-1].content


class SupervisedRow(BaseModel):
    """`{"prompt": ..., "answer": ...}`: the reward measures the answer's likelihood. The prompt is a
    text or a conversation (`[{"role": ..., "content": ...}, ...]`, through the chat template)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    prompt: Annotated[Prompt, Field(min_length=1)]
    answer: str = Field(min_length=1)
    extra: dict[str, JsonValue] = Field(default_factory=dict)
    """The row's other columns, by name (reward functions take them as keyword columns)."""

    @property
    def prompt_text(self) -> str:
        """The prompt as one line of text (a conversation's last message) for logs."""
        return self.prompt if isinstance(self.prompt, str) else self.prompt[-1].content


Row = UnsupervisedRow | SupervisedRow


class PromptSampler:
    """Batches of rows, reshuffled every epoch with a seeded RNG."""

    def __init__(self, rows: list[Row], batch_size: int, seed: int) -> None:
        self._rows = rows
        self._batch_size = batch_size
        self._rng = random.Random(seed)
        self._order: list[int] = []

    def next_batch(self) -> list[Row]:
        """The next `batch_size` rows; an epoch boundary reshuffles."""
        batch = []
        while len(batch) < self._batch_size:
            if not self._order:
                self._order = list(range(len(self._rows)))
                self._rng.shuffle(self._order)
            batch.append(self._rows[self._order.pop()])
        return batch

    def state_dict(self) -> dict:
        """Where the sampler stands, as JSON-able values: its RNG, what is left of this epoch, and of
        how many rows."""
        version, internal, gauss = self._rng.getstate()
        return {"rng": [version, list(internal), gauss], "order": list(self._order), "rows": len(self._rows)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a `state_dict()`: the same batches follow as after the one it was taken at.
        Taken over another number of rows (a resume with other data, --allow-config-change), a new
        epoch begins instead: the rest of that one indexes the old rows."""
        version, internal, gauss = state["rng"]
        self._rng.setstate((version, tuple(internal), gauss))
        # A checkpoint written before the count was recorded: taken as of these rows.
        same_rows = state.get("rows", len(self._rows)) == len(self._rows)
        self._order = list(state["order"]) if same_rows else []


class PromptEncoder:
    """Tokenization shared by sampling and scoring, so both see the same token ids.

    The learner sends token ids, never text, to the server. Documents (`{"text"}` rows) keep their
    first `max_prompt_tokens` tokens (a document's opening is the prompt); prompts keep their last
    ones (the end of a question is what the answer follows).
    """

    def __init__(self, tokenizer, cfg: LearnerConfig, *, eos_ids: frozenset[int] | None = None) -> None:
        self._tokenizer = tokenizer
        self._cfg = cfg
        self.eos_ids = eos_ids or frozenset([tokenizer.eos_token_id])
        """Every token the sampler stops on (model.eos_token_ids): none of them is completion text."""
        self.pad_id: int = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no special tokens added (answers: they continue a sequence)."""
        return self._tokenizer.encode(text, add_special_tokens=False)

    def prompt(self, row: Row) -> list[int]:
        """The prompt's token ids (shared.prompts: BOS when the tokenizer adds one, chat template with
        `chat_template_kwargs` for conversations), truncated to `max_prompt_tokens` with a leading
        BOS kept."""
        limit = self._cfg.max_prompt_tokens
        ids = prompt_token_ids(self._tokenizer, row.prompt, chat_template_kwargs=self._cfg.chat_template_kwargs)
        if len(ids) <= limit:
            return ids
        if isinstance(row, UnsupervisedRow) and row.text is not None:
            return ids[:limit]  # a document's opening, BOS included
        bos = ids[:1] if ids[0] == self._tokenizer.bos_token_id else []
        return bos + ids[len(ids) - (limit - len(bos)) :]  # the end of a question, after its BOS

    def answers(self, rows: list[Row]) -> list[list[int]] | None:
        """Answer token ids of supervised rows; None in unsupervised mode."""
        if self._cfg.mode == "unsupervised":
            return None
        return [self.encode(row.answer) for row in rows]

    def strip_eos(self, token_ids: list[int]) -> list[int]:
        """The completion's text tokens: without the end-of-sequence token that stopped it."""
        return token_ids[:-1] if token_ids and token_ids[-1] in self.eos_ids else token_ids

    def rollout_request(
        self, prompt_ids_P: list[list[int]], adapter: str | None, step: int, *, first_prompt: int = 0
    ) -> RolloutRequest:
        """The request for step `step` (from 1); with `sampling.seed` set, each step's completions
        take the next prompts_per_step * n seeds (see SamplingConfig.seed). `prompt_ids_P` are the
        step's prompts from index `first_prompt` on (under torchrun, rank r's shard starts at
        r * len(shard)): their seeds are the ones they have in the whole step's request, so the
        ranks' requests together draw what one process's draws."""
        sampling = self._cfg.sampling
        end = first_prompt + len(prompt_ids_P)
        assert step >= 1 and first_prompt >= 0 and end <= self._cfg.prompts_per_step, (step, first_prompt, end)
        stride = self._cfg.prompts_per_step * sampling.n  # seeds one step's request uses
        seed = None if sampling.seed is None else sampling.seed + (step - 1) * stride + first_prompt * sampling.n
        # SamplingConfig's fields are RolloutRequest's sampling fields, by name; a `stop` still left
        # to the model (None, see model.with_model_sampling_defaults) sends the request's default.
        params = sampling.model_dump(exclude={"seed"}, exclude_none=True)
        return RolloutRequest(prompt_token_ids=prompt_ids_P, adapter=adapter, seed=seed, kind="training", **params)
