"""/openapi.json that describes what the server really does, so schema-driven tools (clients,
schemathesis in the tests) can trust it.

FastAPI's default document claims every route answers 422 with its own validation-error shape, and that
every response is JSON. This server answers 400 in OpenAI's shape (errors.py), streams
text/event-stream when asked, and /metrics is Prometheus text. The request constraints come from
protocol.py's strict models, which are what the server enforces. The gateway's headers are declared
too: X-Request-Id on every response (accesslog.py), OpenAI's x-ratelimit-* on the generation routes
when the key has limits, and Retry-After on a 429 (ratelimit.py).
"""

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from .protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    ModelCard,
    ModelList,
    Status,
)

# one server-sent event (as OpenAPI < 3.2 describes an event stream): `data: {chunk JSON}`, one per
# update, then `data: [DONE]`; an error after the headers went out comes as `data: {"error": ...}`
SSE = {
    "text/event-stream": {
        "schema": {
            "type": "object",
            "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
            "required": ["data"],
        }
    }
}


def _header(description: str, type_: str = "string", required: bool = False) -> dict:
    return {"description": description, "required": required, "schema": {"type": type_}}


REQUEST_ID = {
    "X-Request-Id": _header(
        "the client's X-Request-Id if it was sane, else a fresh one (the access log's request_id)",
        required=True,
    )
}
# OpenAI's names; only for the limits the key has (none: unlimited, no header)
RATE_LIMIT = {
    f"x-ratelimit-{what}-{kind}": _header(description, type_)
    for kind in ("requests", "tokens")
    for what, description, type_ in (
        ("limit", f"{kind} per minute allowed to this key", "integer"),
        ("remaining", f"{kind} left in the key's bucket now", "integer"),
        ("reset", "time until the bucket is full again: 250ms, 1s, 6m0s", "string"),
    )
}
RETRY_AFTER = {"Retry-After": _header("whole seconds to wait before retrying", "integer", True)}


def _errors(*statuses: int) -> dict:
    out: dict = {s: {"model": ErrorResponse, "headers": REQUEST_ID} for s in statuses}
    if 429 in statuses:  # a key over its limit (or a full queue): when to come back
        out[429]["headers"] = {**REQUEST_ID, **RETRY_AFTER, **RATE_LIMIT}
        out[429]["description"] = (
            "Rate limit reached for the key (error type `requests` or `tokens`, code "
            "`rate_limit_exceeded`), or the server's queue is full (code `queue_full`)"
        )
    return out


GENERATED = {**REQUEST_ID, **RATE_LIMIT}
TEXT = {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Success: ..."}
GENERATION_ERRORS = _errors(400, 401, 404, 429, 500, 503)

RESPONSES: dict[tuple[str, str], dict] = {
    ("POST", "/v1/completions"): {
        200: {"model": CompletionResponse, "content": SSE, "headers": GENERATED},
        **GENERATION_ERRORS,
    },
    ("POST", "/v1/chat/completions"): {
        200: {"model": ChatCompletionResponse, "content": SSE, "headers": GENERATED},
        **GENERATION_ERRORS,
    },
    ("POST", "/generate"): {
        200: {"model": GenerateResponse, "headers": GENERATED},
        **_errors(400, 401, 429, 500, 503),
    },
    ("GET", "/v1/models"): {200: {"model": ModelList}, **_errors(401)},
    ("GET", "/v1/models/{model}"): {200: {"model": ModelCard}, **_errors(401, 404)},
    ("POST", "/v1/load_lora_adapter"): {200: TEXT, **_errors(400, 401)},
    ("POST", "/v1/unload_lora_adapter"): {200: TEXT, **_errors(400, 401, 404)},
    ("GET", "/health"): {200: {"model": Status}, 503: {"model": Status}},
    ("GET", "/ready"): {200: {"model": Status}, 503: {"model": Status}},
    ("GET", "/metrics"): {
        200: {
            "content": {"text/plain": {"schema": {"type": "string"}}},
            "description": "Prometheus",
        }
    },
}


def document_routes(app: FastAPI, max_n: int, max_tokens: int) -> None:
    """Drop FastAPI's 422 from the document (the routes declare RESPONSES), and write this server's
    limits (its batch size bounds n, its context bounds max_tokens) into the request schemas."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for operations in schema["paths"].values():
                for operation in operations.values():
                    operation["responses"].pop("422", None)
            schemas = schema["components"]["schemas"]
            for name in ("HTTPValidationError", "ValidationError"):
                schemas.pop(name, None)
            limits = {"n": max_n, "max_tokens": max_tokens, "max_completion_tokens": max_tokens}
            limits["max_new_tokens"] = max_tokens
            for request in (CompletionRequest, ChatCompletionRequest, GenerateRequest):
                properties = schemas[request.__name__]["properties"]
                exact = request.model_json_schema()["properties"]
                for name in properties:
                    exact_integer_bounds(properties[name], exact[name])
                for name, value in limits.items():
                    if name in properties:
                        set_maximum(properties[name], value)
            app.openapi_schema = schema
        return app.openapi_schema

    # FastAPI's documented way to extend the schema ("Extending OpenAPI"): replace the app's method
    app.openapi = openapi  # type: ignore[method-assign]


def exact_integer_bounds(prop: dict, exact: dict) -> None:
    """Put back the request model's own integer bounds (`exact`: pydantic's schema of the same property).
    FastAPI's OpenAPI model stores bounds as floats, and int64's largest value has no float: a seed's
    maximum 2**63 - 1 became 2**63, one more than the server accepts, and a fuzzer sent it."""
    if prop.get("type") == "integer":
        prop.update({k: exact[k] for k in ("minimum", "maximum") if k in exact})
    for branch, exact_branch in zip(prop.get("anyOf", []), exact.get("anyOf", [])):
        exact_integer_bounds(branch, exact_branch)
    if isinstance(prop.get("items"), dict):
        exact_integer_bounds(prop["items"], exact["items"])


def set_maximum(prop: dict, value: int) -> None:
    """Lower the integer maximum of a property (in each branch of an anyOf with null)."""
    for branch in prop.get("anyOf", [prop]):
        if branch.get("type") == "integer":
            branch["maximum"] = min(branch.get("maximum", value), value)
