"""The messages between the HTTP process and the engine (engine_process.py's pipes; engine_thread.py's
queue uses the commands too). Plain dataclasses: pickled on the pipe, read by name on both sides.

    HTTP process                                   engine process
      Add / Abort / Stop        --- command pipe --->
      LoadLoRA / UnloadLoRA         (adapters, checked by the HTTP process before it sends them)
                                <--- Ready (once), then one Step per engine step (or per
                                     batch of commands), or Crashed with the server-side detail
"""

from dataclasses import dataclass

from labkit.engine import EngineStats, SamplingParams, StepOutput

from .engine_client import EngineLimits


# ---- commands: HTTP process -> engine ------------------------------------------------------------
@dataclass
class Add:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    lora: str | None = None  # the adapter it runs with (None: the base model)


@dataclass
class Abort:
    request_id: str
    reason: str = "abort"  # the finish reason the metrics record: "abort" or "stop"


@dataclass
class LoadLoRA:
    name: str
    path: str


@dataclass
class UnloadLoRA:
    name: str


@dataclass
class Stop:
    pass


# ---- events: engine -> HTTP process --------------------------------------------------------------
@dataclass
class Ready:
    limits: EngineLimits
    stats: EngineStats


@dataclass
class Rejected:
    request_id: str
    message: str  # add_request's ValueError (too long for the KV cache...): the client's 400


@dataclass
class Step:
    outputs: list[StepOutput]
    rejected: list[Rejected]
    stats: EngineStats
    wall: float | None = None  # seconds in engine.step(); None: no step ran (commands only)
    cpu: float = 0.0  # of which the engine's thread was on a CPU


@dataclass
class Crashed:
    detail: str  # the traceback: for the server log, never for clients
