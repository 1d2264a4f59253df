"""Turn a growing list of token ids into text deltas a client can print, honouring stop strings.

Two traps make naive `decode(new_token)` wrong: a token can hold half of a UTF-8 character (the
decoder shows U+FFFD until the rest arrives), and a stop string can span several tokens, so text that
*might* be the start of a stop string must be held back until we know. We re-decode the whole output
(outputs are at most a few hundred tokens) and only ever emit text that can no longer change.
"""


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stop = list(stop or [])
        self.hold = max((len(s) for s in self.stop), default=1) - 1  # chars that may start a stop string
        self.token_ids: list[int] = []
        self.text = ""          # everything emitted so far
        self.stopped = False    # a stop string was found: the request is finished

    def push(self, new_ids: list[int], final: bool = False) -> str:
        """Add tokens; return the newly safe text. With final=True everything left is flushed."""
        if self.stopped:
            return ""
        self.token_ids.extend(new_ids)
        full = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        if full.endswith("\ufffd") and not final:      # an incomplete multi-byte character: wait
            full = full.rstrip("\ufffd")
        start = max(0, len(self.text) - self.hold)
        hits = [i for i in (full.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            safe = min(hits)
        else:
            safe = len(full) if final else max(len(self.text), len(full) - self.hold)
        delta = full[len(self.text):safe] if full.startswith(self.text) else full[len(self.text):safe]
        self.text += delta
        return delta
