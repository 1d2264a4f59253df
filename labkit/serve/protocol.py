"""The OpenAI wire format: request bodies we accept, and the JSON shapes we send back.

Requests are parsed strictly, so what the OpenAPI document (/openapi.json) declares is what the server
enforces: a boolean is not a number, "yes" is not a boolean, a float is an integer only when JSON
Schema says so (1.0 is, 1.5 is not), and numbers must survive the trip into the engine's tensors (no value that becomes 0, inf or nan in float32, no
integer beyond int64). Unknown fields are ignored, as vLLM does, but OpenAI or vLLM parameters this
server cannot honour (best_of, penalties, logit_bias...) are refused with a 400 that names them, so a
client never believes it got something it did not.

Structured outputs (labkit/engine/structured.py) come in OpenAI's `response_format` (json_object,
json_schema) and `tools` / `tool_choice` (chat; tools.py turns them into a prompt and a grammar), and in
vLLM's `structured_outputs` extra (json, regex, choice, grammar; both endpoints). A schema or grammar the
engine cannot enforce is a 400 naming the parameter, found here before the request is queued.

The response models at the end document the responses (/openapi.json); the handlers build plain dicts.
"""

import time
import uuid
from typing import Annotated, Any, ClassVar, Literal, TypeGuard

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from labkit.engine.sampling import MAX_LOGPROBS, MAX_N
from labkit.engine.structured import StructuredOutputsParams, grammar_error

from .errors import APIError
from .tools import tool_grammar

__all__ = ["APIError"]  # (re-exported: handlers raise it from here too)

INT64_MAX = 2**63 - 1
F32_TINY = 1.1754943508222875e-38  # the smallest normal float32: below it a value rounds to 0
MIN_TEMPERATURE = 1e-5  # logits / T overflows float32 for smaller T; vLLM treats T < 1e-5 as greedy
MAX_STOP = 4  # stop strings per request (OpenAI's limit)


def _unicode_text(text: str) -> str:
    """JSON can carry lone UTF-16 surrogates ("\\ud800") that no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(
            "text must be valid Unicode: it contains a lone surrogate (\\ud800-\\udfff)"
        ) from None
    return text


def _temperature(t: float) -> float:
    if 0 < t < MIN_TEMPERATURE:
        raise ValueError(
            f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}: smaller values "
            f"overflow float32 logits"
        )
    return t


def _integral(value: Any) -> Any:
    """1.0 -> 1: JSON Schema's "integer" is any number with no fractional part, so a client (or a JSON
    encoder) may send n=1.0. Everything else goes on to the strict int check: 1.5, inf and True fail."""
    if type(value) is float and value.is_integer():
        return int(value)
    return value


INTEGRAL = BeforeValidator(_integral)  # on every integer field of a request
Text = Annotated[str, AfterValidator(_unicode_text)]
Int64 = Annotated[int, Field(ge=-(2**63), le=INT64_MAX), INTEGRAL]
TokenId = Annotated[int, Field(ge=0, le=INT64_MAX), INTEGRAL]
Temperature = Annotated[
    float,
    Field(
        ge=0.0,
        le=2.0,
        json_schema_extra={"anyOf": [{"const": 0}, {"minimum": MIN_TEMPERATURE}]},
    ),
    AfterValidator(_temperature),
]


def _top_p(p: float) -> float:
    if not F32_TINY <= p <= 1:
        raise ValueError(
            f"top_p must be in (0, 1] and not round to 0 in float32 (>= {F32_TINY:.3g})"
        )
    return p


TopP = Annotated[
    float, Field(json_schema_extra={"minimum": F32_TINY, "maximum": 1.0}), AfterValidator(_top_p)
]
Unsupported = Annotated[float, Field(ge=0.0, le=0.0)]  # penalties: only 0 (off) is accepted

# parameters OpenAI or vLLM define that labkit's engine cannot honour, with the values that mean "off"
UNSUPPORTED: dict[str, tuple] = {
    "best_of": (None, 1),
    "suffix": (None, ""),
    "functions": (None, []),  # (the deprecated spelling of tools)
    "function_call": (None, "none"),
    "logit_bias": (None, {}),
    "prompt_logprobs": (None,),
    "min_tokens": (None, 0),
    "min_p": (None, 0, 0.0),
    "repetition_penalty": (None, 1, 1.0),
    "use_beam_search": (None, False),
    "length_penalty": (None, 1, 1.0),
    "guided_json": (None,),
    "guided_regex": (None,),
    "guided_choice": (None,),
    "guided_grammar": (None,),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "web_search_options": (None,),
}


# chat-only parameters, refused by /v1/completions as above (as vLLM does)
CHAT_ONLY: dict[str, tuple] = {
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "parallel_tool_calls": (None,),
    "response_format": (None, {"type": "text"}),
}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False


def _refuse(param: str, message: str) -> PydanticCustomError:
    return PydanticCustomError(
        "invalid_structure", "{param}: {message}", {"param": param, "message": message}
    )


def _enforceable(spec: StructuredOutputsParams, param: str) -> StructuredOutputsParams:
    error = grammar_error(spec)
    if error:
        raise _refuse(param, f"cannot be enforced: {error}")
    return spec


class StructuredOutputs(_Strict):
    """vLLM's `structured_outputs` extra: exactly one of these."""

    json_: dict[str, Any] | None = Field(default=None, alias="json", description="a JSON schema")
    json_object: bool | None = Field(default=None, description="true: any JSON object")
    regex: Text | None = None
    choice: Annotated[list[Annotated[Text, Field(min_length=1)]], Field(min_length=1)] | None = None
    grammar: Text | None = Field(default=None, description="a Lark grammar (llguidance's dialect)")

    def spec(self) -> StructuredOutputsParams:
        try:
            spec = StructuredOutputsParams(
                json=self.json_,
                json_object=bool(self.json_object),
                regex=self.regex,
                choice=self.choice,
                grammar=self.grammar,
            )
        except ValueError as err:
            raise _refuse("structured_outputs", str(err)) from None
        return _enforceable(spec, "structured_outputs")


class _Sampling(_Strict):
    """Fields shared by /v1/completions and /v1/chat/completions (OpenAI names, plus vLLM's extras)."""

    model: Text | None = None
    max_tokens: Annotated[int, Field(ge=1, le=INT64_MAX), INTEGRAL] | None = None
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: Annotated[int, Field(ge=-1, le=INT64_MAX), INTEGRAL] = 0  # vLLM extra; 0 or -1 = off
    n: Annotated[int, Field(ge=1, le=MAX_N), INTEGRAL] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: (
        Text
        | Annotated[list[Annotated[Text, Field(min_length=1)]], Field(max_length=MAX_STOP)]
        | None
    ) = None
    stop_token_ids: list[TokenId] | None = None  # vLLM extra
    ignore_eos: bool = False  # vLLM extra: benchmarks use it for fixed-length outputs
    seed: Int64 | None = None
    presence_penalty: Unsupported = 0.0
    frequency_penalty: Unsupported = 0.0
    user: Text | None = None
    structured_outputs: StructuredOutputs | None = None  # vLLM extra
    _spec: StructuredOutputsParams | None = PrivateAttr(default=None)  # what the engine enforces

    unsupported: ClassVar[dict[str, tuple]] = UNSUPPORTED

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, off in cls.unsupported.items():
                if name in data and not any(data[name] == v for v in off):
                    raise PydanticCustomError(
                        "unsupported",
                        "{param} is not supported by labkit's engine; leave it out",
                        {"param": name},
                    )
        return data

    @model_validator(mode="after")
    def _stops(self):
        if self.stop == "":
            raise PydanticCustomError(
                "empty_stop", "stop strings must not be empty", {"param": "stop"}
            )
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = self.stop or None
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def spec(self) -> StructuredOutputsParams | None:
        """The constraint for SamplingParams.structured_outputs, checked enforceable."""
        return self._spec

    @model_validator(mode="after")
    def _structured(self):
        self._spec = self.constraint()
        return self

    def constraint(self) -> StructuredOutputsParams | None:
        """What the output must match (checked enforceable: a 400 naming the parameter if not)."""
        return self.structured_outputs.spec() if self.structured_outputs else None


Prompt = (
    Annotated[Text, Field(min_length=1)]
    | Annotated[list[TokenId], Field(min_length=1)]
    | Annotated[list[Annotated[Text, Field(min_length=1)]], Field(min_length=1, max_length=1)]
    | Annotated[
        list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1, max_length=1)
    ]
)


def is_token_ids(prompt: object) -> TypeGuard[list[int]]:
    """A validated prompt given as token ids: pydantic has checked that a list holds one kind of item."""
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], int)


class CompletionRequest(_Sampling):
    unsupported: ClassVar[dict[str, tuple]] = {**UNSUPPORTED, **CHAT_ONLY}

    prompt: Prompt = Field(
        description="One prompt: text or token ids (a list holding one of them is accepted too; "
        "batches of several prompts are not: send one request per prompt)"
    )
    max_tokens: Annotated[int, Field(ge=0, le=INT64_MAX), INTEGRAL] | None = Field(
        default=None,
        description="default 16; 0 only with echo (score the prompt, generate nothing)",
    )
    echo: bool = Field(default=False, description="return the prompt before the completion")
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS), INTEGRAL] | None = Field(
        default=None,
        description="log-probability of each token, and of the `logprobs` most likely alternatives",
    )

    @model_validator(mode="after")
    def _single_prompt(self):
        p = self.prompt
        if isinstance(p, list) and isinstance(p[0], (str, list)):
            self.prompt = p[0]
        if self.max_tokens == 0 and not self.echo:
            raise PydanticCustomError(
                "max_tokens_zero",
                "max_tokens must be >= 1 (0 is allowed only with echo, to score the prompt)",
                {"param": "max_tokens"},
            )
        return self


class TextPart(_Strict):
    type: Literal["text"] = Field(description="only text parts are supported")
    text: Text


FunctionName = Annotated[Text, Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")]


class CalledFunction(_Strict):
    name: FunctionName
    arguments: Text = Field(description="the arguments, as JSON text")


class ToolCall(_Strict):
    id: Text
    type: Literal["function"]
    function: CalledFunction


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    name: Text | None = None
    tool_calls: list[ToolCall] | None = Field(default=None, description="assistant messages")
    tool_call_id: Text | None = Field(default=None, description="tool messages: the call answered")
    # (after tool_calls: its check reads them)
    content: Text | Annotated[list[TextPart], Field(min_length=1)] | None = Field(
        default=None, validate_default=True
    )

    @field_validator("content")
    @classmethod
    def _content(cls, content, info: ValidationInfo):
        if content is None and not (
            info.data.get("role") == "assistant" and info.data.get("tool_calls")
        ):
            raise ValueError(
                "content is required (only an assistant message with tool_calls may omit it)"
            )
        return content

    @model_validator(mode="after")
    def _tool_call_id(self):
        if self.role == "tool" and self.tool_call_id is None:
            raise PydanticCustomError("tool_call_id", "a tool message needs tool_call_id")
        return self

    def text(self) -> str:
        """OpenAI allows content as a list of parts; we accept text parts and join them."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(part.text for part in self.content)


class FunctionDefinition(_Strict):
    name: FunctionName
    description: Text | None = None
    parameters: dict[str, Any] | None = Field(
        default=None, description="a JSON schema for the arguments (an object)"
    )
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: FunctionName


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class JSONSchemaFormat(_Strict):
    name: FunctionName
    description: Text | None = None
    schema_: dict[str, Any] = Field(alias="schema", description="the JSON schema to follow")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = Field(default=None, description="with type json_schema")

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise _refuse("response_format", 'type "json_schema" needs json_schema')
        return self


class ChatCompletionRequest(_Sampling):
    unsupported: ClassVar[dict[str, tuple]] = {**UNSUPPORTED, "echo": (None, False)}  # (vLLM's)

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Annotated[int, Field(ge=1, le=INT64_MAX), INTEGRAL] | None = Field(
        default=None, description="the newer name for max_tokens"
    )
    logprobs: bool = Field(default=False, description="log-probability of each output token")
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS), INTEGRAL] | None = Field(
        default=None, description="with logprobs: this many most likely alternatives per token"
    )
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        default=None, description='default "auto" when tools are given, else "none"'
    )
    parallel_tool_calls: bool = True

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise PydanticCustomError(
                "top_logprobs", "top_logprobs needs logprobs: true", {"param": "top_logprobs"}
            )
        return self

    @model_validator(mode="after")
    def _structured(self):  # (replaces _Sampling's: the checks below come first)
        fmt = self.response_format
        given = [
            name
            for name, asked in (
                ("structured_outputs", self.structured_outputs is not None),
                ("response_format", fmt is not None and fmt.type != "text"),
                ("tools", self.calls_tools),
            )
            if asked
        ]
        if len(given) > 1:
            raise _refuse(given[1], f"cannot be combined with {given[0]}: send one constraint")
        for i, tool in enumerate(self.tools or []):
            schema = tool.function.parameters
            if schema is not None:
                _enforceable(
                    StructuredOutputsParams(json=schema), f"tools[{i}].function.parameters"
                )
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) < len(names):
            raise _refuse("tools", "function names must be unique")
        if (
            isinstance(self.tool_choice, NamedToolChoice)
            and self.tool_choice.function.name not in names
        ):
            raise _refuse(
                "tool_choice",
                f"names the function {self.tool_choice.function.name!r}, which is not in tools "
                f"({', '.join(names) or 'none given'})",
            )
        if self.tool_choice == "required" and not names:
            raise _refuse("tool_choice", '"required" needs tools')
        self._spec = self.constraint()
        return self

    @property
    def tool_choice_value(self) -> str | dict:
        """tool_choice with OpenAI's default filled in, as plain JSON."""
        if self.tool_choice is None:
            return "auto" if self.tools else "none"
        if isinstance(self.tool_choice, NamedToolChoice):
            return self.tool_choice.model_dump()
        return self.tool_choice

    @property
    def calls_tools(self) -> bool:
        """The output may hold tool calls (tools given, tool_choice not "none")."""
        return bool(self.tools) and self.tool_choice_value != "none"

    def tool_dicts(self) -> list[dict]:
        return [t.model_dump(exclude_none=True) for t in self.tools or []]

    def constraint(self) -> StructuredOutputsParams | None:
        """The one constraint this request asks for (tools, response_format or structured_outputs)."""
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_object":
            return StructuredOutputsParams(json_object=True)
        if fmt is not None and fmt.type == "json_schema":
            assert fmt.json_schema is not None
            return _enforceable(
                StructuredOutputsParams(json=fmt.json_schema.schema_), "response_format"
            )
        grammar = tool_grammar(self.tool_dicts(), self.tool_choice_value, self.parallel_tool_calls)
        if grammar is not None:
            return _enforceable(grammar, "tools")
        return super().constraint()


class GenerateRequest(_Strict):
    """The course seed's original endpoint: plain JSON in, plain JSON out (kept for old clients)."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)
    prompt: Annotated[Text, Field(min_length=1)]
    max_new_tokens: Annotated[int, Field(ge=1, le=INT64_MAX), INTEGRAL] = 60
    temperature: Temperature = 0.8
    top_p: TopP = 0.95
    seed: Int64 | None = None


# ---- responses -------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_body(rid: str, model: str, choices: list[dict], use: dict | None) -> dict:
    body = {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
    }
    if use is not None:
        body["usage"] = use
    return body


def completion_choice(index: int, text: str, reason: str | None, logprobs: dict | None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}


def chat_body(rid: str, model: str, choices: list[dict], use: dict) -> dict:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": use,
    }


def chat_choice(
    index: int,
    text: str | None,
    reason: str | None,
    logprobs: dict | None,
    tool_calls: list[dict] | None = None,
) -> dict:
    message: dict = {"role": "assistant", "content": text}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": reason}


def chat_chunk(rid: str, model: str, choices: list[dict]) -> dict:
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
    }


def chat_chunk_choice(index: int, delta: dict, reason: str | None, logprobs: dict | None) -> dict:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}


def usage_chunk(rid: str, model: str, object_: str, use: dict) -> dict:
    """OpenAI's stream_options.include_usage: one last chunk with no choices and the token counts."""
    return {
        "id": rid,
        "object": object_,
        "created": int(time.time()),
        "model": model,
        "choices": [],
        "usage": use,
    }


# ---- response models: the OpenAPI document's description of what the handlers send --------------


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]  # None: the prompt's first token (nothing before it)
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length", "abort", "error"] | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None  # None when the answer is only tool calls
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: Literal["stop", "length", "tool_calls", "abort", "error"] | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class LoadLoRARequest(_Strict):
    """vLLM's POST /v1/load_lora_adapter: serve the peft LoRA directory `lora_path` as `lora_name`."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)
    lora_name: Annotated[str, Field(min_length=1, max_length=256)]
    lora_path: Annotated[str, Field(min_length=1, max_length=4096)]


class UnloadLoRARequest(_Strict):
    """vLLM's POST /v1/unload_lora_adapter."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)
    lora_name: Annotated[str, Field(min_length=1, max_length=256)]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str | None = Field(default=None, description="a LoRA adapter's files; the base's name")
    parent: str | None = Field(default=None, description="a LoRA adapter's base model")
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class GenerateResponse(BaseModel):
    text: str
    finish_reason: Literal["stop", "length", "abort", "error"] | None
    usage: Usage


class Status(BaseModel):
    status: str = Field(description="ok / ready, or starting / restarting / draining / failed")
    model: str | None = None
    reason: str | None = Field(default=None, description="why not, in words")
