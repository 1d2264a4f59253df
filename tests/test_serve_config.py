"""ServeConfig (serve/config.py, serve/options.py): one frozen, validated object built from the flags, and
the two request-schema fixes of issue 26 (integral floats are integers; the OpenAPI document declares
int64's exact bounds)."""

import dataclasses
import json
from types import SimpleNamespace

import pytest

from labkit.engine import EngineConfig
from labkit.serve.app import create_app
from labkit.serve.config import ServeConfig, build_parser
from labkit.serve.protocol import ChatCompletionRequest, CompletionRequest, GenerateRequest


def test_flags_become_one_frozen_config_over_the_declared_defaults():
    config = ServeConfig.from_argv(
        ["--max-num-seqs", "8", "--no-enable-prefix-caching", "--requests-per-minute", "60"]
    )
    assert config.engine.config == EngineConfig(max_num_seqs=8, enable_prefix_caching=False)
    assert config.gateway.requests_per_minute == 60
    assert config.port == ServeConfig().port == 8000 and config.model_name == "course"
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.port = 1  # type: ignore[misc]


def test_every_scalar_engine_config_field_is_a_flag():
    """A field added to EngineConfig reaches `labkit serve` without an edit in serve/."""
    flags = {a.dest for a in build_parser()._actions}
    assert {f.name for f in dataclasses.fields(EngineConfig)} <= flags


def test_the_kv_cache_dtype_flag_takes_vllms_names_and_refuses_others_naming_the_choices():
    """kv_cache_dtype is `str | torch.dtype`: its flag takes the text ("int8", as vLLM's --kv-cache-dtype)."""
    config = ServeConfig.from_argv(["--kv-cache-dtype", "int8"])
    assert config.engine.config.kv_cache_dtype == "int8"
    with pytest.raises(SystemExit) as err:
        ServeConfig.from_argv(["--kv-cache-dtype", "int4"])
    assert "--kv-cache-dtype" in str(err.value) and "fp8_e4m3" in str(err.value)


def test_bad_values_exit_naming_the_flag_and_hand_built_configs_are_checked_too():
    for argv, flag in (
        (["--max-num-seqs", "0"], "--max-num-seqs"),  # EngineConfig's own check, not repeated
        (["--port", "0"], "--port"),
        (["--restart-window", "0"], "--restart-window"),
        (["--engine-mode", "fork"], None),  # argparse's choices
    ):
        with pytest.raises(SystemExit) as err:
            ServeConfig.from_argv(argv)
        assert flag is None or flag in str(err.value)
    with pytest.raises(ValueError, match="max_waiting"):
        ServeConfig(max_waiting=0)


def test_the_api_key_stays_out_of_the_repr():
    assert "sk-secret" not in repr(ServeConfig.from_argv(["--api-key", "sk-secret"]))


@pytest.mark.parametrize("model", [CompletionRequest, ChatCompletionRequest])
def test_an_integral_float_is_an_integer_as_json_schema_says(model):
    body = (
        {"prompt": "hi"}
        if model is CompletionRequest
        else {"messages": [{"role": "user", "content": "hi"}]}
    )
    req = model.model_validate({**body, "n": 1.0, "seed": 7.0, "max_tokens": 4.0})
    assert (req.n, req.seed, req.max_tokens) == (1, 7, 4)
    assert all(type(v) is int for v in (req.n, req.seed, req.max_tokens))
    for bad in (1.5, True, float("inf")):
        with pytest.raises(ValueError):
            model.model_validate({**body, "n": bad})
    assert (
        GenerateRequest.model_validate({"prompt": "hi", "max_new_tokens": 3.0}).max_new_tokens == 3
    )


def test_openapi_declares_the_seed_bounds_the_server_enforces():
    from labkit.serve.engine_client import EngineLimits

    limits = EngineLimits(max_context=64, vocab_size=100, max_num_seqs=8, num_blocks=10)
    app = create_app(ServeConfig(), SimpleNamespace(limits=limits), None)
    schemas = json.loads(json.dumps(app.openapi()))["components"]["schemas"]
    for name in ("CompletionRequest", "ChatCompletionRequest", "GenerateRequest"):
        (seed, _) = schemas[name]["properties"]["seed"]["anyOf"]
        assert (seed["minimum"], seed["maximum"]) == (-(2**63), 2**63 - 1)
    CompletionRequest.model_validate({"prompt": "hi", "seed": 2**63 - 1})
    with pytest.raises(ValueError):
        CompletionRequest.model_validate({"prompt": "hi", "seed": 2**63})
