"""The project's exception hierarchy.

One base class; each subclass also inherits the standard exception it stands for, so callers
that only know the stdlib types still catch it.
"""

from typing import Literal


class GrpoError(Exception):
    """Base class of every error this project raises on purpose."""


class ConfigError(GrpoError, ValueError):
    """A config file, CLI flag or data file is invalid."""


class DataError(ConfigError):
    """A data row is invalid; the message names file, line (JSONL) or row (other formats, from 1) and
    field. Position 0 is the file as a whole."""

    def __init__(self, path: str, line: int, field: str, reason: str, *, unit: Literal["line", "row"] = "line") -> None:
        where = f"{path}:{line}:" if unit == "line" else f"{path}: {unit} {line}:"
        super().__init__(f"{where} field {field!r}: {reason}")
        self.path, self.line, self.field, self.reason, self.unit = path, line, field, reason, unit


class ServerAsleepError(GrpoError, RuntimeError):
    """A rollout was requested while the engine sleeps; wake it first (HTTP 503)."""


class AdapterLoadError(GrpoError, ValueError):
    """An adapter could not be loaded; the previous version keeps serving (HTTP 400)."""


class AdapterNotFoundError(GrpoError, KeyError):
    """A request named an adapter the server does not hold (HTTP 404)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class AdapterVersionError(GrpoError, LookupError):
    """A rollout named an adapter version the server does not serve: it serves another version of
    the adapter, or none (the server has fallen behind its pool); nothing was generated (HTTP 409)."""


class SampleNotFoundError(GrpoError, KeyError):
    """A score was posted for a rollout id the sample store no longer holds (HTTP 404)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class RolloutServerError(GrpoError, RuntimeError):
    """The rollout server answered an error; carries the status code and its message."""

    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(f"rollout server answered {status_code}: {detail}")
        self.status_code, self.detail = status_code, detail


class ServerStartError(RolloutServerError):
    """A local rollout server exited, or never answered /health, during start-up; the message names
    the cause found in its log. No HTTP answer came: status_code is 0."""

    def __init__(self, message: str) -> None:
        # Not RolloutServerError's "rollout server answered <status>: ..." wording: it never answered.
        RuntimeError.__init__(self, message)
        self.status_code, self.detail = 0, message


class StaleAdapterError(GrpoError, RuntimeError):
    """The server served a policy version other than the one the learner expected."""


class RetiredVersionError(GrpoError, LookupError):
    """A rollout asked for ahead of time was pinned to an adapter version that a newer one replaced
    before every prompt was sampled: a server answered 409 for it, as it serves the live version.
    Ask again, pinned to the live version."""


class AdapterBusyError(GrpoError, RuntimeError):
    """Loading a version would need more adapters on the engine than it has slots (max_loras) while
    older versions still serve requests; retry once they finish (HTTP 409)."""


class MergedAdapterError(GrpoError, RuntimeError):
    """A request needs other weights than the ones the server samples from: with
    adapter_serving='merged' one adapter is merged into them, so the base model, or a second
    adapter name, is served only once it is unloaded (HTTP 409)."""


class EngineDeadError(GrpoError, RuntimeError):
    """The inference engine died; the server cannot serve and exits so a supervisor restarts it
    (HTTP 503)."""


class InvalidRequestError(GrpoError, ValueError):
    """A well-formed request the server cannot accept: over a configured bound, or scores
    shaped unlike their rollout (HTTP 422)."""


class UnauthorizedError(GrpoError, PermissionError):
    """A request without the server's API key, refused before its body is read (HTTP 401)."""


class PayloadTooLargeError(GrpoError, ValueError):
    """A request body over the server's max_body_bytes, refused without reading the rest (HTTP 413)."""


class RewardFunctionError(GrpoError, RuntimeError):
    """A reward function raised, or returned something other than one number or None per
    completion; the message names the function and the step, whose update is not taken."""


class UnsupportedFeatureError(GrpoError, ValueError):
    """A request asked for something this server does not serve, such as a streamed answer (HTTP 400)."""


class AdapterPublishError(GrpoError, RuntimeError):
    """A replica refused an adapter version (or loaded other files than the learner saved): no
    replica serves it, and the pool serves the previous version as before."""


class DeviceError(GrpoError, RuntimeError):
    """An NVIDIA GPU is visible but torch cannot use it (a CPU build of torch, or a driver too old
    for its CUDA): refused rather than run silently on the CPU."""
