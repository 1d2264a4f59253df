"""Tool calls for a model whose chat template knows nothing of tools: the prompt, the grammar, the parser.

An OpenAI client sends `tools` (JSON-schema function signatures) and gets back `tool_calls`; the model in
between only reads and writes text. As vLLM's per-model tool parsers and Hermes-style templates do, we fix
a text format and translate at both ends:

    prompt   a system message lists the tools as JSON inside <tools></tools> and asks for each call as
             <tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>   (`tools_prompt`);
             an earlier assistant turn's tool_calls are written back in that format and a `tool` message
             becomes a user turn inside <tool_response></tool_response> (`render_messages`)
    grammar  SmolLM2 (135M) follows such instructions loosely, so the output is constrained (`tool_grammar`):
             tool_choice "required" or a named function -> one or more calls (one if parallel_tool_calls
             is false), each's JSON matching {"name": const, "arguments": that tool's parameters};
             "auto" -> either calls, or free text that does not start with "<" (the model picks on its
             first token); "none" -> free text, tools still listed (as OpenAI does)
    parser   the output text -> content and calls (`ToolCallParser`), incrementally, so a stream can send
             OpenAI's tool-call deltas ({index, id, type, function: {name, arguments}}) as text arrives
"""

import json
import re
import uuid
from dataclasses import dataclass, field

from labkit.engine import StructuredOutputsParams
from labkit.engine.structured import JSON_OPTIONS

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"


def tools_prompt(tools: list[dict]) -> str:
    """The system-prompt text that lists `tools` (OpenAI's [{"type": "function", "function": {...}}])."""
    listed = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return (
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n"
        f"<tools>\n{listed}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments within "
        f"{CALL_OPEN}{CALL_CLOSE} XML tags:\n"
        f'{CALL_OPEN}\n{{"name": <function-name>, "arguments": <args-json-object>}}\n{CALL_CLOSE}'
    )


def call_text(name: str, arguments: str) -> str:
    """One call as the model writes it (compact JSON, as the grammar constrains it)."""
    return f'{CALL_OPEN}\n{{"name":{json.dumps(name)},"arguments":{arguments}}}\n{CALL_CLOSE}'


def render_messages(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """OpenAI chat messages (dicts) -> {"role", "content"} turns any chat template renders: the tools in
    the system message, tool calls as text, tool results as user turns."""
    turns: list[dict] = []
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if role == "tool":
            turns.append(
                {"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"}
            )
        elif role == "assistant" and m.get("tool_calls"):
            calls = [
                call_text(c["function"]["name"], c["function"]["arguments"])
                for c in m["tool_calls"]
            ]
            turns.append({"role": role, "content": "\n".join(filter(None, [content, *calls]))})
        else:
            turns.append({"role": "system" if role == "developer" else role, "content": content})
    if tools:
        if turns[0]["role"] == "system":
            turns[0] = {
                "role": "system",
                "content": turns[0]["content"] + "\n\n" + tools_prompt(tools),
            }
        else:
            turns.insert(0, {"role": "system", "content": tools_prompt(tools)})
    return turns


def call_schema(function: dict) -> dict:
    """The JSON one call to `function` must match."""
    return {
        "type": "object",
        "properties": {
            "name": {"const": function["name"]},
            "arguments": function.get("parameters") or {"type": "object"},
        },
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def tool_grammar(
    tools: list[dict], choice: str | dict, parallel: bool
) -> StructuredOutputsParams | None:
    """The constraint for tool_choice `choice` ("none", "auto", "required", or {"type": "function",
    "function": {"name": ...}}): a Lark grammar whose calls embed each tool's JSON schema (`%json`)."""
    if choice == "none" or not tools:
        return None
    functions = [t["function"] for t in tools]
    if isinstance(choice, dict):
        functions = [f for f in functions if f["name"] == choice["function"]["name"]]
    # compact JSON, as for response_format (structured.py says why)
    schema = {"anyOf": [call_schema(f) for f in functions], "x-guidance": JSON_OPTIONS}
    calls = 'call ("\\n" call)*' if parallel else "call"
    lark = (
        f"calls: {calls}\n"
        f'call: "{CALL_OPEN}\\n" %json {json.dumps(schema)} "\\n{CALL_CLOSE}"\n'
        "TEXT: /[^<](.|\\n)*/\n"
    )
    start = "start: calls | TEXT\n" if choice == "auto" else "start: calls\n"
    return StructuredOutputsParams(grammar=start + lark)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


# the start of a call's JSON, up to where its arguments begin
CALL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


@dataclass
class ToolCall:
    index: int
    id: str
    name: str
    arguments: str = ""  # the text sent so far

    def message(self) -> dict:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass
class ToolCallParser:
    """Text in (as generated, piece by piece), content and tool-call deltas out.

    `feed(text)` returns (content delta, [tool-call deltas]); `finish()` the rest once the output ends.
    Content is held back while it could be the start of "<tool_call>"; a call's name goes out as soon as
    it is known, and its arguments as they grow, minus a tail that could still be the closing `}` of the
    call object (so the pieces of `arguments` join into exactly the final arguments text)."""

    calls: list[ToolCall] = field(default_factory=list)
    _buffer: str = ""  # text not yet sent: content held back, or the call in progress
    _in_call: bool = False
    _open: ToolCall | None = None  # the call being read, once its name is known
    _after_call: bool = False  # a call just closed: whitespace until the next text is dropped

    def feed(self, text: str) -> tuple[str, list[dict]]:
        self._buffer += text
        deltas: list[dict]
        content, deltas = "", []  # deltas: OpenAI's tool-call delta dicts
        while True:
            if self._after_call:  # the line breaks between calls are not content
                self._buffer = self._buffer.lstrip()
                self._after_call = not self._buffer
            if not self._in_call:
                at = self._buffer.find(CALL_OPEN)
                if at < 0:
                    keep = _partial_suffix(self._buffer, CALL_OPEN)
                    content += self._buffer[: len(self._buffer) - keep]
                    self._buffer = self._buffer[len(self._buffer) - keep :]
                    return content, deltas
                content += self._buffer[:at]
                self._buffer, self._in_call = self._buffer[at + len(CALL_OPEN) :], True
                self._open = None
            end = self._buffer.find(CALL_CLOSE)
            if end < 0:  # (less what may be the start of </tool_call>)
                body = self._buffer[: len(self._buffer) - _partial_suffix(self._buffer, CALL_CLOSE)]
                return content, deltas + self._call_progress(body, closed=False)
            body = self._buffer[:end]
            deltas += self._call_progress(body, closed=True)
            if self._open is None:  # not a call after all (free text may say anything): content
                content += CALL_OPEN + body + CALL_CLOSE
            self._buffer, self._in_call = self._buffer[end + len(CALL_CLOSE) :], False
            self._after_call = self._open is not None

    def finish(self) -> tuple[str, list[dict]]:
        """The output ended: what is still held back is content (or an unfinished call's text)."""
        if self._in_call and self._open is not None:  # cut short (max_tokens): send what there is
            return "", self._call_progress(self._buffer, closed=False, cut=True)
        rest = (CALL_OPEN if self._in_call else "") + self._buffer
        self._buffer, self._in_call = "", False
        return rest, []

    def _call_progress(self, body: str, closed: bool, cut: bool = False) -> list[dict]:
        """Deltas for the call in progress, whose text so far (after <tool_call>) is `body`: `closed`
        when </tool_call> came, `cut` when the output ended before it (everything is sent)."""
        head = CALL_HEAD.match(body)
        if head is None:
            return []
        deltas: list[dict] = []
        if self._open is None:  # its name is known: announce the call
            name = json.loads(f'"{head.group(1)}"')
            self._open = ToolCall(len(self.calls), new_call_id(), name)
            self.calls.append(self._open)
            deltas.append(
                {
                    "index": self._open.index,
                    "id": self._open.id,
                    "type": "function",
                    "function": {"name": name, "arguments": ""},
                }
            )
        call = self._open
        args = body[head.end() :].rstrip()
        # the arguments end before the call object's closing brace: once closed, drop that brace; until
        # then, hold back every trailing brace (any of them may be that one)
        if closed:
            args = args[:-1].rstrip()
        elif not cut:
            args = args.rstrip("} \n\t\r")
        if len(args) > len(call.arguments):
            deltas.append(
                {"index": call.index, "function": {"arguments": args[len(call.arguments) :]}}
            )
            call.arguments = args
        return deltas


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
