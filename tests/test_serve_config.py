"""ServeConfig (serve/config.py, serve/options.py): one frozen, validated object built from the flags."""

import dataclasses

import pytest

from labkit.engine import EngineConfig
from labkit.serve.config import ServeConfig, build_parser


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
    scalar = {f.name for f in dataclasses.fields(EngineConfig) if f.name != "kv_cache_dtype"}
    assert scalar <= flags


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
