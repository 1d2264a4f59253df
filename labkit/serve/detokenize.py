"""Turn a growing list of token ids into text deltas a client can print, honouring stop strings.

Two traps make naive `decode(new_token)` wrong: a token can hold half of a UTF-8 character (the
decoder shows U+FFFD until the rest arrives), and a stop string can span several tokens, so text that
*might* be the start of a stop string must be held back until we know.

Re-decoding the whole output at every step is correct but costs O(length) per token (O(n^2) per
request), all of it on the event loop that also serves HTTP. Instead, as vLLM and TGI do, we decode
only a short window: the tokens since the last emitted text (`read`), plus the few before them
(`prefix`) as context, and keep the difference. The context matters for tokenizers whose decoding of a
token depends on its left neighbour (SentencePiece drops the leading space of a text's first word).
"""


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        # a transformers fast tokenizer wraps a Rust `tokenizers.Tokenizer`; calling it directly skips ~2 us
        # of Python per call (and it is called twice per step per stream, on the event loop)
        backend = getattr(tokenizer, "_tokenizer", None)
        self._decode = (
            backend.decode
            if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False)
            else tokenizer.decode
        )
        self.stop = list(stop or [])
        # chars that may start a stop string
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.token_ids: list[int] = []
        self.prefix = 0  # token_ids[prefix:read] were decoded last time, as context
        self.read = 0  # token_ids[read:] have not become text yet
        self.decoded = ""  # all text decoded so far (may still hold a possible stop-string start)
        self.text = ""  # everything emitted so far
        self.stopped = False  # a stop string was found: the request is finished

    def _decode_new(self, final: bool) -> str:
        ids, decode = self.token_ids, self._decode
        before = decode(ids[self.prefix : self.read], skip_special_tokens=True)
        after = decode(ids[self.prefix :], skip_special_tokens=True)
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return ""  # nothing visible yet, or an incomplete multi-byte character: wait for more tokens
        self.prefix, self.read = self.read, len(ids)
        return after[len(before) :]

    def push(self, new_ids: list[int], final: bool = False) -> str:
        """Add tokens; return the newly safe text. With final=True everything left is flushed."""
        if self.stopped:
            return ""
        self.token_ids.extend(new_ids)
        self.decoded += self._decode_new(final)
        full = self.decoded
        start = max(0, len(self.text) - self.hold)
        hits = [i for i in (full.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            safe = min(hits)
        else:
            safe = len(full) if final else max(len(self.text), len(full) - self.hold)
        delta = full[len(self.text) : safe]
        self.text += delta
        return delta
