"""OpenAI-compatible sampling: `POST /v1/completions` and `POST /v1/chat/completions`, so a person
can try the base model or the current adapter mid-training with curl or the `openai` client.

Each request runs as a rollout (`RolloutService.rollout`): the same API key, bounds, sleep (503),
merged serving (409) and adapter versions, and it is recorded in the sample log (GET /v1/samples,
/ui) stamped with its adapter and version, like the learner's rollouts. `model` names the base
model (its id in GET /v1/models) or a loaded adapter. Errors answer OpenAI's shape
(`http_errors.error_body`); the shapes themselves are in shared/schemas.py.
"""

from __future__ import annotations

from itertools import accumulate

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from pydantic import JsonValue, ValidationError

from rollout_server.http_errors import UNPARSED_BODY, error_responses
from rollout_server.routes import ServiceDep, cancelled_on_disconnect
from rollout_server.service import RolloutService
from shared.errors import (
    AdapterNotFoundError,
    EngineDeadError,
    InvalidRequestError,
    MergedAdapterError,
    ServerAsleepError,
    UnsupportedFeatureError,
)
from shared.schemas import (
    Completion,
    OpenAIAssistantMessage,
    OpenAIChatChoice,
    OpenAIChatLogprobs,
    OpenAIChatRequest,
    OpenAIChatResponse,
    OpenAICompletionChoice,
    OpenAICompletionLogprobs,
    OpenAICompletionRequest,
    OpenAICompletionResponse,
    OpenAITokenLogprob,
    OpenAIUsage,
    Prompt,
    PromptRollout,
    RolloutRequest,
    RolloutResponse,
    TokenLogprobs,
)

openai_router = APIRouter()

_RAISED = (
    UNPARSED_BODY,
    RequestValidationError,
    UnsupportedFeatureError,
    InvalidRequestError,
    AdapterNotFoundError,
    MergedAdapterError,
    ServerAsleepError,
    EngineDeadError,
)


@openai_router.post("/v1/completions", responses=error_responses(*_RAISED, openai=True))
async def completions(body: OpenAICompletionRequest, service: ServiceDep, request: Request) -> OpenAICompletionResponse:
    """n completions of each prompt (texts or token ids), in OpenAI's legacy completions shape; with
    echo, each prompt's own log-probabilities first (lm-evaluation-harness's loglikelihood)."""
    texts, token_ids = _completion_prompts(body.prompt)
    top = body.logprobs or 0
    if body.max_tokens == 0 and not body.echo:
        raise UnsupportedFeatureError("max_tokens=0 generates nothing: give echo=true to get the prompt's logprobs")
    rollout = await _rollout(
        body,
        max(body.max_tokens, 1),  # max_tokens 0: one token is sampled, and left out of the answer
        service,
        request,
        prompts=texts,
        prompt_token_ids=token_ids,
        logprobs=top,
        prompt_logprobs=top if body.echo and body.logprobs is not None else None,
    )
    generated = body.max_tokens > 0
    choices = []
    for result in rollout.results:
        echoed = (result.prompt if isinstance(result.prompt, str) else _joined(result.prompt_token_ids, service)) or ""
        for completion in result.completions:
            choices.append(
                OpenAICompletionChoice(
                    index=len(choices),
                    text=(echoed if body.echo else "") + (completion.text if generated else ""),
                    logprobs=None
                    if body.logprobs is None
                    else _completion_logprobs(result, completion, service, echo=bool(body.echo), generated=generated),
                    finish_reason=completion.finish_reason if generated else "length",
                )
            )
    return OpenAICompletionResponse(
        id=f"cmpl-{rollout.rollout_id}",
        created=int(rollout.created_at.timestamp()),
        model=body.model,
        choices=choices,
        usage=_usage(rollout, generated=generated),
        policy_version=rollout.policy_version,
    )


def _completion_prompts(prompt: str | list) -> tuple[list[Prompt] | None, list[list[int]] | None]:
    """A completion request's prompt as texts, or as token-id prompts (one or several)."""
    if isinstance(prompt, str):
        return [prompt], None
    if isinstance(prompt[0], str):
        return list(prompt), None
    if isinstance(prompt[0], int):
        return None, [list(prompt)]
    return None, [list(ids) for ids in prompt]


def _joined(token_ids: list[int], service: RolloutService) -> str:
    return "".join(service.token_texts(token_ids))


@openai_router.post("/v1/chat/completions", responses=error_responses(*_RAISED, openai=True))
async def chat_completions(body: OpenAIChatRequest, service: ServiceDep, request: Request) -> OpenAIChatResponse:
    """n assistant turns answering the conversation, rendered by the model's chat template."""
    max_tokens = body.max_completion_tokens or body.max_tokens
    top = (body.top_logprobs or 0) if body.logprobs else 0
    rollout = await _rollout(
        body,
        max_tokens,
        service,
        request,
        prompts=[body.messages],
        logprobs=top,
        chat_template_kwargs=body.chat_template_kwargs,
    )
    choices = [
        OpenAIChatChoice(
            index=index,
            message=OpenAIAssistantMessage(content=completion.text),
            logprobs=_chat_logprobs(completion, service) if body.logprobs else None,
            finish_reason=completion.finish_reason,
        )
        for index, completion in enumerate(rollout.results[0].completions)
    ]
    return OpenAIChatResponse(
        id=f"chatcmpl-{rollout.rollout_id}",
        created=int(rollout.created_at.timestamp()),
        model=body.model,
        choices=choices,
        usage=_usage(rollout),
        policy_version=rollout.policy_version,
    )


async def _rollout(
    body: OpenAICompletionRequest | OpenAIChatRequest,
    max_tokens: int,
    service: RolloutService,
    request: Request,
    *,
    prompts: list[Prompt] | None = None,
    prompt_token_ids: list[list[int]] | None = None,
    logprobs: int = 0,
    prompt_logprobs: int | None = None,
    chat_template_kwargs: dict[str, JsonValue] | None = None,
) -> RolloutResponse:
    """`body`'s sampling of `prompts` (or `prompt_token_ids`) as a rollout of the adapter its
    `model` names, with `logprobs` alternatives per token and `prompt_logprobs` as a rollout's;
    conversations rendered with `chat_template_kwargs`."""
    if body.stream:
        raise UnsupportedFeatureError("stream=true: this server does not stream; leave 'stream' false")
    adapter = service.adapter_of(body.model)
    stop = [body.stop] if isinstance(body.stop, str) else body.stop or []
    try:
        rollout_request = RolloutRequest(
            prompts=prompts,
            prompt_token_ids=prompt_token_ids,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            chat_template_kwargs=chat_template_kwargs or {},
            n=body.n,
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
            stop=stop,
            adapter=adapter,
            kind="openai",
        )
    except ValidationError as e:
        # A rollout's rules across fields (greedy decoding takes n=1, ...) hold here too: a 422 as
        # for any request that breaks its schema.
        raise RequestValidationError([{**err, "loc": ("body", *err["loc"])} for err in e.errors()]) from None
    return await cancelled_on_disconnect(request, service.rollout(rollout_request))


def _usage(rollout: RolloutResponse, *, generated: bool = True) -> OpenAIUsage:
    prompt_tokens = sum(len(result.prompt_token_ids) for result in rollout.results)
    completion_tokens = (
        sum(len(c.token_ids) for result in rollout.results for c in result.completions) if generated else 0
    )
    return OpenAIUsage(
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens
    )


def _completion_logprobs(
    result: PromptRollout, completion: Completion, service: RolloutService, *, echo: bool, generated: bool
) -> OpenAICompletionLogprobs:
    """The tokens of a choice (the prompt's first with echo, then the completion's unless max_tokens
    was 0) with their log-probabilities, and the top alternatives when they were asked for."""
    ids: list[int] = []
    logprobs: list[float | None] = []
    steps: list[TokenLogprobs | None] = []
    if echo:
        prompt_steps = result.prompt_logprobs or []
        ids += result.prompt_token_ids
        logprobs += [None if step is None else step[t] for t, step in zip(ids, prompt_steps, strict=True)]
        steps += prompt_steps
    if generated:
        ids += completion.token_ids
        logprobs += completion.logprobs
        steps += completion.top_logprobs or [None] * len(completion.token_ids)
    tokens = service.token_texts(ids)
    alternatives = completion.top_logprobs is not None
    return OpenAICompletionLogprobs(
        tokens=tokens,
        token_logprobs=logprobs,
        top_logprobs=[_by_text(step, service) for step in steps] if alternatives else None,
        text_offset=list(accumulate(map(len, tokens), initial=0))[:-1],
    )


def _by_text(step: TokenLogprobs | None, service: RolloutService) -> dict[str, float] | None:
    """One position's log-probabilities by token text, as OpenAI's legacy `top_logprobs`."""
    if step is None:
        return None
    return dict(zip(service.token_texts(list(step)), step.values(), strict=True))


def _chat_logprobs(completion: Completion, service: RolloutService) -> OpenAIChatLogprobs:
    tokens = service.token_texts(completion.token_ids)
    steps = completion.top_logprobs or [{}] * len(tokens)
    return OpenAIChatLogprobs(
        content=[
            OpenAITokenLogprob(
                token=token,
                logprob=logprob,
                bytes=list(token.encode()),
                top_logprobs=[
                    OpenAITokenLogprob(token=text, logprob=lp, bytes=list(text.encode()))
                    for text, lp in sorted(
                        zip(service.token_texts(list(step)), step.values(), strict=True), key=lambda a: -a[1]
                    )
                ],
            )
            for token, logprob, step in zip(tokens, completion.logprobs, steps, strict=True)
        ]
    )


_PENALTIES = "sampling penalties are not served: the learner scores the sampler's own distribution"
UNSERVED = {
    "frequency_penalty": _PENALTIES,
    "presence_penalty": _PENALTIES,
    "repetition_penalty": _PENALTIES,
    "logit_bias": "biased logits are not served: sample the policy's own distribution",
    "best_of": "not served: ask for n completions (with logprobs) and rank them yourself",
    "suffix": "insertion is not served: put the text in the prompt",
    "stream_options": "streaming is not served: leave 'stream' false",
    "response_format": "structured output is not served: ask for the format in the prompt",
    "tools": "tool calls are not served: describe the tools in the prompt",
    "tool_choice": "tool calls are not served: describe the tools in the prompt",
    "functions": "function calls are not served: describe them in the prompt",
    "function_call": "function calls are not served: describe them in the prompt",
}
"""OpenAI parameters these routes do not serve, and what to do instead."""


def unserved_parameters(exc: RequestValidationError) -> str | None:
    """The 400 message for a request to an OpenAI route whose only fault is parameters that route
    does not take (each named, with what to do instead); None for any other refusal (422)."""
    errors = exc.errors()
    if not errors or any(e["type"] != "extra_forbidden" or len(e["loc"]) != 2 for e in errors):
        return None
    names = [str(e["loc"][1]) for e in errors]
    return "; ".join(
        f"{name!r} is not served: {UNSERVED[name].split(': ', 1)[1]}"
        if name in UNSERVED
        else f"{name!r} is not a parameter of this route (its OpenAPI schema at /docs lists them)"
        for name in names
    )
