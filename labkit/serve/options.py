"""Options declared once: a dataclass field that is also a command-line flag.

    port: int = option(8000, "the port to listen on", low=1)

One line carries the option's default, its help text, its bounds and its argparse extras (choices,
metavar). From there `add_flags` makes the argparse flags, `from_namespace` turns the parsed flags back
into the dataclass, and `check` validates an instance (however it was built) against the bounds. So the
parser, the defaults and the checks cannot drift apart, and a new option is one new field.

A field whose type is itself a dataclass (ServeConfig.engine, EngineArgs.config) becomes a flag group of
its own. That is how EngineConfig's knobs reach the command line without being repeated here: each of its
int, float, str or bool fields becomes a flag (max_num_seqs -> --max-num-seqs, a bool -> --x / --no-x),
with its default and its checks left in labkit/engine/config.py.
"""

import argparse
import typing
from dataclasses import MISSING, Field, field, fields, is_dataclass
from typing import Any

from labkit.engine.config import require_int

SCALARS = (int, float, str, bool)


def option(default, help: str, secret: bool = False, **meta) -> Any:
    """A dataclass field with a flag. meta: low (inclusive bound), above (exclusive bound), choices,
    metavar, nargs, and load (a function from the flag's text, or list of texts with nargs, to the
    field's value, e.g. reading a file).
    A secret (an API key) stays out of the config's repr, so printing a config never leaks it."""
    return field(default=default, repr=not secret, metadata={"help": help, **meta})


def flag_type(f: Field) -> type | None:
    """The type argparse parses a field's flag as (int for `int | None`, str for a union that admits
    text, such as kv_cache_dtype's `str | torch.dtype`); None: the field has no flag."""
    if "load" in f.metadata:
        return str
    kinds = [t for t in typing.get_args(f.type) if t is not type(None)] or [f.type]
    if len(kinds) == 1 and kinds[0] in SCALARS:
        return kinds[0]
    return str if str in kinds else None


def add_flags(parser: argparse.ArgumentParser, cls, group=None) -> None:
    """One flag per field of `cls`, a nested dataclass as a group of its own (titled by the field's
    help). Every flag defaults to None, meaning "not given": the dataclass keeps its default."""
    target = group or parser
    for f in fields(cls):
        if isinstance(f.type, type) and is_dataclass(f.type):
            title = f"{f.type.__name__}: {f.metadata.get('help', f.name)}"
            add_flags(parser, f.type, parser.add_argument_group(title))
            continue
        kind = flag_type(f)
        if kind is None:
            continue
        help = f.metadata.get("help", f"{cls.__name__}.{f.name}")
        if f.default is not MISSING and f.default is not None and f.default is not False:
            help += f" (default: {f.default})"
        extras = {k: f.metadata[k] for k in ("choices", "metavar", "nargs") if k in f.metadata}
        name = "--" + f.name.replace("_", "-")
        if kind is bool:
            target.add_argument(name, action=argparse.BooleanOptionalAction, help=help)
        else:
            target.add_argument(name, type=kind, help=help, **extras)


def from_namespace(cls, values: dict):
    """The dataclass `cls` from parsed flags: the flags given, over the fields' own defaults."""
    given = {}
    for f in fields(cls):
        if isinstance(f.type, type) and is_dataclass(f.type):
            given[f.name] = from_namespace(f.type, values)
        elif values.get(f.name) is not None:
            load = f.metadata.get("load")
            given[f.name] = load(values[f.name]) if load else values[f.name]
    return cls(**given)


def check(config) -> None:
    """Each field against the choices and bounds its option() declared; the ValueError names the field."""
    for f in fields(config):
        value, meta = getattr(config, f.name), f.metadata
        if value is None and type(None) in typing.get_args(f.type):
            continue
        if "choices" in meta and value not in meta["choices"]:
            raise ValueError(f"{f.name} must be one of {meta['choices']}, got {value!r}")
        if "low" in meta and flag_type(f) is int:
            require_int(f.name, value, low=meta["low"])
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if "low" in meta and not (number and value >= meta["low"]):
            raise ValueError(f"{f.name} must be a number >= {meta['low']}, got {value!r}")
        if "above" in meta and not (number and value > meta["above"]):
            raise ValueError(f"{f.name} must be a number > {meta['above']}, got {value!r}")
