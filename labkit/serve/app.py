"""An OpenAI-compatible HTTP server around labkit's continuous-batching engine.

    app = create_app(ServeConfig(), EngineThread(LLMEngine(model, tokenizer)), tokenizer)
    uvicorn.run(app)            # or: labkit serve  (the engine in its own process: EngineProcess)

Endpoints: POST /v1/completions, POST /v1/chat/completions (both stream with `"stream": true`, both
take `n`, `logprobs`, vLLM's `structured_outputs`; completions also `echo`; chat also `response_format`
and `tools`, whose calls come back as `tool_calls`: tools.py), GET /v1/models and /v1/models/{model}, POST /generate
(the course seed's original endpoint), POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's:
LoRA adapters served beside the base model, named as `model`; lora.py), GET /health (the process is alive), GET /ready (it can take
traffic: engine running, not draining), GET /metrics (Prometheus). Every error has OpenAI's shape
(errors.py), and /openapi.json describes what the server really sends (openapi.py).

In front of the engine, three gateway features, each in its own file: per-key limits (ratelimit.py),
a JSON access log and request ids (accesslog.py), and a cache of deterministic answers
(response_cache.py).
"""

import asyncio
import json
import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from labkit.engine import SamplingParams
from labkit.engine.lora import LoRAAdapter, LoRAError

from . import errors
from .accesslog import AccessLog, AccessLogMiddleware, Exchange
from .choices import Choice, chat_logprobs, completion_logprobs
from .config import ServeConfig
from .engine_client import EngineClient, EngineDead
from .errors import APIError
from .metrics import HTTPMetricsMiddleware, ServerMetrics
from .openapi import RESPONSES, document_routes
from .protocol import (
    MAX_N,
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequest,
    LoadLoRARequest,
    UnloadLoRARequest,
    chat_body,
    chat_choice,
    chat_chunk,
    chat_chunk_choice,
    completion_body,
    completion_choice,
    is_token_ids,
    new_id,
    usage,
    usage_chunk,
)
from .ratelimit import APIKey, RateLimiter, RequestLimitGate
from .response_cache import ResponseCache, cache_key
from .tools import ToolCallParser, render_messages

log = logging.getLogger("labkit.serve")


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _sse_template(make_chunk):
    """make_chunk(delta) -> dict of choice 0's ordinary chunk, turned into a fast delta -> SSE string.

    A stream sends one chunk per token (per engine step), and all but the last differ only in their text,
    so we serialise the chunk once with a marker and afterwards only JSON-escape the delta: building and
    dumping the nested dict for every token was a visible part of the event loop's time."""
    mark = "\x00delta\x00"
    head, tail = json.dumps(make_chunk(mark)).split(json.dumps(mark))
    return lambda delta: f"data: {head}{json.dumps(delta)}{tail}\n\n"


class Server:
    """The state behind the routes: engine, tokenizer, limits. One per app."""

    def __init__(self, config: ServeConfig, engine: EngineClient, tokenizer):
        gateway = config.gateway
        self.tokenizer, self.model_name = tokenizer, config.model_name
        self.max_waiting = config.max_waiting
        self.metrics = ServerMetrics(self.model_name)
        keys = {gateway.api_key: APIKey("default")} if gateway.api_key else {}
        keys.update(gateway.api_keys or {})
        registry = self.metrics.registry
        self.limiter = RateLimiter(
            keys, gateway.requests_per_minute, gateway.tokens_per_minute, registry
        )
        self.cache = ResponseCache(gateway.response_cache, gateway.response_cache_bytes, registry)
        self.engine = engine
        engine.metrics = self.metrics
        limit = engine.limits.max_context
        self.context_length = min(config.max_model_len or limit, limit)
        self.vocab_size = engine.limits.vocab_size
        self.max_running = engine.limits.max_num_seqs
        self.draining = False
        self.loras: dict[str, str] = dict(engine.limits.loras)  # adapters served: name -> path

    # ---- request -> (prompt ids, sampling params) ------------------------------------------------
    def authenticate(self, request: Request) -> APIKey:
        """The request's API key (401 if it is not one of ours); its id goes in the access log."""
        key = self.limiter.authenticate(request.headers.get("authorization", ""))
        request.state.exchange.key_id = key.id
        return key

    def check_model(self, name: str | None, request: Request | None = None) -> str | None:
        """The LoRA adapter `name` selects (None: the base model), noted on the request's exchange;
        404 model_not_found for a name this server does not serve."""
        if name in (None, "", self.model_name):
            return None
        if name not in self.loras:
            served = ", ".join(f"`{m}`" for m in [self.model_name, *self.loras])
            raise APIError(
                404,
                f"The model `{name}` does not exist; this server serves {served}.",
                param="model",
                code="model_not_found",
            )
        if request is not None:
            request.state.exchange.lora = name
        return name

    async def load_lora(self, req: LoadLoRARequest) -> str:
        """Check the adapter here (read in a worker thread: it is MBs), then hand it to the engine:
        a wrong base model, rank or file is a 400 before any batch sees it."""
        limits = self.engine.limits
        if limits.lora_base is None:
            raise APIError(
                400, "LoRA is off on this server: start it with --enable-lora.", param="lora_path"
            )
        if req.lora_name == self.model_name or req.lora_name in self.loras:
            raise APIError(
                400,
                f"The model `{req.lora_name}` is already served; unload it first.",
                param="lora_name",
            )
        try:
            await asyncio.to_thread(
                LoRAAdapter.load,
                req.lora_name,
                req.lora_path,
                limits.lora_base,
                limits.max_lora_rank,
            )
        except LoRAError as err:
            raise APIError(400, str(err), param="lora_path", code="invalid_lora_adapter") from err
        self.loras[req.lora_name] = req.lora_path
        self.engine.load_lora(req.lora_name, req.lora_path)
        return f"Success: LoRA adapter '{req.lora_name}' added successfully."

    def unload_lora(self, req: UnloadLoRARequest) -> str:
        if req.lora_name not in self.loras:
            raise APIError(
                404,
                f"The LoRA adapter `{req.lora_name}` is not loaded.",
                param="lora_name",
                code="model_not_found",
            )
        del self.loras[req.lora_name]
        self.engine.unload_lora(req.lora_name)
        return f"Success: LoRA adapter '{req.lora_name}' removed successfully."

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        else:
            ids = list(prompt)
            bad = [i for i in ids if i >= self.vocab_size]
            if bad:
                raise APIError(
                    400,
                    f"prompt token ids must be in [0, {self.vocab_size}); got {bad[:5]}",
                    param="prompt",
                )
        if not ids:
            raise APIError(
                400, "The prompt is empty: send at least one token of text.", param="prompt"
            )
        return ids

    def chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise APIError(
                400,
                f"model `{self.model_name}` has no chat template: use /v1/completions",
                param="messages",
            )
        messages = render_messages(
            [{**m.model_dump(exclude_none=True), "content": m.text()} for m in req.messages],
            req.tool_dicts(),
        )
        text = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        return self.encode_prompt(text)

    def sampling(
        self,
        req,
        n_prompt: int,
        max_tokens: int | None,
        default_max: int | None,
        logprobs: int | None = None,
        prompt_logprobs: int | None = None,
    ) -> SamplingParams:
        if max_tokens is None:
            max_tokens = default_max if default_max is not None else self.context_length - n_prompt
        if n_prompt + max_tokens > self.context_length:
            raise APIError(
                400,
                f"This model's maximum context length is {self.context_length} tokens. However, "
                f"you requested {n_prompt + max_tokens} tokens ({n_prompt} in the prompt, "
                f"{max_tokens} for the completion). Please reduce the length of the prompt or "
                f"completion.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        n, top_k = getattr(req, "n", 1), getattr(req, "top_k", 0)
        if n > self.max_running:  # its samples run side by side: they must fit in one batch
            raise APIError(
                400,
                f"n={n} is more samples than this server runs at once ({self.max_running}).",
                param="n",
            )
        try:
            return SamplingParams(
                n=n,
                temperature=req.temperature,
                top_p=req.top_p,
                top_k=0 if top_k < 0 or top_k >= self.vocab_size else top_k,  # >= vocab: no limit
                max_tokens=max_tokens,
                stop_token_ids=getattr(req, "stop_token_ids", None),
                seed=req.seed,
                ignore_eos=getattr(req, "ignore_eos", False),
                logprobs=logprobs,
                prompt_logprobs=prompt_logprobs,
                structured_outputs=getattr(req, "spec", None),  # (/generate has none)
            )
        except ValueError as err:  # the engine's own checks, the last line of defence
            raise APIError(400, str(err)) from err

    def admit(self) -> None:
        if self.draining:
            raise APIError(
                503,
                "The server is shutting down (draining in-flight requests); retry on another "
                "replica.",
                type="server_error",
                code="server_draining",
                headers={"Retry-After": "1", "Connection": "close"},
            )
        if not self.engine.alive:
            raise APIError(
                503,
                f"The engine is not running ({self.engine.state}); retry shortly.",
                type="server_error",
                code="engine_unavailable",
                headers={"Retry-After": "5"},
            )
        # deterministic (no stale engine stats): the batch's worth of running requests + the queue
        if self.engine.num_active >= self.max_running + self.max_waiting:
            raise APIError(
                429,
                f"Server busy: {self.engine.num_active} requests in flight "
                f"(limit {self.max_running} running + {self.max_waiting} waiting). Retry later.",
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": "1"},
            )

    def charge(self, request: Request, key: APIKey, prompt, n_prompt: int, params) -> Exchange:
        """The key's limits (ratelimit.py): take 1 request and the worst-case tokens, or 429. When the
        exchange ends, however it ends, the tokens it did not use are given back."""
        grant = self.limiter.admit(key, n_prompt + params.n * params.max_tokens)
        exchange: Exchange = request.state.exchange
        exchange.prompt = prompt
        exchange.headers.update(grant.headers)
        exchange.on_end.append(
            lambda ex: grant.settle((ex.prompt_tokens or 0) + (ex.completion_tokens or 0))
        )
        return exchange

    def cached(
        self, exchange: Exchange, endpoint: str, req, params
    ) -> tuple[str | None, dict | None]:
        """(cache key or None if not cacheable, the cached {"choices", "usage"} or None)."""
        if not self.cache.enabled:
            return None, None
        model = self.model_name  # an adapter's answers are its own: its name and files in the key
        if exchange.lora is not None:
            model = f"{exchange.lora}={self.loras.get(exchange.lora)}"
        key = cache_key(endpoint, model, req, params.max_tokens)
        hit = None if key is None else self.cache.get(key)
        if hit is not None:
            exchange.cached_body, exchange.prompt_tokens = hit, hit["usage"]["prompt_tokens"]
        return key, hit

    # ---- running one request ---------------------------------------------------------------------
    def start(
        self, exchange: Exchange, prompt_ids: list[int], params: SamplingParams, stop
    ) -> tuple[str, asyncio.Queue, list[Choice]]:
        """Admit and submit in one synchronous step, so a burst of requests cannot all pass the
        queue-limit check before any of them is counted. The exchange follows its choices' tokens."""
        self.admit()
        rid = new_id("req")
        try:
            out = self.engine.submit(rid, prompt_ids, params, exchange.lora)
        except EngineDead as err:
            raise APIError(503, str(err), type="server_error", code="engine_unavailable") from err
        exchange.prompt_tokens = len(prompt_ids)
        exchange.choices = [Choice(i, self.tokenizer, stop) for i in range(params.n)]
        self.metrics.lora_request(exchange)
        return rid, out, exchange.choices

    async def generate(self, rid: str, out: asyncio.Queue, choices: list[Choice]):
        """Async iterator of (choice, text delta, new TokenLogprobs), until every choice is finished.

        All the outputs that arrived since the last turn are taken at once (under load the engine gets
        ahead of us), so a stream sends one chunk per choice per turn, not one per token. If the
        consumer stops early (client gone, task cancelled) the `finally` aborts the request, which
        frees its KV blocks: a vanished client must not keep decoding."""
        done = False
        try:
            while not all(c.finished for c in choices):
                items = [await out.get()]
                while not out.empty():
                    items.append(out.get_nowait())
                by_choice: dict[int, list] = {}
                for item in items:
                    if isinstance(item, Exception):
                        raise self.engine_error(item)
                    if item.finish_reason == "error":
                        raise APIError(
                            500,
                            item.error or "The request failed inside the engine.",
                            type="server_error",
                        )
                    if item.prompt_logprobs is not None:  # (once, with echo: every choice shows it)
                        for c in choices:
                            c.prompt_logprobs = item.prompt_logprobs
                    by_choice.setdefault(item.index, []).append(item)
                for index, outs in by_choice.items():
                    choice = choices[index]
                    if choice.finished:  # ended by a stop string; the engine may still run it
                        continue
                    delta, logprobs = choice.push(outs)
                    if delta or logprobs or choice.finished:
                        yield choice, delta, logprobs
            done = True
            if not all(c.engine_finished for c in choices):
                self.engine.abort(rid, reason="stop")  # stop strings the engine did not see
        finally:
            if not done:
                self.engine.abort(rid)

    @staticmethod
    def engine_error(err: Exception) -> APIError:
        if isinstance(err, ValueError):  # add_request refused it (too long for the KV cache...)
            return APIError(400, str(err))
        if isinstance(err, EngineDead):
            return APIError(503, str(err), type="server_error", code="engine_unavailable")
        return APIError(500, "The request failed inside the engine.", type="server_error")

    async def collect(self, request: Request, prompt_ids, params, stop) -> list[Choice]:
        """Run to completion (non-streaming), aborting if the client disconnects meanwhile."""
        rid, out, choices = self.start(request.state.exchange, prompt_ids, params, stop)

        async def run():
            async for _ in self.generate(rid, out, choices):
                pass

        task = asyncio.ensure_future(run())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.5)
                if done:
                    task.result()
                    return choices
                if await request.is_disconnected():
                    task.cancel()
                    raise APIError(499, "client disconnected")
        finally:
            self.engine.abort(rid)  # a no-op if it finished; frees the blocks if we were cancelled

    async def answer(self, request: Request, req, ids: list[int], params, kind: "Endpoint") -> dict:
        """The non-streaming flow both OpenAI endpoints share: the response cache's answer if it has
        one, else run the request to the end, shape each choice (kind.choice) and the body (kind.body),
        and keep the answer in the cache when it may be reused."""
        rid = new_id(kind.id_prefix)
        model = (
            req.model or self.model_name
        )  # the adapter's name when it named one, as vLLM answers
        slot, hit = self.cached(request.state.exchange, kind.path, req, params)
        if hit is not None:
            return kind.body(rid, model, hit["choices"], hit["usage"])
        choices = await self.collect(request, ids, params, req.stop)
        body = [kind.choice(self, req, ids, c) for c in choices]
        use = usage(len(ids), sum(c.num_tokens for c in choices))
        if slot is not None:
            self.cache.put(slot, {"choices": body, "usage": use})
        return kind.body(rid, model, body, use)

    async def stream(self, exchange: Exchange, prompt_ids, params, stop, events_of):
        """Start the request and wait for its first output *before* sending headers, so an engine-side
        rejection still becomes a proper HTTP error; then stream SSE events.

        events_of(choices, updates) -> async iterator of SSE strings, given the updates iterator."""
        req_id, out, choices = self.start(exchange, prompt_ids, params, stop)
        agen = self.generate(req_id, out, choices)
        try:
            first = await agen.__anext__()
        except BaseException:
            await agen.aclose()
            self.engine.abort(req_id)
            raise

        async def updates():
            yield first
            async for update in agen:
                yield update

        async def events():
            try:
                async for event in events_of(choices, updates()):
                    yield event
                yield "data: [DONE]\n\n"
            except APIError as err:  # the engine died mid-stream: tell the client in-band
                exchange.error = err.code or err.type
                yield _sse(err.body())
            except Exception:  # a bug: the headers are sent, so the client hears it in-band too
                log.exception("unexpected error while streaming")
                exchange.error = "server_error"
                yield _sse(APIError(500, "Internal server error.", type="server_error").body())
            finally:
                await agen.aclose()  # client gone -> generator's finally aborts the request
                self.engine.abort(req_id)  # (and if the generator never ran: a no-op once finished)

        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )


def prompt_text(tokenizer, req: CompletionRequest, ids: list[int]) -> str:
    """What echo returns before the completion: the prompt as sent, or its token ids decoded."""
    return req.prompt if isinstance(req.prompt, str) else tokenizer.decode(ids)


def completion_text_and_logprobs(srv: Server, req: CompletionRequest, ids, choice: Choice):
    """A finished completions choice: its text (after the prompt, with echo) and logprobs shape."""
    prompt = prompt_text(srv.tokenizer, req, ids) if req.echo else ""
    if req.logprobs is None:
        return prompt + choice.text, None
    out_ids = [e.token_id for e in choice.logprobs]
    if not req.echo:
        return choice.text, completion_logprobs(srv.tokenizer, out_ids, choice.logprobs)
    entries = list(choice.prompt_logprobs or []) + choice.logprobs
    return prompt + choice.text, completion_logprobs(srv.tokenizer, ids + out_ids, entries)


def completion_choice_of(srv: Server, req: CompletionRequest, ids: list[int], c: Choice) -> dict:
    text, logprobs = completion_text_and_logprobs(srv, req, ids, c)
    return completion_choice(c.index, text, c.reason, logprobs)


def chat_choice_of(srv: Server, req: ChatCompletionRequest, ids: list[int], c: Choice) -> dict:
    logprobs = chat_logprobs(srv.tokenizer, c.logprobs) if req.logprobs else None
    if not req.calls_tools:
        return chat_choice(c.index, c.text, c.reason, logprobs)
    parser = ToolCallParser()
    content = parser.feed(c.text)[0] + parser.finish()[0]
    if not parser.calls:
        return chat_choice(c.index, content, c.reason, logprobs)
    calls = [call.message() for call in parser.calls]
    return chat_choice(c.index, content.strip() or None, tool_reason(c.reason), logprobs, calls)


def tool_reason(reason: str | None) -> str | None:
    """A choice that made tool calls and ended on its own says so (OpenAI's "tool_calls")."""
    return "tool_calls" if reason == "stop" else reason


@dataclass(frozen=True)
class Endpoint:
    """What differs between /v1/completions and /v1/chat/completions once a request has run."""

    path: str  # (the response cache keys on it)
    id_prefix: str  # cmpl-..., chatcmpl-...
    choice: Callable[[Server, Any, list[int], Choice], dict]  # a finished choice -> its JSON
    body: Callable[[str, str, list[dict], dict], dict]  # (id, model, choices, usage) -> the body


COMPLETIONS = Endpoint("/v1/completions", "cmpl", completion_choice_of, completion_body)
CHAT = Endpoint("/v1/chat/completions", "chatcmpl", chat_choice_of, chat_body)


def create_app(config: ServeConfig, engine: EngineClient, tokenizer) -> FastAPI:
    """The FastAPI app serving `engine` (an EngineThread or an EngineProcess) as `config` says: the
    gateway's keys, limits, access log and cache (config.gateway), the queue and context limits."""
    srv = Server(config, engine, tokenizer)

    @asynccontextmanager
    async def lifespan(app):
        srv.engine.start()
        yield
        srv.draining = (
            True  # the drain phase (draining.py) and uvicorn let in-flight requests finish
        )
        srv.engine.stop()

    app = FastAPI(title="labkit serve", lifespan=lifespan)
    app.state.server = srv
    generation = {"/v1/completions", "/v1/chat/completions", "/generate"}
    app.add_middleware(RequestLimitGate, limiter=srv.limiter, paths=generation)  # (innermost)
    app.add_middleware(HTTPMetricsMiddleware, metrics=srv.metrics)
    gateway = config.gateway
    access = AccessLog(gateway.access_log, gateway.access_log_text, srv.metrics.registry)
    app.add_middleware(AccessLogMiddleware, log=access)
    errors.install(app)

    async def auth(request: Request) -> APIKey:  # a dependency: runs before the body is validated
        return srv.authenticate(request)

    protected = [Depends(auth)]
    Keyed = Annotated[APIKey, Depends(auth)]  # a generation route's key

    @app.get("/health", responses=RESPONSES[("GET", "/health")])
    async def health():
        """Liveness: 503 only when nothing but a restart of the server can help."""
        if srv.engine.state == "failed":
            return JSONResponse({"status": "failed", "reason": srv.engine.reason}, 503)
        return {"status": "ok"}

    @app.get("/ready", responses=RESPONSES[("GET", "/ready")])
    async def ready():
        """Readiness: 200 only when a request sent now would be served."""
        if srv.draining:
            return JSONResponse({"status": "draining"}, 503)
        if not srv.engine.alive:
            return JSONResponse({"status": srv.engine.state, "reason": srv.engine.reason}, 503)
        return {"status": "ready", "model": srv.model_name}

    @app.get("/metrics", response_class=PlainTextResponse, responses=RESPONSES[("GET", "/metrics")])
    async def metrics():
        body, content_type = srv.metrics.render()
        return Response(body, media_type=content_type)

    def model_card(lora: str | None = None) -> dict:
        """The base model's card, or a LoRA adapter's: its files as `root`, the base as `parent`
        (vLLM's fields)."""
        return {
            "id": lora or srv.model_name,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "labkit",
            "root": srv.loras[lora] if lora else srv.model_name,
            "parent": srv.model_name if lora else None,
            "max_model_len": srv.context_length,
        }

    @app.get("/v1/models", dependencies=protected, responses=RESPONSES[("GET", "/v1/models")])
    async def models():
        return {"object": "list", "data": [model_card(m) for m in [None, *srv.loras]]}

    @app.get(
        "/v1/models/{model:path}",
        dependencies=protected,
        responses=RESPONSES[("GET", "/v1/models/{model}")],
    )
    async def model(model: str):
        return model_card(srv.check_model(model or None))

    @app.post(
        "/v1/load_lora_adapter",
        dependencies=protected,
        responses=RESPONSES[("POST", "/v1/load_lora_adapter")],
    )
    async def load_lora_adapter(req: LoadLoRARequest):
        """vLLM's: serve the peft LoRA adapter at `lora_path` as model `lora_name`."""
        return PlainTextResponse(await srv.load_lora(req))

    @app.post(
        "/v1/unload_lora_adapter",
        dependencies=protected,
        responses=RESPONSES[("POST", "/v1/unload_lora_adapter")],
    )
    async def unload_lora_adapter(req: UnloadLoRARequest):
        """vLLM's: stop serving an adapter; requests already running with it finish with it."""
        return PlainTextResponse(srv.unload_lora(req))

    @app.post("/v1/completions", responses=RESPONSES[("POST", "/v1/completions")])
    async def completions(req: CompletionRequest, request: Request, key: Keyed):
        srv.check_model(req.model, request)
        prompt = req.prompt  # text or token ids: validation unwrapped a list holding one of them
        assert isinstance(prompt, str) or is_token_ids(prompt)
        ids = srv.encode_prompt(prompt)
        prompt_logprobs = req.logprobs if req.echo and req.logprobs is not None else None
        if req.max_tokens == 0 and prompt_logprobs is None:
            prompt_logprobs = 0  # scoring-only: the engine needs something to compute
        params = srv.sampling(
            req, len(ids), req.max_tokens, 16, req.logprobs, prompt_logprobs
        )  # OpenAI's default max_tokens: 16
        exchange = srv.charge(request, key, req.prompt, len(ids), params)
        if not req.stream:
            return await srv.answer(request, req, ids, params, COMPLETIONS)
        events = completion_events(req, new_id("cmpl"), ids)
        return await srv.stream(exchange, ids, params, req.stop, events)

    def completion_events(req: CompletionRequest, rid: str, ids: list[int]):
        model = req.model or srv.model_name

        def chunk(choices: list[dict]) -> dict:
            return completion_body(rid, model, choices, None)

        fast = _sse_template(lambda d: chunk([completion_choice(0, d, None, None)]))

        async def events(choices: list[Choice], updates):
            echoed: set[int] = set()
            async for c, delta, logprobs in updates:
                if c.index in echoed or not req.echo:
                    if req.logprobs is None and c.index == 0 and not c.finished:
                        yield fast(delta)
                        continue
                    prompt, prompt_lp = "", []
                    prompt_ids = []
                else:  # echo: the prompt (and its logprobs) comes first, once per choice
                    echoed.add(c.index)
                    prompt, prompt_ids = prompt_text(srv.tokenizer, req, ids), ids
                    prompt_lp = list(c.prompt_logprobs or [])
                lp = None
                if req.logprobs is not None:
                    new_ids = [e.token_id for e in logprobs]
                    lp = completion_logprobs(
                        srv.tokenizer, prompt_ids + new_ids, prompt_lp + logprobs
                    )
                yield _sse(chunk([completion_choice(c.index, prompt + delta, c.reason, lp)]))
            if req.include_usage:
                n_out = sum(c.num_tokens for c in choices)
                use = usage(len(ids), n_out)
                yield _sse(usage_chunk(rid, model, "text_completion", use))

        return events

    @app.post("/v1/chat/completions", responses=RESPONSES[("POST", "/v1/chat/completions")])
    async def chat_completions(req: ChatCompletionRequest, request: Request, key: Keyed):
        srv.check_model(req.model, request)
        ids = srv.chat_prompt(req)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = srv.sampling(
            req, len(ids), req.max_completion_tokens or req.max_tokens, None, logprobs
        )
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        exchange = srv.charge(request, key, messages, len(ids), params)
        if not req.stream:
            return await srv.answer(request, req, ids, params, CHAT)
        events = chat_events(req, new_id("chatcmpl"), len(ids))
        return await srv.stream(exchange, ids, params, req.stop, events)

    def chat_events(req: ChatCompletionRequest, rid: str, n_prompt: int):
        model = req.model or srv.model_name

        def chunk(index: int, delta: dict, reason: str | None, logprobs=None) -> dict:
            return chat_chunk(rid, model, [chat_chunk_choice(index, delta, reason, logprobs)])

        fast = _sse_template(lambda d: chunk(0, {"content": d}, None))
        parsers = [ToolCallParser() for _ in range(req.n)] if req.calls_tools else None

        async def events(choices: list[Choice], updates):
            for c in choices:
                yield _sse(chunk(c.index, {"role": "assistant", "content": ""}, None))
            async for c, delta, logprobs in updates:
                if (
                    parsers is not None
                ):  # the text may hold tool calls: send them as tool_calls deltas
                    lp = chat_logprobs(srv.tokenizer, logprobs) if req.logprobs else None
                    for event in tool_chunks(parsers[c.index], c, delta, lp):
                        yield _sse(event)
                    continue
                if not req.logprobs and c.index == 0 and not c.finished:
                    yield fast(delta)
                    continue
                lp = chat_logprobs(srv.tokenizer, logprobs) if req.logprobs else None
                content = {"content": delta} if delta or not c.finished else {}
                yield _sse(chunk(c.index, content, c.reason, lp))
            if req.include_usage:
                n_out = sum(c.num_tokens for c in choices)
                yield _sse(usage_chunk(rid, model, "chat.completion.chunk", usage(n_prompt, n_out)))

        def tool_chunks(parser: ToolCallParser, c: Choice, delta: str, lp):
            content, calls = parser.feed(delta)
            if c.finished:
                rest, more = parser.finish()
                content, calls = content + rest, calls + more
            reason = tool_reason(c.reason) if parser.calls else c.reason
            if calls:
                yield chunk(c.index, {"tool_calls": calls}, None)
            if content or lp or c.finished:
                yield chunk(c.index, {"content": content} if content else {}, reason, lp)

        return events

    @app.post("/generate", responses=RESPONSES[("POST", "/generate")])
    async def generate(req: GenerateRequest, request: Request, key: Keyed):
        """The seed's endpoint: {"prompt", "max_new_tokens", "temperature", "top_p", "seed"} -> {"text", ...}."""
        ids = srv.encode_prompt(req.prompt)
        params = srv.sampling(req, len(ids), req.max_new_tokens, None)
        srv.charge(request, key, req.prompt, len(ids), params)
        (choice,) = await srv.collect(request, ids, params, None)
        return {
            "text": choice.text,
            "finish_reason": choice.reason,
            "usage": usage(len(ids), choice.num_tokens),
        }

    document_routes(app, max_n=min(MAX_N, srv.max_running), max_tokens=srv.context_length - 1)
    return app
