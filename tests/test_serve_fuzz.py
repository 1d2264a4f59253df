"""Schemathesis fuzzes every route of a running `labkit serve` from the server's own /openapi.json:
valid and invalid bodies, odd strings, boundary numbers. Whatever it sends, the server must answer
with no 5xx, with a status, content type and body its document declares, and the engine must still
be serving afterwards.

The number of examples is bounded (FUZZ_EXAMPLES per route) so the suite stays quick, and the server
caps prompt + completion at 64 tokens (--max-model-len) so a generated request costs little.
"""

import os

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from labkit.serve.launch import ServerProcess

FUZZ_EXAMPLES = int(os.environ.get("LABKIT_FUZZ_EXAMPLES", "20"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
WITH_BODY = [
    ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/generate"),
    ("POST", "/v1/load_lora_adapter"),  # (LoRA is off here: every load is a 400)
    ("POST", "/v1/unload_lora_adapter"),
]
# (any string is a valid model name in the path: there is no invalid value to send)
WITHOUT_BODY = [
    ("GET", "/v1/models/{model}"),
    ("GET", "/v1/models"),
    ("GET", "/health"),
    ("GET", "/ready"),
    ("GET", "/metrics"),
]


@pytest.fixture(scope="module")
def fuzzed_server():
    with ServerProcess(threads=1, max_num_seqs=8, max_model_len=64) as srv:
        yield srv


@pytest.fixture(scope="module")
def api_schema(fuzzed_server):
    return schemathesis.openapi.from_url(fuzzed_server.url + "/openapi.json")


def test_every_route_is_fuzzed(api_schema):
    routes = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert routes == set(WITH_BODY + WITHOUT_BODY)


def fuzz(api_schema, method: str, path: str, mode: GenerationMode) -> None:
    """FUZZ_EXAMPLES requests drawn from the route's schema (valid ones, or ones that break it), each
    sent to the server and its response checked."""
    strategy = api_schema[path][method].as_strategy(generation_mode=mode)

    @given(case=strategy)
    @settings(
        max_examples=FUZZ_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def one(case):
        case.call_and_validate(checks=CHECKS, timeout=120)

    one()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
@pytest.mark.parametrize("method, path", WITH_BODY)
def test_fuzz_routes_with_a_body(api_schema, method, path, mode):
    fuzz(api_schema, method, path, mode)


@pytest.mark.parametrize("method, path", WITHOUT_BODY)
def test_fuzz_routes_without_a_body(api_schema, method, path):
    fuzz(api_schema, method, path, GenerationMode.POSITIVE)


def test_engine_alive_after_fuzzing(fuzzed_server):
    url = fuzzed_server.url
    assert httpx.get(url + "/ready").json()["status"] == "ready"
    r = httpx.post(url + "/v1/completions", json={"prompt": "It is", "max_tokens": 4}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    log = fuzzed_server.output()
    assert "unexpected error" not in log and "died" not in log, log[-3000:]
