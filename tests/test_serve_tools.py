"""labkit/serve/tools.py without a server: the prompt, the grammar and the incremental parser."""

import json

import pytest

from labkit.engine.structured import grammar_error
from labkit.serve.tools import ToolCallParser, call_text, render_messages, tool_grammar

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
TWO_CALLS = (
    "Let me check. "
    + call_text("get_weather", '{"city":"Paris","x":{"a":1}}')
    + "\n"
    + call_text("f2", '{"q":"}}"}')
    + " Done."
)


def parse(text: str, step: int) -> tuple[str, dict[int, dict], list[dict]]:
    """Feed `text` `step` characters at a time: the content, the calls reassembled from the deltas, and
    the parser's own calls."""
    parser, content, deltas = ToolCallParser(), "", []
    for i in range(0, len(text), step):
        c, d = parser.feed(text[i : i + step])
        content, deltas = content + c, deltas + d
    c, d = parser.finish()
    content, deltas = content + c, deltas + d
    calls: dict[int, dict] = {}
    for d in deltas:
        call = calls.setdefault(d["index"], {"name": "", "arguments": ""})
        call["name"] += d["function"].get("name", "")
        call["arguments"] += d["function"]["arguments"]
    return content, calls, [c.message()["function"] for c in parser.calls]


@pytest.mark.parametrize("step", [1, 2, 3, 7, 1000])
def test_deltas_reassemble_into_the_calls_whatever_the_pieces(step):
    content, calls, whole = parse(TWO_CALLS, step)
    assert content == "Let me check. Done."
    assert list(calls.values()) == whole
    assert [json.loads(c["arguments"]) for c in whole] == [
        {"city": "Paris", "x": {"a": 1}},
        {"q": "}}"},
    ]


@pytest.mark.parametrize("step", [1, 5, 1000])
def test_text_that_only_looks_like_a_call_stays_content(step):
    for text in ["a <b>tag</b> and <tool", "x <tool_call>not json</tool_call> y"]:
        content, calls, _ = parse(text, step)
        assert content == text and not calls


def test_a_call_cut_by_max_tokens_sends_what_there_is():
    content, calls, whole = parse('<tool_call>\n{"name":"f","arguments":{"a":"hel', 3)
    assert content == "" and whole == [{"name": "f", "arguments": '{"a":"hel'}]
    assert list(calls.values()) == whole


def test_tools_and_tool_turns_render_as_text_any_chat_template_takes():
    turns = render_messages(
        [
            {"role": "user", "content": "weather?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"function": {"name": "get_weather", "arguments": '{"city":"P"}'}}],
            },
            {"role": "tool", "content": "sunny", "tool_call_id": "c"},
        ],
        [WEATHER],
    )
    assert [t["role"] for t in turns] == ["system", "user", "assistant", "user"]
    assert '"name": "get_weather"' in turns[0]["content"]
    assert turns[2]["content"] == call_text("get_weather", '{"city":"P"}')
    assert turns[3]["content"] == "<tool_response>\nsunny\n</tool_response>"


@pytest.mark.parametrize("choice", ["auto", "required", {"function": {"name": "get_weather"}}])
def test_every_tool_choice_compiles(choice):
    spec = tool_grammar([WEATHER], choice, parallel=True)
    assert spec is not None and grammar_error(spec) is None
    assert tool_grammar([WEATHER], "none", parallel=True) is None
