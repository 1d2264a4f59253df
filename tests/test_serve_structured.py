"""Structured outputs and tool calls through `labkit serve` on SmolLM2, called with the `openai` client:
parse() with a Pydantic model, JSON mode, vLLM's structured_outputs, a tool-call round trip, streamed
tool-call deltas, and the 400s for what cannot be enforced."""

import json
from typing import Literal

import httpx
import openai
import pytest
from pydantic import BaseModel, Field

from labkit.serve.launch import ServerProcess


class Person(BaseModel):
    name: str = Field(max_length=24)
    age: int = Field(ge=0, le=120)
    city: Literal["Paris", "London", "Rome", "Berlin"]


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server():
    with ServerProcess("smollm2", max_num_seqs=16, threads=1) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_parse_with_a_pydantic_model_gives_a_valid_object_every_time(client):
    """20 sampled requests (temperature 0.8), each parsed by the client into a Person."""
    choices = [
        choice
        for prompt in (
            "Invent a person: name, age and city.",
            "Describe someone you met on a train.",
        )
        for choice in client.chat.completions.parse(
            model="smollm2",
            messages=[{"role": "user", "content": prompt}],
            response_format=Person,
            temperature=0.8,
            n=10,
            max_tokens=60,
        ).choices
    ]
    assert len(choices) == 20
    for choice in choices:
        assert choice.finish_reason == "stop", choice.message.content
        assert isinstance(choice.message.parsed, Person)


def test_json_mode_and_vllm_structured_outputs(client, server):
    r = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "Give me a JSON object about cats."}],
        response_format={"type": "json_object"},
        max_tokens=80,
        temperature=0,
    )
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    r = httpx.post(
        server.url + "/v1/completions",
        json={
            "prompt": "Is Paris in France? Answer:",
            "structured_outputs": {"choice": ["yes", "no"]},
            "max_tokens": 5,
        },
        timeout=60,
    ).json()
    assert r["choices"][0]["text"] in {"yes", "no"}


def test_a_schema_answer_cut_by_max_tokens_says_length(client):
    r = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "Invent a person."}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": Person.model_json_schema()},
        },
        max_tokens=4,
    )
    assert r.choices[0].finish_reason == "length"


def test_a_tool_call_round_trip(client):
    first = client.chat.completions.create(
        model="smollm2", messages=ASK_WEATHER, tools=[WEATHER, TIME], tool_choice="required",
        parallel_tool_calls=False, temperature=0, max_tokens=60,
    )  # fmt: skip
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls[:1]
    assert call.type == "function" and call.function.name in {"get_weather", "get_time"}
    json.loads(call.function.arguments)
    messages = ASK_WEATHER + [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 21, "sky": "sunny"}'},
    ]  # fmt: skip
    final = client.chat.completions.create(
        model="smollm2", messages=messages, tools=[WEATHER, TIME], tool_choice="none",
        temperature=0, max_tokens=40,
    )  # fmt: skip
    assert final.choices[0].finish_reason in {"stop", "length"}
    assert final.choices[0].message.content and not final.choices[0].message.tool_calls


def test_a_named_tool_choice_calls_that_function(client):
    r = client.chat.completions.create(
        model="smollm2", messages=ASK_WEATHER, tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False, temperature=0.8, max_tokens=60,
    )  # fmt: skip
    calls = r.choices[0].message.tool_calls
    assert len(calls) == 1 and calls[0].function.name == "get_weather"
    assert set(json.loads(calls[0].function.arguments)) == {"city"}


@pytest.mark.parametrize("tool_choice", ["required", "auto"])
def test_streamed_tool_call_deltas_reassemble_into_the_same_call(client, tool_choice):
    kwargs = dict(
        model="smollm2", messages=ASK_WEATHER, tools=[WEATHER], tool_choice=tool_choice,
        temperature=0, max_tokens=60,
    )  # fmt: skip
    whole = client.chat.completions.create(**kwargs).choices[0]
    calls: dict[int, dict] = {}
    content, reason = "", None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        reason = chunk.choices[0].finish_reason or reason
        for d in delta.tool_calls or []:
            call = calls.setdefault(d.index, {"id": d.id, "name": "", "arguments": ""})
            call["name"] += d.function.name or ""
            call["arguments"] += d.function.arguments or ""
    assert reason == whole.finish_reason
    expected = [
        {"name": c.function.name, "arguments": c.function.arguments}
        for c in whole.message.tool_calls or []
    ]
    assert [{"name": c["name"], "arguments": c["arguments"]} for c in calls.values()] == expected
    assert all(c["id"] for c in calls.values())
    assert content == (whole.message.content or "")
    if tool_choice == "required":  # (SmolLM2 may go on calling until max_tokens: "length")
        assert expected and reason in {"tool_calls", "length"}


@pytest.mark.parametrize(
    "body, param",
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}}}}, "response_format"),
        ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0].function.name"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "string", "pattern": "("}}}}}]}, "tools[0].function.parameters"),
        ({"structured_outputs": {"regex": "a("}}, "structured_outputs"),
        ({"messages": [{"role": "tool", "content": "3"}]}, "messages[0]"),
    ],
)  # fmt: skip
def test_what_cannot_be_enforced_is_a_400_naming_the_parameter(server, body, param):
    r = httpx.post(
        server.url + "/v1/chat/completions", json={"messages": ASK_WEATHER, **body}, timeout=60
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_completions_refuse_chat_only_tools(server):
    r = httpx.post(
        server.url + "/v1/completions", json={"prompt": "x", "tools": [WEATHER]}, timeout=60
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools"


def test_the_openapi_document_declares_the_new_fields(server):
    doc = httpx.get(server.url + "/openapi.json", timeout=60).json()
    schemas = doc["components"]["schemas"]
    chat = schemas["ChatCompletionRequest"]["properties"]
    for name in (
        "response_format",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "structured_outputs",
    ):
        assert name in chat, name
    assert "structured_outputs" in schemas["CompletionRequest"]["properties"]
    assert "tool_calls" in schemas["AssistantMessage"]["properties"]
    reasons = json.dumps(schemas["ChatChoice"]["properties"]["finish_reason"])
    assert "tool_calls" in reasons
