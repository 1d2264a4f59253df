"""One request's n samples as the client sees them: text, finish reason and log-probabilities per choice.

The engine reports each sample's new tokens (StepOutput, with `index` = which sample); a Choice turns
them into text (detokenize.py: stop strings, whole characters) and keeps the tokens' log-probabilities,
which the functions below put in OpenAI's two shapes:

    completions  {"tokens": [...], "token_logprobs": [...], "top_logprobs": [{token: logprob}], "text_offset": [...]}
    chat         {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}

As in vLLM, a completions `top_logprobs` entry holds the k most likely tokens plus the chosen one.
"""

from collections.abc import Sequence

from labkit.engine import StepOutput, TokenLogprob

from .detokenize import IncrementalDetokenizer


class Choice:
    def __init__(self, index: int, tokenizer, stop: list[str] | None):
        self.index = index
        self.detok = IncrementalDetokenizer(tokenizer, stop)
        self.reason: str | None = None  # set once the client has seen the whole choice
        self.engine_finished = False  # the engine finished it (a stop string can end it first)
        self.num_tokens = 0
        self.logprobs: list[TokenLogprob] = []  # one per token, when asked for
        self.prompt_logprobs: list[TokenLogprob | None] | None = None  # with echo (app.py sets it)

    @property
    def text(self) -> str:
        return self.detok.text

    @property
    def finished(self) -> bool:
        return self.reason is not None

    def push(self, outs: list[StepOutput]) -> tuple[str, list[TokenLogprob]]:
        """This choice's outputs of one loop turn -> (new text, the new tokens' logprobs)."""
        ids, logprobs = [], []
        for out in outs:
            ids += out.new_token_ids
            logprobs += out.logprobs or []
        last = outs[-1]
        self.engine_finished = last.finished
        self.num_tokens = last.num_output_tokens
        delta = self.detok.push(ids, final=last.finished)
        if self.detok.stopped:
            self.reason = "stop"
        elif last.finished:
            self.reason = last.finish_reason
        self.logprobs += logprobs
        return delta, logprobs


# ---- OpenAI's shapes -------------------------------------------------------------------------------


def token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def completion_logprobs(
    tokenizer, token_ids: list[int], entries: Sequence[TokenLogprob | None], offset: int = 0
) -> dict:
    """The completions shape for these tokens; `offset`: where their text starts in the choice's text.
    An entry is None for the prompt's first token (nothing comes before it to predict it)."""
    tokens = [token_text(tokenizer, t) for t in token_ids]
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []
    for token, entry in zip(tokens, entries):
        text_offset.append(offset)
        offset += len(token)
        if entry is None:
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        token_logprobs.append(entry.logprob)
        top = {token_text(tokenizer, t): lp for t, lp in entry.top}
        top.setdefault(token, entry.logprob)
        top_logprobs.append(top)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": text_offset,
    }


def chat_logprobs(tokenizer, entries: list[TokenLogprob]) -> dict:
    def item(token_id: int, logprob: float) -> dict:
        token = token_text(tokenizer, token_id)
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {
        "content": [
            {**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
            for e in entries
        ]
    }
