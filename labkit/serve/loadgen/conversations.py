"""Multi-turn conversations: each one a client with its own session id, to test session affinity.

A chat service sends, at every turn, the whole conversation so far: turn k's prompt starts with turn k-1's
prompt and answer. A replica that served turn k-1 still holds that prefix in its KV cache (prefix caching,
labkit/engine/block_manager.py) and prefills only the new tokens; any other replica recomputes all of it.
So a load balancer that sends every turn of a session to the same replica (balancer.py's "affinity"
policy, a consistent hash of the X-Session-Id header) saves prefill work and time to first token.

The course model has no chat template, so a conversation here is a growing completion prompt: an opening
passage, then for each turn a new "user" line (opening words of another held-out paragraph), then the
model's answer, which the next turn's prompt includes. Each conversation is one closed-loop client on
its own keep-alive Connection carrying its own X-Session-Id header; all conversations run at once.
"""

import asyncio
import random
import urllib.parse
from dataclasses import dataclass

from labkit.data import sample_prompts

from ..balancer import SESSION_HEADER
from .client import Connection, stream_completion
from .stats import RequestRecord


@dataclass
class Turn:
    session: str  # the X-Session-Id it carried
    index: int  # 0 = the first turn (nothing cached yet anywhere)
    record: RequestRecord  # TTFT, e2e, tokens... as for any request
    served_by: str | None  # the X-Served-By header the load balancer adds (None without one)


def conversation_openings(n: int, seed: int = 0) -> list[str]:
    """n different opening passages (100-180 words of held-out Austen), one per conversation: long enough
    that prefilling a conversation costs something, short enough that 4-5 turns fit the course model's 512
    tokens."""
    return sample_prompts(n, seed, min_words=100, max_words=180)


async def run_conversations(
    base_url: str,
    n_conversations: int,
    turns: int,
    max_tokens: int = 16,
    seed: int = 0,
    send_session_id: bool = True,
    model: str = "course",
    timeout: float = 300.0,
) -> list[Turn]:
    """n_conversations at once, each `turns` turns long (greedy, max_tokens per answer). A conversation
    whose turn fails stops there (its history would be wrong). send_session_id=False: no header, so the
    load balancer cannot keep a session in one place."""
    openings = conversation_openings(n_conversations, seed)
    user_lines = sample_prompts(n_conversations * turns, seed + 1, min_words=4, max_words=12)
    rng = random.Random(seed)
    path = urllib.parse.urlsplit(base_url).path.rstrip("/") + "/v1/completions"
    result: list[Turn] = []

    async def conversation(c: int) -> None:
        session = f"conv-{seed}-{c}-{rng.getrandbits(32):08x}"
        conn = Connection(base_url, {SESSION_HEADER: session} if send_session_id else None)
        history = openings[c]
        try:
            for k in range(turns):
                history += "\n\n" + user_lines[c * turns + k]
                payload = {
                    "model": model,
                    "prompt": history,
                    "max_tokens": max_tokens,
                    "temperature": 0.0,
                    "ignore_eos": True,
                }
                rec = await stream_completion(conn, path, payload, timeout=timeout)
                result.append(Turn(session, k, rec, conn.headers.get("x-served-by")))
                if not rec.ok:
                    return
                history += rec.text
        finally:
            conn.close()

    await asyncio.gather(*(conversation(c) for c in range(n_conversations)))
    return result


def replicas_per_session(turns: list[Turn]) -> dict[str, set[str | None]]:
    """{session: the replicas that served its turns}: one replica each under affinity."""
    seen: dict[str, set[str | None]] = {}
    for t in turns:
        seen.setdefault(t.session, set()).add(t.served_by)
    return seen
