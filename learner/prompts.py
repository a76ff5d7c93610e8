"""Training data: JSONL rows validated one by one, served as shuffled batches of prompts."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.config import LearnerConfig
from shared.errors import DataError
from shared.prompts import prompt_token_ids
from shared.schemas import ChatMessage, RolloutRequest


class UnsupervisedRow(BaseModel):
    """`{"text": ...}`: the text is the prompt; the reward needs no label."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    text: str = Field(min_length=1)

    @property
    def prompt_text(self) -> str:
        """The text sent as the prompt."""
        return self.text


class SupervisedRow(BaseModel):
    """`{"prompt": ..., "answer": ...}`: the reward measures the answer's likelihood. The prompt is a
    text or a conversation (`[{"role": ..., "content": ...}, ...]`, through the chat template)."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    prompt: str | list[ChatMessage] = Field(min_length=1)
    answer: str = Field(min_length=1)

    @property
    def prompt_text(self) -> str:
        """The prompt as one line of text (a conversation's last message) for logs."""
        return self.prompt if isinstance(self.prompt, str) else self.prompt[-1].content


Row = UnsupervisedRow | SupervisedRow


def load_rows(path: Path, mode: Literal["unsupervised", "supervised"]) -> list[Row]:
    """Every row of a JSONL file, or a DataError naming the file, line and field of the first bad one."""
    row_type = UnsupervisedRow if mode == "unsupervised" else SupervisedRow
    if not path.is_file():
        raise DataError(str(path), 0, "-", "no such file")
    rows: list[Row] = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(str(path), line_no, "-", f"not valid JSON ({e.msg} at column {e.colno})") from e
            if not isinstance(obj, dict):
                raise DataError(str(path), line_no, "-", f"expected a JSON object, got {type(obj).__name__}")
            try:
                rows.append(row_type.model_validate(obj))
            except ValidationError as e:
                error = e.errors()[0]
                field = ".".join(str(p) for p in error["loc"]) or "-"
                hint = f" ({mode} mode reads {list(row_type.model_fields)})" if error["type"] == "missing" else ""
                raise DataError(str(path), line_no, field, error["msg"] + hint) from e
    if not rows:
        raise DataError(str(path), 0, "-", "the file holds no rows")
    return rows


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
        """Where the sampler stands, as JSON-able values: its RNG and what is left of this epoch."""
        version, internal, gauss = self._rng.getstate()
        return {"rng": [version, list(internal), gauss], "order": list(self._order)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a `state_dict()`: the same batches follow as after the one it was taken at."""
        version, internal, gauss = state["rng"]
        self._rng.setstate((version, tuple(internal), gauss))
        self._order = list(state["order"])


class PromptEncoder:
    """Tokenization shared by sampling and scoring, so both see the same token ids.

    The learner sends token ids, never text, to the server. Unsupervised texts keep their first
    `max_prompt_tokens` tokens (a document's opening is the prompt); supervised prompts keep their
    last ones (the end of a question is what the answer follows).
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
        """The prompt's token ids (shared.prompts: BOS when the tokenizer adds one, chat template for
        conversations), truncated to `max_prompt_tokens` with a leading BOS kept."""
        limit = self._cfg.max_prompt_tokens
        ids = prompt_token_ids(self._tokenizer, row.text if isinstance(row, UnsupervisedRow) else row.prompt)
        if len(ids) <= limit:
            return ids
        if isinstance(row, UnsupervisedRow):
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

    def rollout_request(self, prompt_ids_P: list[list[int]], adapter: str | None, step: int) -> RolloutRequest:
        """The request for step `step` (from 1); with `sampling.seed` set, each step's completions
        take the next prompts_per_step * n seeds (see SamplingConfig.seed)."""
        sampling = self._cfg.sampling
        assert step >= 1 and len(prompt_ids_P) <= self._cfg.prompts_per_step, (step, len(prompt_ids_P))
        stride = self._cfg.prompts_per_step * sampling.n  # seeds one step's request uses
        seed = None if sampling.seed is None else sampling.seed + (step - 1) * stride
        # SamplingConfig's fields are RolloutRequest's sampling fields, by name; a `stop` still left
        # to the model (None, see model.with_model_sampling_defaults) sends the request's default.
        params = sampling.model_dump(exclude={"seed"}, exclude_none=True)
        return RolloutRequest(prompt_token_ids=prompt_ids_P, adapter=adapter, seed=seed, **params)
