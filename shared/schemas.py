"""Wire schemas of the rollout server's HTTP API: the one definition both processes import.

`rollout_server.routes` serves these models; `learner.rollout_client` sends and parses them.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Discriminator, Field, JsonValue, Tag, model_validator


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _valid_unicode(text: str) -> str:
    # JSON's "\ud800" escape decodes to a lone surrogate, which no tokenizer (and no UTF-8 encoder) takes.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"holds a lone surrogate at character {e.start} (not valid Unicode)") from None
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]
"""A string that is valid Unicode (encodes to UTF-8)."""
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
"""A float that is neither NaN nor +-infinity (JSON has no way to write them back)."""
StrictInt = Annotated[int, Field(strict=True)]
"""An int given as an int: not "8", 8.0 or true."""
LoraName = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$")]
"""The name an adapter is served under."""

MAX_SEED = 2**63 - 1
"""Largest seed a completion may sample with (vLLM and torch take int64 seeds)."""
MAX_TOP_K = 2**31 - 1
"""Largest top_k (vLLM keeps top_k in int32; any value over the vocabulary means all of it)."""
MIN_TEMPERATURE = 1e-2
"""Least temperature above 0: vLLM raises any 0 < t < 0.01 to 0.01 (with a warning), so it would
sample, and report logprobs, at another temperature than asked."""
MAX_TOP_LOGPROBS = 5
"""Most alternatives per token a request may ask for (OpenAI's bound on completions' `logprobs`)."""
TokenLogprobs = dict[int, float]
"""Log-probabilities of some tokens at one position, by token id."""
MAX_STOP_STRINGS = 16
"""Most stop strings in one request."""
MAX_STOP_CHARS = 256
"""Longest stop string, in characters."""
MAX_LORA_PATH_CHARS = 4096
"""Longest lora_path (Linux's PATH_MAX)."""
RunName = Annotated[str, Field(min_length=1, max_length=128)]
"""A learner's run, as the sample log shows it."""


def run_name(output_dir: Path) -> str:
    """The run a learner writing to `output_dir` is, as sample logs and trackers name it: the
    directory's own name (an absolute path's last part)."""
    return output_dir.resolve().name


RolloutKind = Literal["training", "evaluation", "canary", "openai", "api"]
"""Why a rollout was made (RolloutRequest.kind)."""
PROMPT_TEXT_CHARS = 2000
"""Characters of a prompt's text a sample record keeps (SampleRecord.prompt_texts): the first
quarter and the last three quarters, the end being what the completion follows."""


# --- rollouts -------------------------------------------------------------------------------


class ChatMessage(_Wire):
    """One turn of a conversation, as chat templates take it."""

    role: Text = Field(min_length=1)
    """'system', 'user', 'assistant', ... (whatever the model's chat template knows)."""
    content: Text


ANSWERED_ROLES = ("user", "tool")
"""Last roles of a conversation that the assistant answers: the template opens its turn."""
PREFILL_ROLE = "assistant"
"""Last role of a conversation whose final message (a prefill) the completion continues."""


def continues_final_message(messages: list[ChatMessage]) -> bool:
    """Whether the completion continues the conversation's final message (an assistant prefill:
    rendered open, with continue_final_message) rather than answering it (a user or tool message:
    rendered with the generation prompt), as TRL renders a prompt. Any other last role (a 'system'
    message closes no turn) is a ValueError."""
    role = messages[-1].role
    if role != PREFILL_ROLE and role not in ANSWERED_ROLES:
        raise ValueError(
            f"message {len(messages) - 1} is the last, and its role is {role!r}: a conversation ends with a "
            f"{' or '.join(map(repr, ANSWERED_ROLES))} message (the assistant answers it) or an "
            f"{PREFILL_ROLE!r} message (a prefill the completion continues)"
        )
    return role == PREFILL_ROLE


def _ends_with_a_turn(messages: list[ChatMessage]) -> list[ChatMessage]:
    if messages:  # an empty conversation is refused where it is used (min_length, or with its own message)
        continues_final_message(messages)
    return messages


Conversation = Annotated[list[ChatMessage], AfterValidator(_ends_with_a_turn)]
"""Chat messages ending with a turn to answer or to continue (`continues_final_message`)."""

RENDERING_ARGUMENTS = frozenset(
    {
        *("self", "conversation", "tools", "documents", "chat_template", "add_generation_prompt"),
        *("continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors"),
        *("return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs", "conversations", "messages"),
    }
)
"""Names that transformers' apply_chat_template (and the render_jinja_template it calls) take as
arguments, or set themselves: a chat-template keyword of one of these names would change how the
prompt is rendered (or give the template twice), so it is refused."""


def _template_keywords(kwargs: dict[str, JsonValue]) -> dict[str, JsonValue]:
    taken = sorted(set(kwargs) & RENDERING_ARGUMENTS)
    if taken:
        raise ValueError(f"{', '.join(map(repr, taken))} is set by the rendering, not a chat-template keyword")
    return kwargs


ChatTemplateKwargs = Annotated[dict[str, JsonValue], AfterValidator(_template_keywords)]
"""Keywords the model's chat template reads (Qwen3's enable_thinking, ...), as vLLM's
chat_template_kwargs; none of RENDERING_ARGUMENTS."""


def _prompt_kind(prompt: object) -> str | None:
    return "text" if isinstance(prompt, str) else "messages" if isinstance(prompt, list) else None


# Tagged, so an error names the kind of prompt it is about ("prompts.0.text: ...").
Prompt = Annotated[
    Annotated[Text, Tag("text")] | Annotated[Conversation, Tag("messages")],
    Discriminator(
        _prompt_kind,
        custom_error_type="prompt_type",
        custom_error_message="a prompt is a text or a list of messages",
    ),
]
"""A prompt text, or a conversation that the model's chat template renders: with the generation
prompt (the assistant's turn to be completed) after a user or tool message, open after an
assistant message (a prefill the completion continues)."""


def prompt_chars(prompt: Prompt) -> int:
    """Characters of a prompt: its text, or the roles and contents of its messages."""
    return len(prompt) if isinstance(prompt, str) else sum(len(m.role) + len(m.content) for m in prompt)


class RolloutRequest(_Wire):
    """K completions for each of a list of prompts (text or token ids, not both)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"prompts": ["12+7="], "n": 4, "max_tokens": 8, "adapter": "policy"},
                {"prompts": [[{"role": "user", "content": "12+7="}]], "n": 2, "max_tokens": 8, "seed": 0},
                {"prompt_token_ids": [[1, 2, 3]], "n": 1, "max_tokens": 4, "temperature": 0},
            ]
        }
    )

    prompts: list[Prompt] | None = None
    """Prompt texts (tokenized as the model's tokenizer does: a BOS token when it adds one) or
    conversations (rendered by the model's chat template: with the generation prompt, or after an
    assistant message open, the completion continuing it)."""
    chat_template_kwargs: ChatTemplateKwargs = Field(default_factory=dict)
    """Keywords of the chat template that renders the conversations of `prompts` (e.g. Qwen3's
    {"enable_thinking": false}), as vLLM's; only with a conversation among `prompts`."""
    prompt_token_ids: list[list[StrictInt]] | None = None
    """Prompts as token ids, used verbatim; each id in [0, the model's vocabulary size)."""
    n: StrictInt = Field(8, ge=1)
    """Completions per prompt."""
    max_tokens: StrictInt = Field(64, ge=1)
    """Longest completion, in tokens."""
    temperature: FiniteFloat = Field(1.0, ge=0)
    """Sampling temperature; 0 is greedy, else at least MIN_TEMPERATURE (0.01)."""
    top_p: FiniteFloat = Field(1.0, gt=0, le=1)
    """Nucleus sampling mass."""
    top_k: StrictInt = Field(-1, ge=-1, le=MAX_TOP_K)
    """Top-k sampling; -1 disables it."""
    logprobs: StrictInt = Field(0, ge=0, le=MAX_TOP_LOGPROBS)
    """0: each sampled token's log-probability (Completion.logprobs); k > 0: also the k most likely
    tokens at each position (Completion.top_logprobs), as vLLM's `logprobs`."""
    prompt_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    """None: not computed. k: each prompt token's log-probability given the tokens before it, with
    the k most likely tokens at that position (PromptRollout.prompt_logprobs), as vLLM's
    `prompt_logprobs`: what scoring a continuation (evaluation harnesses' loglikelihood) reads."""
    seed: StrictInt | None = Field(None, ge=0, le=MAX_SEED)
    """Seed of prompt 0's first completion. Prompt i is sent to vLLM with seed + i * n, and vLLM
    seeds its completion j with that + j, so completion (i, j) samples with seed + i * n + j: one
    stream per completion, the request using seeds seed .. seed + P * n - 1, which must not pass
    MAX_SEED (2**63 - 1). None: fresh randomness."""
    stop: list[Annotated[Text, Field(min_length=1, max_length=MAX_STOP_CHARS)]] = Field(
        default_factory=list, max_length=MAX_STOP_STRINGS
    )
    """Strings that end a completion (excluded from it): at most 16, each of 1 to 256 characters."""
    adapter: LoraName | None = None
    """Name of a loaded LoRA adapter; None samples from the base model."""
    run: RunName | None = None
    """The learner's run (its output directory's name), shown and filtered by in the sample log."""
    kind: RolloutKind = "api"
    """Why the rollout was made, for the sample log: a learner's training, evaluation or canary
    rollout, an OpenAI-route request, or (api) anything else sent to /v1/rollouts."""
    version: StrictInt | None = Field(None, ge=0)
    """The version of `adapter` the completions must come from: a server that does not serve
    exactly that version (another one, or no adapter of that name: it has fallen behind) answers
    409 and generates nothing. With `adapter` None it must be None or 0 (the base), and with an
    adapter at least 1, else 422. None: the version the server serves now (no adapter of that
    name: 404)."""

    @model_validator(mode="after")
    def _one_prompt_kind(self) -> RolloutRequest:
        if (self.prompts is None) == (self.prompt_token_ids is None):
            raise ValueError("give exactly one of 'prompts' and 'prompt_token_ids'")
        if self.prompt_token_ids is not None and any(not ids for ids in self.prompt_token_ids):
            raise ValueError("'prompt_token_ids' holds an empty prompt")
        if self.prompts is not None and any(isinstance(p, list) and not p for p in self.prompts):
            raise ValueError("'prompts' holds a conversation with no message")
        if self.prompts is not None and any(p == "" for p in self.prompts):
            raise ValueError("'prompts' holds an empty text (a prompt needs at least one token)")
        if self.chat_template_kwargs and not any(isinstance(p, list) for p in self.prompts or []):
            raise ValueError("'chat_template_kwargs' is given, but no prompt is a conversation (nothing to render)")
        if self.adapter is None and self.version not in (None, 0):
            raise ValueError(f"version {self.version} names an adapter version, but no 'adapter' is given (base: 0)")
        if self.adapter is not None and self.version == 0:
            raise ValueError("version 0 is the base model's; an adapter's versions start at 1")
        if self.temperature == 0 and self.n > 1:
            raise ValueError("temperature 0 is greedy decoding: all n completions would be equal; use n=1")
        if 0 < self.temperature < MIN_TEMPERATURE:
            raise ValueError(
                f"temperature {self.temperature} is below {MIN_TEMPERATURE}: vLLM would sample (and report "
                f"logprobs) at {MIN_TEMPERATURE} instead; use 0 for greedy decoding"
            )
        if self.seed is not None and self.seed + self.num_prompts * self.n - 1 > MAX_SEED:
            raise ValueError(
                f"seed {self.seed} with {self.num_prompts} prompts x n={self.n} would sample with seeds up to "
                f"seed + {self.num_prompts * self.n - 1}, past 2**63 - 1"
            )
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
    stop_reason: str | int | None = None
    """With finish_reason 'stop': the stop string (left out of `text`) or the stop token id (not an
    end-of-sequence token) that ended it; None when an end-of-sequence token did (vLLM's)."""
    top_logprobs: list[TokenLogprobs] | None = None
    """With RolloutRequest.logprobs k > 0: at each position, the sampled token's and the k most
    likely tokens' log-probabilities; else None."""


class PromptRollout(_Wire):
    """A prompt and its K completions."""

    prompt: Prompt | None
    """The prompt as sent (None when it was sent as token ids)."""
    prompt_token_ids: list[int]
    completions: list[Completion]
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    """With RolloutRequest.prompt_logprobs: per prompt position, the prompt token's log-probability
    given the ones before (and the k most likely tokens'); None at position 0, which has no context."""


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

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"lora_name": "policy", "lora_path": "v000001", "version": 1}]}
    )

    lora_name: LoraName
    lora_path: Text = Field(min_length=1, max_length=MAX_LORA_PATH_CHARS)
    """Directory of a peft adapter (safetensors), under the server's adapter root (relative to it, or
    absolute); at most 4096 characters."""
    version: int | None = Field(None, ge=1)
    """The version number to serve it as, stamped on every rollout it makes (the learner sends its
    adapter directory's number, so a restarted or second server numbers versions as it does).
    None: one more than the last version of this name this server loaded."""


class UnloadLoraAdapterRequest(_Wire):
    """Stop serving an adapter."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"lora_name": "policy"}]})

    lora_name: LoraName


class AdapterInfo(_Wire):
    """An adapter the server serves."""

    lora_name: str
    version: int
    lora_path: str
    """The adapter's directory relative to the server's adapter root (no host path)."""
    sha256: str
    """`shared.adapter_hash.adapter_sha256` of the files the server loaded, for the learner to
    compare with its own hash of the directory it saved."""
    loaded_at: datetime


class AdapterDigestRequest(_Wire):
    """Which directory under the server's adapter root to hash."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"lora_path": "v000001"}]})

    lora_path: Text = Field(min_length=1, max_length=MAX_LORA_PATH_CHARS)
    """An adapter directory under the server's adapter root (relative to it, or absolute)."""


class AdapterDigest(_Wire):
    """What `POST /v1/adapter_digest` returns: how the server sees a directory under its adapter
    root. The learner compares the sha256 with its own hash of the directory it saved: equal, the
    two processes share the adapter folder; otherwise it uploads (`PUT /v1/adapter_uploads/{sha256}`)."""

    lora_path: str
    sha256: str | None
    """`shared.adapter_hash.adapter_sha256` of the directory; None where no such directory is under
    the adapter root."""


class AdapterUpload(_Wire):
    """What `PUT /v1/adapter_uploads/{sha256}` returns: where the uploaded adapter lies, to load as
    any other (`POST /v1/load_lora_adapter` with this lora_path)."""

    lora_path: str
    """`uploads/<sha256>`, relative to the server's adapter root."""
    sha256: str
    bytes: int
    """The size of the adapter's files."""


class ModelCard(_Wire):
    """An entry of `GET /v1/models`."""

    id: str
    kind: Literal["base", "lora"]
    version: int
    """0 for the base model."""
    root: str
    """The base model directory's name, or the adapter's directory relative to the adapter root."""
    sha256: str | None
    """An adapter's `AdapterInfo.sha256`; None for the base model."""


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
    wakes_in_s: float | None = None
    """Seconds until the sleep's lease ends and the server wakes by itself; None: no lease (or awake)."""


# --- samples ----------------------------------------------------------------------------------


class SampleScores(_Wire):
    """Rewards and advantages the learner attaches to a rollout, shaped [prompt][completion]."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"rewards": [[1.0, 0.0]], "advantages": [[0.7071, -0.7071]], "step": 1}]}
    )

    rewards: list[list[FiniteFloat | None]]
    """None: no reward function applied to the completion (unscorable; its advantage is 0)."""
    advantages: list[list[FiniteFloat]]
    step: int | None = None
    answers: list[Text | None] | None = None
    """Each prompt's expected answer (supervised data), as the sample log shows it beside the
    completions; None where a prompt has none."""
    components: dict[str, list[list[FiniteFloat | None]]] = Field(default_factory=dict)
    """Each reward function's own reward (before weighting), by function name, shaped like
    `rewards`; None where the function did not apply. `rewards` is their weighted sum."""

    @model_validator(mode="after")
    def _same_shape(self) -> SampleScores:
        if [len(r) for r in self.rewards] != [len(a) for a in self.advantages]:
            raise ValueError("'rewards' and 'advantages' must have the same [prompt][completion] shape")
        if self.answers is not None and len(self.answers) != len(self.rewards):
            raise ValueError("'answers' must hold one answer (or null) per prompt of 'rewards'")
        shape = [len(r) for r in self.rewards]
        for name, values in self.components.items():
            if [len(r) for r in values] != shape:
                raise ValueError(f"components[{name!r}] must have the [prompt][completion] shape of 'rewards'")
        return self


class SampleRecord(_Wire):
    """A recorded rollout, for a person to inspect mid-training."""

    rollout_id: str
    created_at: datetime
    adapter: str | None
    policy_version: int
    results: list[PromptRollout]
    run: str | None = None
    """RolloutRequest.run."""
    kind: RolloutKind = "api"
    """RolloutRequest.kind."""
    prompt_texts: list[str] = Field(default_factory=list)
    """Each prompt as text: as sent, or decoded from its token ids (a conversation as rendered by
    the chat template), cut to PROMPT_TEXT_CHARS with '…' where characters were left out."""
    scores: SampleScores | None = None
    truncated: bool = False
    """True when the record alone was over the server's samples_max_bytes: it is kept with its
    token ids and logprobs dropped, its prompts dropped and its texts cut to 256 characters."""


class SamplesResponse(_Wire):
    """What `GET /v1/samples` returns, newest first."""

    samples: list[SampleRecord]


class CurvePoint(_Wire):
    """A step's mean reward, over the completions of the rollouts scored for it."""

    step: int
    reward_mean: float
    completions: int
    """Completions with a reward (an unscorable one has none)."""
    policy_version: int


class RewardCurve(_Wire):
    """One run's rewards per step, for one kind of rollout."""

    run: str | None
    kind: RolloutKind
    adapter: str | None
    points: list[CurvePoint]
    """By step; the newest `samples_curve_points` steps."""


class RewardCurvesResponse(_Wire):
    """What `GET /v1/samples/curves` returns: every run's curve, kept by the server as scores are
    posted (not only those of the rollouts still in the sample log)."""

    curves: list[RewardCurve]


class ErrorResponse(_Wire):
    """What every refusal and failure answers (4xx and 503), whatever raised it."""

    detail: str
    """What was wrong, as one line of text."""


class HealthResponse(_Wire):
    """What `GET /health` returns: 200 while the engine lives (asleep or not). A dead engine answers
    503 with the reason, and the server exits non-zero so a supervisor restarts it."""

    status: Literal["ok"] = "ok"
    is_sleeping: bool
    device: str
    """'cuda' or 'cpu': where the engine runs (on CPU, sleep releases nothing)."""
    model_runner: str
    """vLLM's model runner: 'v2' (the default on CUDA since vLLM 0.32; VLLM_USE_V2_MODEL_RUNNER=0
    selects the other) or 'v1' (CPU, or where v2 does not apply)."""


# --- OpenAI-compatible ------------------------------------------------------------------------
# POST /v1/completions and /v1/chat/completions in OpenAI's shapes, with the fields this server can
# honour, so a person can try the base model or an adapter mid-training with curl or the `openai`
# client. Each runs as a rollout: the same bounds, adapter versions and sample log.

OpenAIStop = Annotated[Text, Field(min_length=1, max_length=MAX_STOP_CHARS)]
"""A stop string, bounded as RolloutRequest's are."""
OpenAIFloat = Annotated[float, Field(allow_inf_nan=False, strict=True)]
"""A finite float given as a number (an int too), not as "0.5" or false."""
OpenAIPromptText = Annotated[Text, Field(min_length=1)]
"""A completion prompt (a prompt needs at least one token)."""
OPENAI_DEFAULT_MAX_TOKENS = 16
"""`max_tokens` when a request gives none: OpenAI's default for completions (chat has no default
there, but a server bound needs a number)."""


class _OpenAIRequest(_Wire):
    """The sampling fields both OpenAI-compatible requests take."""

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data: object) -> object:
        # OpenAI's API takes null for an optional field, meaning its default (the openai client
        # sends null for an argument given as None): the fields below declare null, and none of
        # them ever holds it.
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    model: Text = Field(min_length=1, max_length=256)
    """The base model (its id in GET /v1/models: the model directory's name) or a loaded adapter's
    name; anything else answers 404."""
    max_tokens: StrictInt | None = Field(OPENAI_DEFAULT_MAX_TOKENS, ge=1)
    """Longest completion, in tokens (at most the server's max_tokens)."""
    temperature: OpenAIFloat | None = Field(1.0, ge=0, le=2)
    """Sampling temperature; 0 is greedy (then n must be 1), else at least MIN_TEMPERATURE (0.01)."""
    top_p: OpenAIFloat | None = Field(1.0, gt=0, le=1)
    """Nucleus sampling mass."""
    n: StrictInt | None = Field(1, ge=1)
    """Completions per prompt."""
    seed: StrictInt | None = Field(None, ge=0, le=MAX_SEED)
    """Seeds the sampling as RolloutRequest.seed does; None: fresh randomness."""
    stop: OpenAIStop | Annotated[list[OpenAIStop], Field(max_length=MAX_STOP_STRINGS)] | None = None
    """A string, or up to 16, that end a completion (excluded from it)."""
    stream: bool | None = Field(False, strict=True)
    """Streaming is not served: true answers 400."""
    user: Text | None = Field(None, max_length=256)
    """OpenAI's end-user id, which clients send: accepted, not used."""


class OpenAICompletionRequest(_OpenAIRequest):
    """`POST /v1/completions`: OpenAI's legacy completions, text prompts only."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"model": "policy", "prompt": "12+7=", "max_tokens": 4, "logprobs": 0}]}
    )

    prompt: (
        OpenAIPromptText
        | Annotated[list[OpenAIPromptText], Field(min_length=1)]
        | Annotated[list[StrictInt], Field(min_length=1)]
        | Annotated[list[Annotated[list[StrictInt], Field(min_length=1)]], Field(min_length=1)]
    )
    """A prompt text or a list of them, tokenized as a rollout's are (BOS when the tokenizer adds
    one); or one prompt's token ids, or a list of such (used verbatim: evaluation harnesses send
    these)."""
    max_tokens: StrictInt | None = Field(OPENAI_DEFAULT_MAX_TOKENS, ge=0)
    """Longest completion, in tokens (at most the server's max_tokens); 0 (with echo): no completion,
    the prompt's log-probabilities only."""
    echo: bool | None = Field(False, strict=True)
    """True: each choice starts with its prompt, in `text` and in `logprobs` (whose first prompt
    token has no log-probability: null). What evaluation harnesses score a continuation with."""
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    """k: each token's log-probability (sampled tokens at the sampling temperature) in
    `token_logprobs`, and with k > 0 the k most likely tokens at each position in `top_logprobs`."""


class OpenAIChatRequest(_OpenAIRequest):
    """`POST /v1/chat/completions`: one conversation, rendered by the model's chat template."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"model": "policy", "messages": [{"role": "user", "content": "12+7="}], "max_tokens": 4}]
        }
    )

    messages: Conversation = Field(min_length=1)
    """A message's content is a text, or OpenAI's list of text parts ([{"type": "text", "text":
    ...}], joined in order); other parts (images, audio) are refused. The last message is a user
    or tool message (answered) or an assistant message (a prefill the answer continues)."""
    chat_template_kwargs: ChatTemplateKwargs | None = Field(default_factory=dict)
    """Keywords of the model's chat template (e.g. Qwen3's {"enable_thinking": false}), as vLLM's."""
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    """OpenAI's newer name for `max_tokens`; when given, it is the one used."""
    logprobs: bool | None = Field(False, strict=True)
    """True: each token's sampler logprob (at the sampling temperature) in `logprobs.content`."""
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    """With logprobs: the k most likely tokens at each position, in each token's `top_logprobs`."""

    @model_validator(mode="before")
    @classmethod
    def _text_parts_joined(cls, data: object) -> object:
        if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
            return data
        return {**data, "messages": [_joined_text_parts(m) for m in data["messages"]]}


def _joined_text_parts(message: object) -> object:
    """A message whose content is a list of text parts, with them joined into one text; anything
    else as it is (validation then says what is wrong with it)."""
    if not isinstance(message, dict) or not isinstance(message.get("content"), list):
        return message
    parts = message["content"]
    if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in parts):
        return message  # not only text parts: 422 (content must be a string)
    return {**message, "content": "".join(p["text"] for p in parts)}


class OpenAIUsage(_Wire):
    """Tokens of a request: each prompt counted once, every completion's tokens."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class OpenAICompletionLogprobs(_Wire):
    """A completion's tokens and their sampler logprobs, in OpenAI's legacy shape."""

    tokens: list[str]
    """Each token decoded alone (a character split over tokens shows as U+FFFD)."""
    token_logprobs: list[float | None]
    """Each token's log-probability; null for an echoed prompt's first token (it has no context)."""
    top_logprobs: list[dict[str, float] | None] | None = None
    """With logprobs k > 0: at each position, the token's and the k most likely tokens' log-probs by
    their text (tokens of one text share an entry); null where token_logprobs is."""
    text_offset: list[int]
    """Where each token starts, counting the characters of the tokens before it."""


class OpenAICompletionChoice(_Wire):
    index: int
    """prompt index * n + completion index."""
    text: str
    logprobs: OpenAICompletionLogprobs | None
    finish_reason: FinishReason | None


class OpenAICompletionResponse(_Wire):
    """What `POST /v1/completions` returns."""

    id: str
    """'cmpl-' + the rollout id it is recorded under in the sample log (GET /v1/samples, /ui)."""
    object: Literal["text_completion"] = "text_completion"
    created: int
    """Unix time, in seconds."""
    model: str
    choices: list[OpenAICompletionChoice]
    usage: OpenAIUsage
    policy_version: int
    """Not OpenAI's: the version of `model` that answered (0 for the base model)."""


class OpenAIAssistantMessage(_Wire):
    role: Literal["assistant"] = "assistant"
    content: str


class OpenAITokenLogprob(_Wire):
    """One token of a chat completion with its sampler logprob."""

    token: str
    """The token decoded alone (a character split over tokens shows as U+FFFD)."""
    logprob: float
    bytes: list[int]
    """`token` as UTF-8."""
    top_logprobs: list[OpenAITokenLogprob] = Field(default_factory=list)
    """With top_logprobs k: the k most likely tokens at this position (empty otherwise)."""


class OpenAIChatLogprobs(_Wire):
    content: list[OpenAITokenLogprob]


class OpenAIChatChoice(_Wire):
    index: int
    message: OpenAIAssistantMessage
    logprobs: OpenAIChatLogprobs | None
    finish_reason: FinishReason | None


class OpenAIChatResponse(_Wire):
    """What `POST /v1/chat/completions` returns."""

    id: str
    """'chatcmpl-' + the rollout id it is recorded under in the sample log (GET /v1/samples, /ui)."""
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    """Unix time, in seconds."""
    model: str
    choices: list[OpenAIChatChoice]
    usage: OpenAIUsage
    policy_version: int
    """Not OpenAI's: the version of `model` that answered (0 for the base model)."""


class OpenAIError(_Wire):
    message: str
    type: str
    """'invalid_request_error', 'authentication_error', 'not_found_error' or 'server_error'."""
    param: str | None = None
    code: str | None = None
    """'model_not_found' when `model` names nothing served; else None."""


class OpenAIErrorResponse(_Wire):
    """What the OpenAI-compatible routes answer on every refusal and failure: OpenAI's error shape,
    with the status and message the other routes give in `{"detail": ...}`."""

    error: OpenAIError
