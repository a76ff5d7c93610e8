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
from pydantic import ValidationError

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
    RolloutRequest,
    RolloutResponse,
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
    """n completions of each prompt text, in OpenAI's legacy completions shape."""
    prompts: list[Prompt] = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
    rollout = await _rollout(body, prompts, body.max_tokens, service, request)
    choices = [
        OpenAICompletionChoice(
            index=index,
            text=completion.text,
            logprobs=None if body.logprobs is None else _completion_logprobs(completion, service),
            finish_reason=completion.finish_reason,
        )
        for index, completion in enumerate(c for result in rollout.results for c in result.completions)
    ]
    return OpenAICompletionResponse(
        id=f"cmpl-{rollout.rollout_id}",
        created=int(rollout.created_at.timestamp()),
        model=body.model,
        choices=choices,
        usage=_usage(rollout),
        policy_version=rollout.policy_version,
    )


@openai_router.post("/v1/chat/completions", responses=error_responses(*_RAISED, openai=True))
async def chat_completions(body: OpenAIChatRequest, service: ServiceDep, request: Request) -> OpenAIChatResponse:
    """n assistant turns answering the conversation, rendered by the model's chat template."""
    max_tokens = body.max_completion_tokens or body.max_tokens
    rollout = await _rollout(body, [body.messages], max_tokens, service, request)
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
    prompts: list[Prompt],
    max_tokens: int,
    service: RolloutService,
    request: Request,
) -> RolloutResponse:
    """`body`'s sampling of `prompts` as a rollout of the adapter its `model` names."""
    if body.stream:
        raise UnsupportedFeatureError("stream=true: this server does not stream; leave 'stream' false")
    adapter = service.adapter_of(body.model)
    stop = [body.stop] if isinstance(body.stop, str) else body.stop or []
    try:
        rollout_request = RolloutRequest(
            prompts=prompts,
            n=body.n,
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
            stop=stop,
            adapter=adapter,
        )
    except ValidationError as e:
        # A rollout's rules across fields (greedy decoding takes n=1, ...) hold here too: a 422 as
        # for any request that breaks its schema.
        raise RequestValidationError([{**err, "loc": ("body", *err["loc"])} for err in e.errors()]) from None
    return await cancelled_on_disconnect(request, service.rollout(rollout_request))


def _usage(rollout: RolloutResponse) -> OpenAIUsage:
    prompt_tokens = sum(len(result.prompt_token_ids) for result in rollout.results)
    completion_tokens = sum(len(c.token_ids) for result in rollout.results for c in result.completions)
    return OpenAIUsage(
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens
    )


def _completion_logprobs(completion: Completion, service: RolloutService) -> OpenAICompletionLogprobs:
    tokens = service.token_texts(completion.token_ids)
    return OpenAICompletionLogprobs(
        tokens=tokens,
        token_logprobs=completion.logprobs,
        text_offset=list(accumulate(map(len, tokens), initial=0))[:-1],
    )


def _chat_logprobs(completion: Completion, service: RolloutService) -> OpenAIChatLogprobs:
    tokens = service.token_texts(completion.token_ids)
    return OpenAIChatLogprobs(
        content=[
            OpenAITokenLogprob(token=token, logprob=logprob, bytes=list(token.encode()))
            for token, logprob in zip(tokens, completion.logprobs, strict=True)
        ]
    )
