"""labkit.serve: labkit's engine as an OpenAI-compatible service. Read in this order:

protocol.py        the OpenAI request/response shapes and the error format
detokenize.py      token ids -> streamable text, stop strings
async_engine.py    one background thread owns the engine; asyncio talks to it through a queue
engine_process.py  the same interface with the engine in its own process (the default: no shared GIL)
metrics.py         Prometheus metrics under vLLM's names
app.py             the FastAPI routes: /v1/completions, /v1/chat/completions, /v1/models, /generate, ...
cli.py             `labkit serve`
launch.py          start/stop a server subprocess from a notebook, test or benchmark
loadgen.py         N concurrent streaming clients: TTFT, TPOT, e2e percentiles, throughput
"""
