"""Domain errors -> HTTP, in one place: the status each error answers with (app.py's handlers and
the guard use `STATUS`), and the OpenAPI `responses` a route declares for the errors it can raise.

Every error answers the same body, `ErrorResponse` ({"detail": "<text>"}), but on the
OpenAI-compatible routes (`OPENAI_PATHS`), which answer OpenAI's shape (`OpenAIErrorResponse`), so
that OpenAI's clients show the message (`error_body`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from fastapi.exceptions import RequestValidationError

from shared.errors import (
    AdapterBusyError,
    AdapterLoadError,
    AdapterNotFoundError,
    AdapterVersionError,
    EngineDeadError,
    InvalidRequestError,
    MergedAdapterError,
    PayloadTooLargeError,
    SampleNotFoundError,
    ServerAsleepError,
    UnauthorizedError,
    UnsupportedFeatureError,
)
from shared.schemas import ErrorResponse, OpenAIError, OpenAIErrorResponse


class HttpError(NamedTuple):
    status: int
    description: str
    """When it is answered, as the OpenAPI schema tells a client."""


ERRORS: dict[type[Exception], HttpError] = {
    ServerAsleepError: HttpError(503, "the server is asleep: POST /wake_up first"),
    EngineDeadError: HttpError(503, "the engine is dead: the server exits, for its supervisor to restart it"),
    AdapterBusyError: HttpError(
        409, "every adapter slot of the engine holds a version still in use: retry when its requests end"
    ),
    MergedAdapterError: HttpError(
        409,
        "another adapter is merged into the weights the server samples from (--adapter-serving merged): "
        "rollouts of the base model, and loads of another adapter name, wait for its unload",
    ),
    AdapterLoadError: HttpError(
        400, "the adapter was refused (missing, malformed, or outside the adapter root); the old version serves on"
    ),
    AdapterNotFoundError: HttpError(404, "no adapter of that name is loaded"),
    AdapterVersionError: HttpError(
        409, "the server does not serve the adapter version the request names (it serves another, or none)"
    ),
    UnsupportedFeatureError: HttpError(400, "asks for what this server does not serve (a streamed answer)"),
    SampleNotFoundError: HttpError(404, "no recorded rollout has that id (evicted, or never made)"),
    InvalidRequestError: HttpError(422, "over a bound of the server, or scores shaped unlike their rollout"),
    RequestValidationError: HttpError(422, "the request does not match its schema"),
    UnauthorizedError: HttpError(401, "missing or wrong API key (when the server has one), checked before routing"),
    PayloadTooLargeError: HttpError(413, "the body is over the server's max_body_bytes, checked before routing"),
}

STATUS: dict[type[Exception], int] = {exc: error.status for exc, error in ERRORS.items()}

UNPARSED_BODY = HttpError(400, "the body is not JSON text (not UTF-8, or nested too deep)")
"""FastAPI's own refusal (an HTTPException) of a JSON body it cannot parse, before validation: every
route with a body answers it."""


OPENAI_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
"""The routes whose errors answer OpenAI's shape, `OpenAIErrorResponse`, with every path under
/v1/models/ (OpenAI's retrieve-model route, `is_openai_path`)."""


def is_openai_path(path: str) -> bool:
    """Whether errors on `path` (a request's, or a route's template) answer OpenAI's shape."""
    return path in OPENAI_PATHS or path.startswith("/v1/models/")


def error_responses(
    *raised: type[Exception] | HttpError, public: bool = False, openai: bool = False
) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` of a route that raises `raised` (error types, or FastAPI's own refusals as
    an HttpError), plus the guard's refusals (413; and 401 unless the route is public): one entry
    per status, each with the body `ErrorResponse` (`OpenAIErrorResponse` for an OpenAI route)."""
    guard = (PayloadTooLargeError,) if public else (PayloadTooLargeError, UnauthorizedError)
    why: dict[int, list[str]] = {}
    for error in (*raised, *guard):
        status, description = error if isinstance(error, HttpError) else ERRORS[error]
        why.setdefault(status, []).append(description)
    model = OpenAIErrorResponse if openai else ErrorResponse
    return {status: {"model": model, "description": "; or ".join(reasons)} for status, reasons in why.items()}


def error_body(path: str, status: int, message: str, error: type[Exception] | None = None) -> dict[str, Any]:
    """The JSON body of an error answer on `path`: `{"detail": message}`, or on an OpenAI route
    OpenAI's `{"error": {"message", "type", "param", "code"}}`."""
    if not is_openai_path(path):
        return ErrorResponse(detail=message).model_dump()
    if status == 401:
        kind = "authentication_error"
    elif status == 404:
        kind = "not_found_error"
    else:
        kind = "server_error" if status >= 500 else "invalid_request_error"
    # On these routes only `model` names what a request wants served: an unknown one is this 404.
    unknown_model = error is AdapterNotFoundError
    body = OpenAIError(
        message=message,
        type=kind,
        param="model" if unknown_model else None,
        code="model_not_found" if unknown_model else None,
    )
    return OpenAIErrorResponse(error=body).model_dump()
