from __future__ import annotations

import pytest

from opea_grpc.config import ClientConfig, ConfigError, ServerConfig, load, parse_bool


@pytest.mark.parametrize(
    ("text", "value"),
    [("true", True), ("TRUE", True), ("1", True), ("on", True), ("false", False), ("0", False)],
)
def test_booleans_parse_strictly(text: str, value: bool) -> None:
    assert parse_bool(text) is value


@pytest.mark.parametrize("text", ["", "tru", "2", "enabled", "none"])
def test_anything_else_is_not_a_boolean(text: str) -> None:
    with pytest.raises(ConfigError, match="expected true or false"):
        parse_bool(text, name="OPEA_X")


def test_env_then_overrides() -> None:
    env = {"OPEA_HOST": "0.0.0.0", "OPEA_PORT": "7000", "OPEA_GRACE": "2.5"}
    cfg = load(ServerConfig, env, overrides={"port": 7001, "host": None})
    assert (cfg.host, cfg.port, cfg.grace) == ("0.0.0.0", 7001, 2.5)


def test_explicit_zero_stays_zero() -> None:
    cfg = load(ServerConfig, {"OPEA_GRACE": "0", "OPEA_DRAIN_DELAY": "0"}, overrides={"port": 0})
    assert cfg.grace == 0.0
    assert cfg.drain_delay == 0.0
    assert cfg.port == 0


def test_errors_name_the_variable() -> None:
    with pytest.raises(ConfigError, match="OPEA_PORT: expected a number"):
        load(ServerConfig, {"OPEA_PORT": "http"})
    with pytest.raises(ConfigError, match="OPEA_PORT"):
        load(ServerConfig, {"OPEA_PORT": "70000"})
    with pytest.raises(ConfigError, match="OPEA_CLIENT_HEALTH_CHECK"):
        load(ClientConfig, {"OPEA_CLIENT_HEALTH_CHECK": "maybe"}, prefix="OPEA_CLIENT_")
    with pytest.raises(ConfigError, match="MAX_ATTEMPTS"):
        ClientConfig(max_attempts=9)


def test_settings_are_frozen() -> None:
    cfg = ServerConfig()
    with pytest.raises(AttributeError):
        cfg.port = 1  # type: ignore[misc]


def test_ipv6_address() -> None:
    assert ServerConfig(host="::1", port=5).address == "[::1]:5"


def test_later_prefix_wins_and_defaults_come_first() -> None:
    env = {"OPEA_PORT": "7000", "OPEA_EMBEDDING_PORT": "7001", "OPEA_GRACE": "3"}
    cfg = load(ServerConfig, env, prefix=("OPEA_", "OPEA_EMBEDDING_"), defaults={"port": 50051})
    assert (cfg.port, cfg.grace) == (7001, 3.0)
    assert load(ServerConfig, {}, defaults={"port": 50051}).port == 50051
