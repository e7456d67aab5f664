"""Settings from the environment, and the checks that stop start-up."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmwatch.app import create_app
from llmwatch.config import Settings, load_settings
from llmwatch.errors import ConfigError
from llmwatch.metrics import DEFAULT_LATENCY_BUCKETS


def test_load_settings_defaults() -> None:
    settings = load_settings({})

    assert settings.host == "127.0.0.1"
    assert settings.port == 8000
    assert settings.model == "gpt-4o-mini"
    assert settings.timeout == 30
    assert settings.max_retries == 2
    assert settings.api_key is None
    assert settings.simulated is True
    assert settings.base_url is None
    assert settings.prices_file is None
    assert settings.extra_models == ()
    assert settings.latency_buckets == DEFAULT_LATENCY_BUCKETS
    assert settings.max_body_bytes == 10 * 1024 * 1024
    assert settings.log_level == "INFO"
    assert settings.log_format == "text"
    assert settings == Settings()


def test_load_settings_values() -> None:
    settings = load_settings(
        {
            "APP_HOST": "0.0.0.0",
            "APP_PORT": "9000",
            "OPENAI_API_KEY": "sk-config-test",
            "OPENAI_BASE_URL": "http://127.0.0.1:8001/v1",
            "OPENAI_MODEL": "gpt-4o",
            "OPENAI_TIMEOUT": "2.5",
            "OPENAI_MAX_RETRIES": "0",
            "LLMWATCH_PRICES_FILE": "/etc/llmwatch/prices.yaml",
            "LLMWATCH_EXTRA_MODELS": "ft:gpt-4o-mini:acme, my-model",
            "LLMWATCH_LATENCY_BUCKETS": "0.1,1,10",
            "LLMWATCH_MAX_BODY_BYTES": "4096",
            "LLMWATCH_LOG_LEVEL": "debug",
            "LLMWATCH_LOG_FORMAT": "JSON",
            "LLMWATCH_SHUTDOWN_TIMEOUT": "5",
            "LLMWATCH_SIM_TTFT": "0",
            "LLMWATCH_SIM_TOKEN_DELAY": "0.5",
        }
    )

    assert settings.host == "0.0.0.0"
    assert settings.port == 9000
    assert settings.api_key == "sk-config-test"
    assert settings.simulated is False
    assert settings.base_url == "http://127.0.0.1:8001/v1"
    assert settings.model == "gpt-4o"
    assert settings.timeout == 2.5
    assert settings.max_retries == 0
    assert settings.prices_file == Path("/etc/llmwatch/prices.yaml")
    assert settings.extra_models == ("ft:gpt-4o-mini:acme", "my-model")
    assert settings.latency_buckets == (0.1, 1.0, 10.0)
    assert settings.max_body_bytes == 4096
    assert settings.log_level == "DEBUG"
    assert settings.log_format == "json"
    assert settings.shutdown_timeout == 5
    assert settings.sim_ttft == 0
    assert settings.sim_token_delay == 0.5


def test_load_settings_blank_is_default() -> None:
    settings = load_settings({"APP_PORT": "  ", "OPENAI_API_KEY": " "})

    assert settings.port == 8000
    assert settings.api_key is None


def test_settings_repr_hides_api_key() -> None:
    settings = load_settings({"OPENAI_API_KEY": "sk-config-test"})

    assert "sk-config-test" not in repr(settings)
    assert "sk-config-test" not in str(settings)


@pytest.mark.parametrize(
    ("name", "value", "accepted"),
    [
        ("APP_PORT", "abc", "TCP port from 1 to 65535"),
        ("APP_PORT", "0", "TCP port from 1 to 65535"),
        ("APP_PORT", "65536", "TCP port from 1 to 65535"),
        ("OPENAI_BASE_URL", "api.openai.com/v1", "http:// or https:// URL"),
        ("OPENAI_TIMEOUT", "soon", "positive number of seconds"),
        ("OPENAI_TIMEOUT", "0", "positive number of seconds"),
        ("OPENAI_TIMEOUT", "inf", "positive number of seconds"),
        ("OPENAI_TIMEOUT", "nan", "positive number of seconds"),
        ("OPENAI_MAX_RETRIES", "many", "whole number of retries from 0 to 10"),
        ("OPENAI_MAX_RETRIES", "-1", "whole number of retries from 0 to 10"),
        ("OPENAI_MAX_RETRIES", "11", "whole number of retries from 0 to 10"),
        ("OPENAI_MAX_RETRIES", "1.5", "whole number of retries from 0 to 10"),
        ("LLMWATCH_EXTRA_MODELS", ",", "comma-separated list of model names"),
        ("LLMWATCH_LATENCY_BUCKETS", "1,0.5", "ascending order"),
        ("LLMWATCH_LATENCY_BUCKETS", "0.1,0.1", "ascending order"),
        ("LLMWATCH_LATENCY_BUCKETS", "0,1", "positive numbers of seconds"),
        ("LLMWATCH_LATENCY_BUCKETS", "0.1,fast", "positive numbers of seconds"),
        ("LLMWATCH_LATENCY_BUCKETS", "0.1,inf", "positive numbers of seconds"),
        ("LLMWATCH_MAX_BODY_BYTES", "0", "positive whole number"),
        ("LLMWATCH_MAX_BODY_BYTES", "1MB", "positive whole number"),
        ("LLMWATCH_LOG_LEVEL", "loud", "one of DEBUG, INFO, WARNING, ERROR"),
        ("LLMWATCH_LOG_FORMAT", "xml", "one of text, json"),
        ("LLMWATCH_SHUTDOWN_TIMEOUT", "-5", "positive number of seconds"),
        ("LLMWATCH_SIM_TTFT", "-0.1", "number of seconds, 0 or more"),
        ("LLMWATCH_SIM_TOKEN_DELAY", "slow", "number of seconds, 0 or more"),
    ],
)
def test_load_settings_invalid(name: str, value: str, accepted: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({name: value})

    message = str(caught.value)
    assert name in message
    assert repr(value) in message
    assert accepted in message


def test_with_overrides_unknown_setting() -> None:
    with pytest.raises(ConfigError) as caught:
        Settings().with_overrides(colour="blue")

    assert "colour" in str(caught.value)


def test_with_overrides_skips_none() -> None:
    settings = Settings().with_overrides(port=9100, model=None)

    assert settings.port == 9100
    assert settings.model == "gpt-4o-mini"


def test_create_app_unknown_model() -> None:
    settings = load_settings({"OPENAI_MODEL": "gpt-3.5-turbo"})

    with pytest.raises(ConfigError) as caught:
        create_app(settings)

    message = str(caught.value)
    assert "OPENAI_MODEL='gpt-3.5-turbo'" in message
    assert "gpt-4o-mini" in message
    assert "LLMWATCH_EXTRA_MODELS" in message


def test_create_app_extra_default_model(tmp_path: Path) -> None:
    prices = tmp_path / "prices.yaml"
    prices.write_text("models:\n  gpt-4o:\n    input: 1\n    output: 2\n")
    settings = load_settings(
        {
            "OPENAI_MODEL": "gpt-4o-mini",
            "LLMWATCH_PRICES_FILE": str(prices),
            "LLMWATCH_EXTRA_MODELS": "gpt-4o-mini",
        }
    )

    app = create_app(settings)

    assert app is not None


def test_create_app_bad_price_table(tmp_path: Path) -> None:
    prices = tmp_path / "prices.yaml"
    prices.write_text("models:\n  gpt-4o-mini:\n    input: free\n    output: 2\n")
    settings = load_settings({"LLMWATCH_PRICES_FILE": str(prices)})

    with pytest.raises(ConfigError) as caught:
        create_app(settings)

    message = str(caught.value)
    assert str(prices) in message
    assert "gpt-4o-mini.input='free'" in message


def test_create_app_missing_price_table(tmp_path: Path) -> None:
    prices = tmp_path / "absent.yaml"
    settings = load_settings({"LLMWATCH_PRICES_FILE": str(prices)})

    with pytest.raises(ConfigError) as caught:
        create_app(settings)

    assert str(prices) in str(caught.value)
    assert "LLMWATCH_PRICES_FILE" in str(caught.value)
