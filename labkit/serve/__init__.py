"""labkit.serve: labkit's engine as an OpenAI-compatible service. Read in this order:

protocol.py        the OpenAI request/response shapes, strictly parsed, and the error format
errors.py          one OpenAI-shaped error body for every failure, never a traceback
tools.py           tool calls for a template without tools: the prompt, the call grammar, the parser
detokenize.py      token ids -> streamable text, stop strings
engine_client.py   the small protocol app.py relies on, whichever way the engine is driven
tracker.py         the requests in flight: where their outputs go, the latency metrics they feed
messages.py        the typed commands and events between the HTTP side and the engine
engine_thread.py   driver 1: one background thread owns the engine (--engine-mode thread)
engine_process.py  driver 2: the engine in its own, supervised process (the default: no shared GIL)
options.py         an option declared once: a dataclass field that is also a flag, with its checks
engine_args.py     what the engine is built from (model, dtype, KV blocks...), for both drivers
config.py          ServeConfig: engine args, gateway options and the server's own, one frozen object
metrics.py         Prometheus metrics under vLLM's names
app.py             the FastAPI routes: /v1/completions, /v1/chat/completions, /v1/models, /generate, ...
draining.py        uvicorn with a drain phase on SIGTERM
cli.py             `labkit serve`
launch.py          start/stop a server subprocess from a notebook, test or benchmark
replicas.py        several servers side by side; kill one (crash) or drain it
balancer.py        HAProxy in front of replicas: policies, health checks on /ready, retries
failover.py        a replica killed under load: what the clients saw, how fast traffic moved
loadgen/           N concurrent streaming clients: TTFT, TPOT, e2e percentiles, throughput
"""
