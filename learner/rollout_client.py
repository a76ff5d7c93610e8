"""HTTP client of the rollout server, speaking the schemas in `shared.schemas`."""

from __future__ import annotations

import os
import tarfile
import tempfile
import time
from pathlib import Path
from typing import IO, Any

import httpx
from pydantic import BaseModel

from shared.errors import RolloutServerError, StaleAdapterError
from shared.schemas import (
    AdapterDigest,
    AdapterDigestRequest,
    AdapterInfo,
    AdapterUpload,
    LoadLoraAdapterRequest,
    ModelCard,
    ModelsResponse,
    RolloutRequest,
    RolloutResponse,
    SampleScores,
    SamplesResponse,
    SleepState,
    UnloadLoraAdapterRequest,
)


class RolloutClient:
    """Calls the server; retries connection failures only, a bounded number of times."""

    def __init__(self, base_url: str, *, api_key: str | None = None, timeout_s: float = 600.0, retries: int = 3):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=base_url, headers=headers, timeout=timeout_s)
        self._retries = retries

    def generate(self, request: RolloutRequest, *, expected_version: int) -> RolloutResponse:
        """Rollouts; raises StaleAdapterError unless the server used `expected_version`."""
        response = RolloutResponse.model_validate(self._call("POST", "/v1/rollouts", request))
        if response.policy_version != expected_version:
            raise StaleAdapterError(
                f"asked for {request.adapter!r} version {expected_version}, the server sampled "
                f"version {response.policy_version}"
            )
        return response

    def load_adapter(self, name: str, path: str, *, version: int | None = None) -> AdapterInfo:
        """Load (or replace) adapter `name` from `path`, served as `version` (None: the server's next
        number for `name`); a refusal raises RolloutServerError."""
        request = LoadLoraAdapterRequest(lora_name=name, lora_path=path, version=version)
        return AdapterInfo.model_validate(self._call("POST", "/v1/load_lora_adapter", request))

    def adapter_digest(self, path: str) -> str | None:
        """The sha256 of the directory `path` under the server's adapter root (None: none there)."""
        answer = self._call("POST", "/v1/adapter_digest", AdapterDigestRequest(lora_path=path))
        return AdapterDigest.model_validate(answer).sha256

    def upload_adapter(self, adapter_dir: Path, sha256: str) -> AdapterUpload:
        """Send the files of `adapter_dir` (hashing to `sha256`) as an uncompressed tar, streamed
        from a temporary file; the answer's lora_path is where the server placed them."""
        with tempfile.TemporaryFile() as archive:
            with tarfile.open(fileobj=archive, mode="w:", format=tarfile.PAX_FORMAT) as tar:
                for name in sorted(os.listdir(adapter_dir)):
                    if (adapter_dir / name).is_file():
                        tar.add(adapter_dir / name, arcname=name, recursive=False)
            size = archive.tell()
            path = f"/v1/adapter_uploads/{sha256}"
            headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
            answer = self._call("PUT", path, content=_Rewound(archive), headers=headers)
        return AdapterUpload.model_validate(answer)

    @property
    def base_url(self) -> str:
        """The server's URL, as given."""
        return str(self._http.base_url).rstrip("/")

    def unload_adapter(self, name: str) -> None:
        """Stop serving adapter `name`."""
        self._call("POST", "/v1/unload_lora_adapter", UnloadLoraAdapterRequest(lora_name=name))

    def served(self, name: str) -> ModelCard | None:
        """What the server serves as adapter `name` now (None if nothing)."""
        models = ModelsResponse.model_validate(self._call("GET", "/v1/models"))
        return next((m for m in models.data if m.kind == "lora" and m.id == name), None)

    def served_version(self, name: str) -> int | None:
        """The version of `name` the server serves now (None if it serves none)."""
        card = self.served(name)
        return card.version if card else None

    def sleep(self, level: int = 1, lease_s: float | None = None) -> SleepState:
        """Ask the server to release the GPU; with `lease_s` it wakes by itself that much later."""
        lease = "" if lease_s is None else f"&lease_s={lease_s}"
        return SleepState.model_validate(self._call("POST", f"/sleep?level={level}{lease}"))

    def wake_up(self) -> SleepState:
        """Ask the server to take the GPU back."""
        return SleepState.model_validate(self._call("POST", "/wake_up"))

    def post_scores(self, rollout_id: str, scores: SampleScores) -> None:
        """Attach rewards and advantages to a recorded rollout."""
        self._call("POST", f"/v1/samples/{rollout_id}/scores", scores)

    def recent_samples(self, limit: int = 10) -> SamplesResponse:
        """The server's most recent rollouts, newest first, with scores where posted."""
        return SamplesResponse.model_validate(self._call("GET", f"/v1/samples?limit={limit}"))

    def wake_up_on_exit(self, timeout_s: float = 10.0) -> SleepState:
        """`wake_up` over a new connection with a short timeout: on the way out of an interrupted
        process (Ctrl-C mid-request), the pool's connections may be left mid-exchange."""
        with httpx.Client(base_url=self._http.base_url, headers=self._http.headers, timeout=timeout_s) as http:
            try:
                r = http.post("/wake_up")
            except httpx.TransportError as e:
                raise RolloutServerError(0, f"cannot reach {self._http.base_url}/wake_up: {e}") from e
        if r.status_code >= 400:
            raise RolloutServerError(r.status_code, f"POST /wake_up: {r.text}")
        return SleepState.model_validate(r.json())

    def is_healthy(self, timeout_s: float = 2.0) -> bool:
        """Whether /health answers 200 within `timeout_s` (no retry)."""
        try:
            return self._http.get("/health", timeout=timeout_s).status_code == 200
        except httpx.TransportError:
            return False

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def _call(
        self,
        method: str,
        path: str,
        body: BaseModel | None = None,
        *,
        content: _Rewound | None = None,
        headers: dict[str, str] | None = None,
    ) -> Any:
        payload = body.model_dump(mode="json") if body is not None else None
        for attempt in range(self._retries + 1):
            try:
                sent = content.again() if content is not None else None
                r = self._http.request(method, path, json=payload, content=sent, headers=headers)
                break
            except (httpx.NetworkError, httpx.RemoteProtocolError) as e:  # not timeouts: the work may be running
                if attempt == self._retries:
                    raise RolloutServerError(0, f"cannot reach {self._http.base_url}{path}: {e}") from e
                time.sleep(2**attempt)
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail", r.text)
            except ValueError:
                detail = r.text
            raise RolloutServerError(r.status_code, f"{method} {path}: {detail}")
        return r.json()


class _Rewound:
    """A file's bytes, sent from the start on every try."""

    def __init__(self, file: IO[bytes]) -> None:
        self._file = file

    def again(self) -> IO[bytes]:
        self._file.seek(0)
        return self._file
