"""An OpenAI-compatible HTTP server around labkit's continuous-batching engine.

    app = create_app(LLMEngine(model, tokenizer), tokenizer, model_name="course")   # engine in a thread
    uvicorn.run(app)            # or: labkit serve  (engine in its own process: EngineProcess(args))

Endpoints: POST /v1/completions, POST /v1/chat/completions (both stream with `"stream": true`),
GET /v1/models, POST /generate (the course seed's original endpoint), GET /health (the process is
alive), GET /ready (it can take traffic: model loaded, not draining), GET /metrics (Prometheus).
Errors use OpenAI's shape, {"error": {"message", "type", "param", "code"}}, so the `openai` client
raises its usual exception classes.
"""

import asyncio
import json
import time
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from labkit.engine import SamplingParams

from .detokenize import IncrementalDetokenizer
from .engine_client import EngineClient, EngineDead
from .metrics import HTTPMetricsMiddleware, ServerMetrics
from .protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequest,
    chat_body,
    chat_chunk,
    completion_body,
    new_id,
    usage,
    usage_chunk,
)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _sse_template(make_chunk):
    """make_chunk(delta, reason) -> dict, turned into a fast (delta, reason) -> SSE event string.

    A stream sends one chunk per token (per engine step), and all but the last differ only in their text,
    so we serialise the chunk once with a marker and afterwards only JSON-escape the delta: building and
    dumping the nested dict for every token was a visible part of the event loop's time."""
    mark = "\x00delta\x00"
    head, tail = json.dumps(make_chunk(mark, None)).split(json.dumps(mark))

    def event(delta: str, reason: str | None) -> str:
        if reason is not None:  # the last chunk (finish_reason set): rare, take the general path
            return _sse(make_chunk(delta, reason))
        return f"data: {head}{json.dumps(delta)}{tail}\n\n"

    return event


class Server:
    """The state behind the routes: engine loop, tokenizer, limits. One per app."""

    def __init__(
        self,
        engine: EngineClient,
        tokenizer,
        model_name: str,
        api_key: str | None = None,
        max_waiting: int = 256,
        context_length: int | None = None,
    ):
        self.tokenizer, self.model_name, self.api_key, self.max_waiting = (
            tokenizer,
            model_name,
            api_key,
            max_waiting,
        )
        self.metrics = ServerMetrics(model_name)
        self.engine = engine
        engine.metrics = self.metrics
        self.context_length = context_length or engine.limits.max_context
        self.vocab_size = engine.limits.vocab_size
        self.max_running = engine.limits.max_num_seqs
        self.draining = False

    # ---- request -> (prompt ids, sampling params) ------------------------------------------------
    def check_auth(self, request: Request) -> None:
        if self.api_key and request.headers.get("authorization", "") != f"Bearer {self.api_key}":
            raise APIError(
                401,
                "Incorrect or missing API key: send `Authorization: Bearer <key>`.",
                code="invalid_api_key",
            )

    def check_model(self, name: str | None) -> None:
        if name not in (None, "", self.model_name):
            raise APIError(
                404,
                f"The model `{name}` does not exist; this server serves `{self.model_name}`.",
                param="model",
                code="model_not_found",
            )

    def encode_prompt(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        else:
            ids = list(prompt)
            bad = [i for i in ids if not 0 <= i < self.vocab_size]
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
        try:
            messages = [
                {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in req.messages
            ]
        except ValueError as err:
            raise APIError(400, str(err), param="messages") from err
        text = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        return self.encode_prompt(text)

    def sampling(self, req, n_prompt: int, max_tokens: int | None, default_max: int | None):
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
        try:
            return SamplingParams(
                temperature=req.temperature,
                top_p=req.top_p,
                top_k=max(0, req.top_k),
                max_tokens=max_tokens,
                stop_token_ids=req.stop_token_ids,
                stop=req.stop,
                seed=req.seed,
                ignore_eos=req.ignore_eos,
            )
        except ValueError as err:
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
            raise APIError(503, "The engine is not running.", type="server_error")
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

    # ---- running one request ---------------------------------------------------------------------
    def start(self, prompt_ids: list[int], params) -> tuple[str, asyncio.Queue]:
        """Admit and submit in one synchronous step, so a burst of requests cannot all pass the
        queue-limit check before any of them is counted."""
        self.admit()
        rid = new_id("req")
        return rid, self.engine.submit(rid, prompt_ids, params)

    async def generate(self, rid: str, out: asyncio.Queue, stop: list[str] | None):
        """Async iterator of (text_delta, finish_reason | None, num_output_tokens).

        If the consumer stops early (client disconnected, task cancelled) the `finally` aborts the
        request, which frees its KV blocks: a vanished client must not keep decoding."""
        detok = IncrementalDetokenizer(self.tokenizer, stop)
        done = False
        try:
            while True:
                item = await out.get()
                if isinstance(item, ValueError):
                    raise APIError(400, str(item))
                if isinstance(item, Exception):
                    raise APIError(
                        503 if isinstance(item, EngineDead) else 500, str(item), type="server_error"
                    )
                new_ids = list(item.new_token_ids)
                # If the engine got ahead of us (several steps' tokens are queued), send them as one chunk:
                # under load this cuts per-token HTTP/JSON work for server and client alike.
                while not item.finished and not out.empty():
                    nxt = out.get_nowait()
                    if isinstance(nxt, Exception):
                        out.put_nowait(nxt)  # an error is the last item: handle it next turn
                        break
                    item = nxt
                    new_ids += item.new_token_ids
                delta = detok.push(new_ids, final=item.finished)
                if detok.stopped or item.finished:
                    done = True
                    if not item.finished:
                        self.engine.abort(rid, reason="stop")  # a stop string the engine did not see
                    reason = "stop" if detok.stopped else item.finish_reason
                    yield delta, reason, item.num_output_tokens
                    return
                if delta:
                    yield delta, None, item.num_output_tokens
        finally:
            if not done:
                self.engine.abort(rid)

    async def collect(self, request: Request, prompt_ids, params, stop) -> tuple[str, str, int]:
        """Run to completion (non-streaming), aborting if the client disconnects meanwhile."""
        rid, out = self.start(prompt_ids, params)

        async def run():
            text, reason, n_out = [], None, 0
            async for delta, reason, n_out in self.generate(rid, out, stop):
                text.append(delta)
            return "".join(text), reason, n_out

        task = asyncio.ensure_future(run())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.5)
                if done:
                    return task.result()
                if await request.is_disconnected():
                    task.cancel()
                    raise APIError(499, "client disconnected")
        finally:
            self.engine.abort(rid)  # a no-op if it finished; frees the blocks if we were cancelled

    async def stream(
        self,
        prompt_ids,
        params,
        stop,
        make_chunk,
        object_: str,
        include_usage: bool,
        rid: str,
        first_chunks=(),
    ):
        """Start the request and wait for its first token *before* sending headers, so an engine-side
        rejection still becomes a proper HTTP error; then stream SSE chunks."""
        req_id, out = self.start(prompt_ids, params)
        agen = self.generate(req_id, out, stop)
        try:
            first = await agen.__anext__()
        except BaseException:
            await agen.aclose()
            self.engine.abort(req_id)
            raise

        chunk_event = _sse_template(make_chunk)

        async def events():
            n_out = 0
            try:
                for chunk in first_chunks:
                    yield _sse(chunk)
                delta, reason, n_out = first
                yield chunk_event(delta, reason)
                if reason is None:
                    async for delta, reason, n_out in agen:
                        yield chunk_event(delta, reason)
                if include_usage:
                    yield _sse(
                        usage_chunk(rid, self.model_name, object_, usage(len(prompt_ids), n_out))
                    )
                yield "data: [DONE]\n\n"
            except APIError as err:  # the engine died mid-stream: tell the client in-band
                yield _sse(err.body())
            finally:
                await agen.aclose()  # client gone -> generator's finally aborts the request
                self.engine.abort(req_id)  # (and if the generator never ran: a no-op once finished)

        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )


def create_app(
    engine,
    tokenizer,
    model_name: str = "course",
    api_key: str | None = None,
    max_waiting: int = 256,
    context_length: int | None = None,
) -> FastAPI:
    srv = Server(engine, tokenizer, model_name, api_key, max_waiting, context_length)

    @asynccontextmanager
    async def lifespan(app):
        srv.engine.start()
        yield
        srv.draining = True  # the drain phase (cli.DrainingServer) and uvicorn have let in-flight requests finish
        srv.engine.stop()

    app = FastAPI(title="labkit serve", lifespan=lifespan)
    app.state.server = srv
    app.add_middleware(HTTPMetricsMiddleware, metrics=srv.metrics)

    @app.exception_handler(APIError)
    async def api_error(request, err: APIError):
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, err: RequestValidationError):
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in err.errors()
        )
        first = err.errors()[0]["loc"] if err.errors() else ()
        return JSONResponse(
            APIError(400, problems, param=".".join(str(p) for p in first[1:]) or None).body(),
            status_code=400,
        )

    async def auth(request: Request):  # a dependency, so it runs before the body is validated
        srv.check_auth(request)

    protected = [Depends(auth)]

    @app.get("/health")
    async def health():
        """Liveness: 503 only when nothing but a restart of the server can help."""
        if srv.engine.state == "failed":
            return JSONResponse({"status": "failed", "reason": srv.engine.reason}, 503)
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        """Readiness: 200 only when a request sent now would be served."""
        if srv.draining:
            return JSONResponse({"status": "draining"}, 503)
        if not srv.engine.alive:
            return JSONResponse({"status": srv.engine.state, "reason": srv.engine.reason}, 503)
        return {"status": "ready", "model": srv.model_name}

    @app.get("/metrics")
    async def metrics():
        body, content_type = srv.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models", dependencies=protected)
    async def models():
        return {
            "object": "list",
            "data": [
                {
                    "id": srv.model_name,
                    "object": "model",
                    "created": int(time.time()),
                    "owned_by": "labkit",
                    "max_model_len": srv.context_length,
                }
            ],
        }

    @app.post("/v1/completions", dependencies=protected)
    async def completions(req: CompletionRequest, request: Request):
        srv.check_model(req.model)
        ids = srv.encode_prompt(req.prompt)
        params = srv.sampling(req, len(ids), req.max_tokens, default_max=16)  # OpenAI's default: 16
        rid = new_id("cmpl")
        if req.stream:
            return await srv.stream(
                ids,
                params,
                req.stop,
                lambda d, r: completion_body(rid, srv.model_name, d, r, None, chunk=True),
                "text_completion",
                req.include_usage,
                rid,
            )
        text, reason, n_out = await srv.collect(request, ids, params, req.stop)
        return completion_body(rid, srv.model_name, text, reason, usage(len(ids), n_out))

    @app.post("/v1/chat/completions", dependencies=protected)
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        srv.check_model(req.model)
        ids = srv.chat_prompt(req)
        params = srv.sampling(
            req, len(ids), req.max_completion_tokens or req.max_tokens, default_max=None
        )
        rid = new_id("chatcmpl")
        if req.stream:

            def make_chunk(delta, reason):
                return chat_chunk(
                    rid, srv.model_name, {"content": delta} if delta or not reason else {}, reason
                )

            role = chat_chunk(rid, srv.model_name, {"role": "assistant", "content": ""}, None)
            return await srv.stream(
                ids,
                params,
                req.stop,
                make_chunk,
                "chat.completion.chunk",
                req.include_usage,
                rid,
                first_chunks=(role,),
            )
        text, reason, n_out = await srv.collect(request, ids, params, req.stop)
        return chat_body(rid, srv.model_name, text, reason, usage(len(ids), n_out))

    @app.post("/generate", dependencies=protected)
    async def generate(req: GenerateRequest, request: Request):
        """The seed's endpoint: {"prompt", "max_new_tokens", "temperature", "top_p", "seed"} -> {"text", ...}."""
        ids = srv.encode_prompt(req.prompt)
        sampling = CompletionRequest(
            prompt=ids, temperature=req.temperature, top_p=req.top_p, seed=req.seed
        )
        params = srv.sampling(sampling, len(ids), req.max_new_tokens, default_max=None)
        text, reason, n_out = await srv.collect(request, ids, params, None)
        return {"text": text, "finish_reason": reason, "usage": usage(len(ids), n_out)}

    return app
