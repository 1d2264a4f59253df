"""One error shape for every failure, as OpenAI sends it, so clients (the `openai` package raises its
usual exception classes from it) never have to guess:

    {"error": {"message": "...", "type": "invalid_request_error", "param": "top_p", "code": null}}

Unknown routes (404), wrong methods (405), bodies that are not JSON, fields that fail validation,
and anything unexpected (500) all come out this way. Clients never see a traceback or a file path:
the server log keeps the detail.
"""

import json
import logging
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException

log = logging.getLogger("labkit.serve")


class APIError(Exception):
    """Raised anywhere in a handler; the app turns it into OpenAI's error JSON with this status."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type,
            param,
            code,
        )
        self.headers = headers or {}

    def body(self) -> dict:
        error = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return {"error": error}

    def response(self) -> Response:
        # ensure_ascii: a message that quotes client input cannot fail to encode (lone surrogates)
        return Response(
            json.dumps(self.body()),
            status_code=self.status,
            headers=self.headers,
            media_type="application/json",
        )


def param_of(loc: tuple) -> str | None:
    """pydantic's error location -> OpenAI's `param`: ("body", "messages", 0, "content") ->
    "messages[0].content". Union-branch labels (`str`, `list[int]`...) are left out, and so is
    a JSON decode error's character offset."""
    path = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            path += f"[{part}]" if path else ""
        elif isinstance(part, str) and part.isidentifier() and not is_union_tag(part):
            path += f".{part}" if path else part
    return path or None


def is_union_tag(part: str) -> bool:
    """`str`, `int`, `list`, `TextPart`...: which branch of a union failed, not a field name."""
    return part in {"str", "int", "float", "bool", "list", "dict"} or part[0].isupper()


STATUS_MESSAGES = {
    404: ("not_found_error", "There is no route {method} {path}; see /docs for the API."),
    405: ("invalid_request_error", "Method {method} is not allowed on {path}."),
}


def validation_message(err: dict) -> str:
    if err["type"] == "json_invalid":
        return f"The request body is not valid JSON ({err.get('ctx', {}).get('error', 'decode error')})."
    if len(err["loc"]) <= 1 and err["type"] in ("missing", "model_attributes_type", "dict_type"):
        return "The request body must be a JSON object, sent with Content-Type: application/json."
    if (
        err["type"] in ("string_too_short", "too_short")
        and (err.get("ctx") or {}).get("min_length") == 1
    ):
        return f"{param_of(err['loc']) or 'body'}: must not be empty"
    message = err["msg"].removeprefix("Value error, ")
    if (err.get("ctx") or {}).get("param"):  # our own model-level checks name it in the message
        return message
    return f"{param_of(err['loc']) or 'body'}: {message}"


def error_param(err: dict) -> str | None:
    if err["type"] == "json_invalid":  # its location is a character offset, not a parameter
        return None
    return (err.get("ctx") or {}).get("param") or param_of(err["loc"])


def validation_error_response(errors: list[dict]) -> Response:
    """pydantic's errors -> one 400: the first problem's parameter, and one message per parameter
    (a value that fits no branch of a union would otherwise be reported once per branch)."""
    # the most telling first: a value error or a range over "not a string" from a union's other branch
    errors = sorted(errors, key=lambda e: e["type"].endswith("_type"))
    by_param: dict = {}
    for err in errors:
        by_param.setdefault(error_param(err), validation_message(err))
    param = error_param(errors[0]) if errors else None
    message = "; ".join(list(by_param.values())[:5]) or "Invalid request."
    return APIError(400, message, param=param).response()


def install(app: FastAPI) -> None:
    """Register the handlers that give every error the shape above."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError):
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError):
        return validation_error_response(list(err.errors()))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException):
        type_, template = STATUS_MESSAGES.get(
            err.status_code, ("invalid_request_error", "{detail}")
        )
        message = template.format(method=request.method, path=request.url.path, detail=err.detail)
        return APIError(err.status_code, message, type=type_, headers=err.headers).response()

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception):
        log.exception("unexpected error in %s %s", request.method, request.url.path)
        return APIError(
            500, "Internal server error (details in the server log).", type="server_error"
        ).response()
