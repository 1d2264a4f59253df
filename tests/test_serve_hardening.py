"""No request can hurt the server: every bad input is a clean 4xx in OpenAI's error shape, naming the
parameter, with no traceback or file path; the engine is alive afterwards. And the schema tells the
truth about it (the fuzzer in test_serve_fuzz.py holds the server to that document)."""

import json

import httpx
import openai
import pytest

from labkit.serve.errors import param_of
from labkit.serve.launch import ServerProcess

PROMPT = "It is a truth"
CHAT = [{"role": "user", "content": "Good morning"}]


@pytest.fixture(scope="module")
def server():
    with ServerProcess(threads=1, max_num_seqs=8) as srv:
        yield srv


def post(url: str, body) -> httpx.Response:
    """POST JSON as a client may write it: json.dumps escapes lone surrogates (httpx's json= cannot)."""
    headers = {"content-type": "application/json"}
    return httpx.post(url, content=json.dumps(body), headers=headers, timeout=60)


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    text = r.text
    assert "Traceback" not in text and "/labkit/" not in text and ".py" not in text, text
    return body["error"]


def assert_alive(url: str) -> None:
    assert httpx.get(url + "/ready").json()["status"] == "ready"
    r = httpx.post(url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 3}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_the_issue_reproduction_top_p_1e_300(server):
    """The request that killed the engine process: now a 400 naming top_p, and the engine lives."""
    r = httpx.post(
        server.url + "/v1/completions",
        json={"prompt": PROMPT, "max_tokens": 5, "top_p": 1e-300},
    )
    assert error_of(r, 400)["param"] == "top_p"
    assert_alive(server.url)


@pytest.mark.parametrize(
    "body, param",
    [
        ({"top_p": 1e-300}, "top_p"),
        ({"temperature": 1e-300}, "temperature"),
        ({"temperature": 1e-39}, "temperature"),
        ({"temperature": 1e400}, "temperature"),  # JSON's 1e400 parses as inf
        ({"seed": 2**64}, "seed"),
        ({"max_tokens": 2**70}, "max_tokens"),
        ({"top_k": 2**64}, "top_k"),
        ({"stop_token_ids": [2**64]}, "stop_token_ids[0]"),
        ({"max_tokens": True}, "max_tokens"),  # a boolean is not a number
        ({"temperature": False}, "temperature"),
        ({"stream": "yes"}, "stream"),
        ({"max_tokens": 2.5}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"n": 10_000}, "n"),
        ({"logprobs": 21}, "logprobs"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": ""}, "stop"),
        ({"best_of": 3}, "best_of"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"prompt_logprobs": 1}, "prompt_logprobs"),
        ({"logit_bias": {"50": 10}}, "logit_bias"),
        ({"suffix": "the end"}, "suffix"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"prompt": "caf\ud800e"}, "prompt"),  # a lone surrogate no tokenizer can encode
        ({"prompt": ""}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": [1, 2, 99999]}, "prompt"),
        ({"prompt": [-1]}, "prompt[0]"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop": ["\udc00"]}, "stop[0]"),
    ],
)
def test_completions_refuses_with_the_parameter_named(server, body, param):
    r = post(server.url + "/v1/completions", {"prompt": PROMPT, **body})
    assert error_of(r, 400)["param"] == param


@pytest.mark.parametrize(
    "messages, param",
    [
        ([{"role": "user", "content": [{"type": "text", "text": 5}]}], "messages[0].content"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
            "messages[0].content[0].type",
        ),
        ([{"role": "user", "content": "\ud800"}], "messages[0].content"),
        ([{"role": "robot", "content": "hi"}], "messages[0].role"),
        ([{"role": "user"}], "messages[0].content"),
        ([], "messages"),
    ],
)
def test_chat_refuses_bad_messages(server, messages, param):
    r = post(server.url + "/v1/chat/completions", {"messages": messages})
    err = error_of(r, 400)
    assert err["param"] == param, err


def test_chat_refuses_top_logprobs_without_logprobs(server):
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": CHAT, "top_logprobs": 2})
    assert error_of(r, 400)["param"] == "top_logprobs"


def test_parsing_and_routing_errors_have_openai_shape(server):
    url = server.url
    bad_json = httpx.post(
        url + "/v1/completions",
        content=b'{"prompt": "x",',
        headers={"content-type": "application/json"},
    )
    err = error_of(bad_json, 400)
    assert err["param"] is None and "JSON" in err["message"]
    assert error_of(httpx.post(url + "/v1/completions", content=b"\xff\xfe"), 400)
    assert error_of(httpx.post(url + "/v1/completions"), 400)  # no body
    assert error_of(httpx.post(url + "/v1/completions", json=[1, 2]), 400)
    assert error_of(httpx.get(url + "/v1/nothing"), 404)["type"] == "not_found_error"
    assert error_of(httpx.get(url + "/v1/completions"), 405)
    assert error_of(httpx.delete(url + "/health"), 405)


def test_health_and_ready_say_a_status_word(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert httpx.get(server.url + "/ready").json() == {"status": "ready", "model": "course"}


def test_models_retrieve(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    assert client.models.retrieve("course").id == "course"
    assert [m.id for m in client.models.list()] == ["course"]
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.models.retrieve("gpt-4")
    err = error_of(httpx.get(server.url + "/v1/models/org/some-model"), 404)
    assert err["code"] == "model_not_found" and err["param"] == "model"


def test_openapi_declares_what_the_server_sends(server):
    doc = httpx.get(server.url + "/openapi.json").json()
    ops = [op for path in doc["paths"].values() for op in path.values()]
    assert all("422" not in op["responses"] for op in ops)
    completions = doc["paths"]["/v1/completions"]["post"]["responses"]
    assert set(completions["200"]["content"]) == {"application/json", "text/event-stream"}
    assert "400" in completions and "503" in completions
    assert set(doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    assert "/v1/models/{model}" in doc["paths"]
    props = doc["components"]["schemas"]["CompletionRequest"]["properties"]
    n = [b for b in props["n"].get("anyOf", [props["n"]]) if b.get("type") == "integer"][0]
    assert n["minimum"] == 1 and n["maximum"] >= 2
    assert props["top_p"]["minimum"] > 0


def test_no_5xx_and_alive_after_all_that(server):
    """The bad requests above (same module, same server) left the engine serving."""
    assert_alive(server.url)


def test_param_of_turns_pydantic_locations_into_openai_params():
    assert param_of(("body", "messages", 0, "content", "list[TextPart]", 0, "text")) == (
        "messages[0].content[0].text"
    )
    assert param_of(("body", 40)) is None
    assert param_of(("body", "prompt", "function-after[_unicode_text(), str]")) == "prompt"
