"""Constrained decoding: a grammar turns into a token mask at every step, so the output always parses.

A request may ask that its output match a JSON schema, be any JSON object, match a regex, be one of a few
strings, or follow a Lark grammar (`StructuredOutputsParams`, vLLM's name and fields). The grammar is
compiled once per distinct spec (`GrammarCache`, keyed by the spec's canonical JSON); each sequence then
owns a *matcher*, the grammar's parser state after the tokens it has generated. Before sampling, the
matcher says which tokens of the vocabulary (SmolLM2's: 49,152) may come next (a bitmask, one bit per token); the others' logits
become -inf (`apply_token_bitmask`); after sampling, the matcher consumes the chosen token.

Why a token mask is harder than it sounds: grammars speak in characters, the model in tokens, and one
token can span several grammar symbols (a token like `"},` closes a string and an object, then
separates items) or end
halfway through one. The matcher has to ask, for every token, "can the text so far plus this token's
bytes still be extended into a valid output?". Doing that for the whole vocabulary at every step is the
library's job; it walks a trie of the token strings instead of one check per token.

Library: llguidance (from the guidance project; vLLM's "guidance" backend, an option in SGLang and
llama.cpp). Chosen over xgrammar (vLLM's default) because its wheel has no dependencies, where xgrammar's
pulls triton and a TVM runtime into a CPU-only course environment; it fills a row of the mask in
microseconds here (benchmarks/structured.py, notebook 07b). Its errors for a schema it cannot enforce
("Unimplemented keys: [uniqueItems]") are precise enough to hand back to a client as a 400.

Invariants the engine keeps (tests/test_structured_output.py checks them):
- a sequence's matcher has consumed exactly its output tokens (prompt tokens are not part of the
  grammar); preemption recomputes the KV cache but keeps the tokens, so the matcher stays valid;
- the n samples of a request each get their own matcher, copied when the request forks;
- speculative decoding skips constrained sequences (a drafted token the grammar forbids would need the
  matcher rolled back; we keep it simple and say so in engine.py);
- "stop" means the grammar is complete: the sequence ends as soon as its matcher admits nothing more
  (or end-of-sequence is sampled, which the mask allows only where the output is complete);
  max_tokens cuts an unfinished output with "length", as for any request.
"""

import json
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import llguidance
import llguidance.hf
import numpy as np
import torch
from llguidance import LLMatcher

if TYPE_CHECKING:  # (a typed dict the stubs declare; the module does not export it)
    from llguidance._lib import JsonCompileOptions

# compact JSON: with flexible whitespace a small model can emit newlines forever and never close the object
JSON_OPTIONS: "JsonCompileOptions" = {"whitespace_flexible": False}


@dataclass
class StructuredOutputsParams:
    """Exactly one of these constrains a request's output (vLLM's `StructuredOutputsParams`)."""

    json: dict | str | None = None  # a JSON schema (a dict, or its text)
    json_object: bool = False  # any JSON object (OpenAI's response_format {"type": "json_object"})
    regex: str | None = None
    choice: list[str] | None = None  # the output is one of these strings
    grammar: str | None = (
        None  # a Lark grammar in llguidance's dialect (`%json {...}` embeds a schema)
    )

    def __post_init__(self):
        given = [
            name
            for name in ("json", "regex", "choice", "grammar")
            if getattr(self, name) is not None
        ] + (["json_object"] if self.json_object is True else [])
        if len(given) != 1:
            raise ValueError(
                "structured outputs need exactly one of json, json_object, regex, choice, grammar; "
                f"got {given or 'none'}"
            )
        if self.choice is not None and (
            not isinstance(self.choice, list)
            or not self.choice
            or not all(isinstance(c, str) and c for c in self.choice)
        ):
            raise ValueError(
                f"choice must be a non-empty list of non-empty strings, got {self.choice!r}"
            )
        for name in ("regex", "grammar"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string")

    @property
    def key(self) -> str:
        """The cache key: the same spec, whatever the order of its schema's keys, compiles once."""
        value = self.json
        if isinstance(value, str):
            value = json.loads(value) if _is_json(value) else value
        return json.dumps(
            [value, self.json_object, self.regex, self.choice, self.grammar], sort_keys=True
        )

    def to_grammar(self) -> str:
        """llguidance's grammar text for this spec (not yet checked: see `grammar_error`)."""
        if self.json is not None:
            return LLMatcher.grammar_from_json_schema(self.json, defaults=JSON_OPTIONS)
        if self.json_object:
            return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
        if self.regex is not None:
            return LLMatcher.grammar_from_regex(self.regex)
        if self.choice is not None:
            return llguidance.grammar_from("choice", json.dumps(self.choice))
        assert self.grammar is not None
        return LLMatcher.grammar_from_lark(self.grammar)


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def grammar_error(spec: StructuredOutputsParams) -> str | None:
    """Why this spec cannot be enforced (a malformed schema, a keyword llguidance does not implement, a
    bad regex), or None. Needs no tokenizer, so the HTTP process can answer 400 before queueing."""
    try:
        grammar = spec.to_grammar()
    except (ValueError, TypeError) as err:  # (a schema that is not a JSON object...)
        return str(err)
    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, None)
    return messages[0] if is_error else None


class GrammarCache:
    """Compiled grammars by spec, as matchers in their start state; `matcher(spec)` hands out copies.

    Compiling a schema takes a fraction of a millisecond to a few milliseconds; copying a compiled matcher
    takes microseconds. Requests from one client mostly repeat one schema, so the cache makes compiling a
    once-per-schema cost. Least recently used specs go first once it holds `max_entries`."""

    def __init__(self, tokenizer, vocab_size: int, max_entries: int = 256):
        self.hf_tokenizer, self.vocab_size, self.max_entries = tokenizer, vocab_size, max_entries
        self._tokenizer: llguidance.LLTokenizer | None = None  # built on first use (~0.3 s)
        self._compiled: OrderedDict[str, LLMatcher] = OrderedDict()
        self.hits = self.misses = 0
        self.compile_seconds = 0.0  # spent compiling (cache misses), in total

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        """The vocabulary as llguidance sees it: each token's bytes, in a trie."""
        if self._tokenizer is None:
            self._tokenizer = llguidance.hf.from_tokenizer(
                self.hf_tokenizer, n_vocab=self.vocab_size
            )
        return self._tokenizer

    def matcher(self, spec: StructuredOutputsParams) -> LLMatcher:
        """A fresh matcher for `spec`. ValueError (the library's message) if it cannot be compiled."""
        key = spec.key
        compiled = self._compiled.get(key)
        if compiled is not None:
            self.hits += 1
            self._compiled.move_to_end(key)
            return compiled.deep_copy()
        self.misses += 1
        start = time.perf_counter()
        grammar = spec.to_grammar()
        is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if is_error:
            raise ValueError(f"structured output cannot be enforced: {messages[0]}")
        compiled = LLMatcher(self.tokenizer, grammar, log_level=0)
        if compiled.is_error():
            raise ValueError(f"structured output cannot be enforced: {compiled.get_error()}")
        self.compile_seconds += time.perf_counter() - start
        self._compiled[key] = compiled
        if len(self._compiled) > self.max_entries:
            self._compiled.popitem(last=False)
        return compiled.deep_copy()


assert np.little_endian, "allowed_tokens reads the bitmask's int32 words as little-endian bytes"


def fill_bitmask(matchers: list[LLMatcher], vocab_size: int) -> torch.Tensor:
    """bitmask [len(matchers), ceil(V / 32)] int32: bit t % 32 of word t // 32 is 1 where token t is
    allowed next by that row's matcher."""
    bitmask = torch.empty(len(matchers), (vocab_size + 31) // 32, dtype=torch.int32)
    row_bytes = bitmask.shape[1] * bitmask.element_size()
    for row, matcher in enumerate(matchers):  # the library writes each row in place
        matcher.unsafe_compute_mask_ptr(bitmask[row].data_ptr(), row_bytes)
    return bitmask


def allowed_tokens(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """bitmask [R, W] int32 -> allowed [R, vocab_size] bool (the unpacked bits, token t at column t).
    The int32 words are little-endian, so byte k of word w holds tokens 32 w + 8 k .. 32 w + 8 k + 7,
    lowest bit first: numpy's unpackbits(bitorder="little") over the bytes is the whole job, one pass in
    C (shifting each word 32 times in torch is 32 passes, and several times slower)."""
    as_bytes = bitmask.contiguous().numpy().view(np.uint8)  # [R, 4 W]
    bits = np.unpackbits(as_bytes, axis=-1, bitorder="little")  # [R, 32 W] of 0/1
    return torch.from_numpy(bits[:, :vocab_size]).bool()


@torch.inference_mode()  # (the engine's logits are inference tensors: updated in place only in this mode)
def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """logits [R, V] with every disallowed token at -inf (in place; returned for chaining). Eager torch:
    llguidance's own kernel is torch.compile'd, which costs seconds on its first call on a CPU."""
    allowed = allowed_tokens(bitmask, logits.shape[-1]).to(logits.device)
    return logits.masked_fill_(~allowed, float("-inf"))
