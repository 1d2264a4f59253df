"""ServeConfig: everything `labkit serve` starts from, in one frozen, validated object.

    config = ServeConfig.from_argv(["--max-num-seqs", "8", "--requests-per-minute", "60"])
    app = create_app(config, engine, tokenizer)

Three parts, each a frozen dataclass whose fields are the command-line flags (options.py):
  - `engine` (EngineArgs, engine_args.py): what the engine is built from, with its EngineConfig;
  - `gateway` (GatewayConfig, below): who may call and how much, what is logged, what is cached;
  - the server itself: address, admission queue, drain, which backend and engine mode.
`build_parser` is generated from the fields, so each option is declared once (default, help, bounds),
and the object checks itself however it was built: from flags, or by hand in a notebook or a test.
"""

import argparse
import os
import re
from dataclasses import dataclass, field, fields

from labkit.engine import EngineConfig

from .engine_args import EngineArgs
from .options import add_flags, check, from_namespace, option
from .ratelimit import APIKey, load_api_keys


@dataclass(frozen=True)
class GatewayConfig:
    """In front of the engine: who may call and how much, what is logged, what is cached."""

    api_key: str | None = field(
        default_factory=lambda: os.environ.get("LABKIT_API_KEY"),
        repr=False,
        metadata={
            "help": "require `Authorization: Bearer KEY` (default: env LABKIT_API_KEY; none = open)"
        },
    )
    api_keys: dict[str, APIKey] | None = option(
        None,
        'JSON {"keys": [{"key": "sk-...", "id": "team-a", "requests_per_minute": 60, '
        '"tokens_per_minute": 20000}, ...]}: only these keys (and --api-key) are accepted',
        secret=True,
        metavar="FILE",
        load=load_api_keys,
    )
    requests_per_minute: int | None = option(
        None,
        "default limit per key (keys without their own; the single --api-key; an open server)",
        low=1,
    )
    tokens_per_minute: int | None = option(
        None,
        "default limit per key, counting prompt + max_tokens, refunded down to what was used",
        low=1,
    )
    access_log: str | None = option(
        None, "one JSON line per request to PATH (- = stdout); default: none", metavar="PATH"
    )
    access_log_text: bool = option(
        False, "also log prompts and completions (they are the clients' data: off by default)"
    )
    response_cache: int = option(
        0,
        "cache up to N answers of identical temperature-0, non-streaming requests (0 = off)",
        metavar="N",
        low=0,
    )
    response_cache_bytes: int = option(64 << 20, "the response cache's bound in JSON bytes", low=1)

    def __post_init__(self):
        check(self)

    @property
    def enabled(self) -> bool:
        """Whether any of labkit's own gateway features is on (vLLM's server has none of them)."""
        limits = (self.api_keys, self.requests_per_minute, self.tokens_per_minute, self.access_log)
        return any(limits) or self.response_cache > 0


@dataclass(frozen=True)
class ServeConfig:
    """Everything `labkit serve` starts from: the engine, the gateway, the server's own options."""

    engine: EngineArgs = field(
        default_factory=EngineArgs, metadata={"help": "the model and how to load it"}
    )
    gateway: GatewayConfig = field(
        default_factory=GatewayConfig,
        metadata={"help": "limits, access log, response cache (ratelimit.py, accesslog.py, ...)"},
    )
    served_model_name: str | None = option(
        None, "the name clients send as `model` (default: --model, else course)"
    )
    host: str = option("127.0.0.1", "the address to listen on (0.0.0.0 inside a container)")
    port: int = option(8000, "the port to listen on", low=1)
    max_waiting: int = option(256, "queued requests beyond the running batch before 429", low=1)
    max_model_len: int | None = option(
        None, "most prompt + completion tokens per request (default: the model's context)", low=1
    )
    drain_timeout: float = option(30.0, "seconds to finish in-flight requests on SIGTERM", low=0)
    backend: str = option(
        "labkit",
        "vllm: hand over to vLLM's own OpenAI server (engine flags it shares: --model, --dtype, "
        "--max-num-seqs, --max-num-batched-tokens, --block-size when not labkit's; vLLM's CPU "
        "attention needs a block size that is a multiple of 32)",
        choices=("labkit", "vllm"),
    )
    engine_mode: str = option(
        "process",
        "process: the engine runs in its own process, apart from the HTTP event loop (no shared "
        "GIL; engine_process.py); thread: a background thread of the HTTP process",
        choices=("process", "thread"),
    )
    max_engine_restarts: int = option(
        3,
        "--engine-mode process: restarts of a dead engine process allowed within --restart-window "
        "seconds; one more death and the server stays unready",
        low=0,
    )
    restart_window: float = option(300.0, "seconds (see --max-engine-restarts)", above=0)
    log_level: str = option("warning", "uvicorn's log level")

    def __post_init__(self):
        check(self)
        if self.backend == "vllm" and self.gateway.enabled:
            raise ValueError(
                "--backend vllm: the gateway flags (--api-keys, limits, --access-log, "
                "--response-cache) are labkit's own; vLLM's server takes only --api-key"
            )

    @property
    def model_name(self) -> str:
        """What clients send as `model`."""
        return self.served_model_name or self.engine.model or "course"

    @classmethod
    def from_argv(cls, argv: list[str] | None = None) -> "ServeConfig":
        """Parse `labkit serve`'s flags; a bad value exits with a message that names its flag."""
        values = vars(build_parser().parse_args(argv))
        try:
            return from_namespace(cls, values)
        except ValueError as err:
            raise SystemExit(f"labkit serve: {as_flags(str(err))}") from None


def build_parser() -> argparse.ArgumentParser:
    """`labkit serve`'s flags, one per field of ServeConfig and of the dataclasses it holds."""
    ap = argparse.ArgumentParser(
        prog="labkit serve", description="OpenAI-compatible server for labkit's engine"
    )
    add_flags(ap, ServeConfig)
    return ap


def as_flags(message: str) -> str:
    """'max_num_seqs must be ...' -> '--max-num-seqs must be ...': errors in the user's own words."""
    classes = (ServeConfig, GatewayConfig, EngineArgs, EngineConfig)
    names = {f.name for cls in classes for f in fields(cls)}
    return re.sub(
        r"^\w+", lambda m: "--" + m[0].replace("_", "-") if m[0] in names else m[0], message
    )
