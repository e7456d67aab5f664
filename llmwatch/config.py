"""Settings from the environment, a .env file and command-line flags."""

from __future__ import annotations

import itertools
import logging
import math
import os
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar

from llmwatch.errors import ConfigError
from llmwatch.metrics import DEFAULT_LATENCY_BUCKETS

T = TypeVar("T")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("text", "json")
# Long-context models take about 1M tokens, some 4 MB of text; JSON escaping
# of non-ASCII text can double that.
DEFAULT_MAX_BODY_BYTES = 10 * 1024 * 1024


@dataclass(frozen=True)
class Settings:
    """Every setting of the service, batch runner and library, checked."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = field(default=None, repr=False)
    base_url: str | None = None
    model: str = "gpt-4o-mini"
    timeout: float = 30.0
    max_retries: int = 2
    prices_file: Path | None = None
    extra_models: tuple[str, ...] = ()
    latency_buckets: tuple[float, ...] = DEFAULT_LATENCY_BUCKETS
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    log_level: str = "INFO"
    log_format: str = "text"
    shutdown_timeout: float = 30.0
    sim_ttft: float = 0.2
    sim_token_delay: float = 0.01

    @property
    def simulated(self) -> bool:
        """True without an API key and a base URL: the built-in simulator answers."""
        return not self.api_key and not self.base_url

    def with_overrides(self, **overrides: Any) -> Settings:
        """Return a copy with the given values, skipping those that are None."""
        known = {f.name for f in fields(self)}
        unknown = set(overrides) - known
        if unknown:
            raise ConfigError(f"unknown settings: {', '.join(sorted(unknown))}")
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


def load_settings(
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, tuple[str, str]] | None = None,
) -> Settings:
    """Read the settings from ``environ`` (``os.environ`` by default).

    ``flags`` maps a variable name to a command-line flag and its raw value,
    which replaces the variable's value and is checked by the same rules.
    Raises ConfigError naming the variable or flag, the value and what it
    accepts.
    """
    env = os.environ if environ is None else environ
    given = flags or {}
    defaults = Settings()

    def get(name: str, parse: Callable[[str, str], T], default: T) -> T:
        source, raw = given.get(name, (name, env.get(name, "")))
        raw = raw.strip()
        if not raw:
            return default
        return parse(source, raw)

    return Settings(
        host=get("APP_HOST", _text, defaults.host),
        port=get("APP_PORT", _port, defaults.port),
        api_key=env.get("OPENAI_API_KEY", "").strip() or None,
        base_url=get("OPENAI_BASE_URL", _url, None),
        model=get("OPENAI_MODEL", _text, defaults.model),
        timeout=get("OPENAI_TIMEOUT", _positive_float, defaults.timeout),
        max_retries=get("OPENAI_MAX_RETRIES", _retries, defaults.max_retries),
        prices_file=get("LLMWATCH_PRICES_FILE", _path, None),
        extra_models=get("LLMWATCH_EXTRA_MODELS", _model_list, ()),
        latency_buckets=get(
            "LLMWATCH_LATENCY_BUCKETS", parse_buckets, defaults.latency_buckets
        ),
        max_body_bytes=get(
            "LLMWATCH_MAX_BODY_BYTES", _positive_int, defaults.max_body_bytes
        ),
        log_level=get("LLMWATCH_LOG_LEVEL", _log_level, defaults.log_level),
        log_format=get("LLMWATCH_LOG_FORMAT", _log_format, defaults.log_format),
        shutdown_timeout=get(
            "LLMWATCH_SHUTDOWN_TIMEOUT", _positive_float, defaults.shutdown_timeout
        ),
        sim_ttft=get("LLMWATCH_SIM_TTFT", _non_negative_float, defaults.sim_ttft),
        sim_token_delay=get(
            "LLMWATCH_SIM_TOKEN_DELAY", _non_negative_float, defaults.sim_token_delay
        ),
    )


def _invalid(name: str, raw: str, accepted: str) -> ConfigError:
    separator = " " if name.startswith("-") else "="
    return ConfigError(f"invalid {name}{separator}{raw!r}: expected {accepted}")


def _text(name: str, raw: str) -> str:
    return raw


def _path(name: str, raw: str) -> Path:
    return Path(raw).expanduser()


def _url(name: str, raw: str) -> str:
    accepted = (
        "an http:// or https:// URL with a host, such as http://127.0.0.1:8001/v1"
    )
    try:
        parts = urllib.parse.urlsplit(raw)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        raise _invalid(name, raw, accepted) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _invalid(name, raw, accepted)
    return raw


def parse_port(name: str, raw: str) -> int:
    """Parse a TCP port from 1 to 65535, as ASCII digits."""
    return _port(name, raw)


def _port(name: str, raw: str) -> int:
    if not (raw.isascii() and raw.isdigit()):
        raise _invalid(name, raw, "a TCP port from 1 to 65535")
    port = int(raw)
    if not 1 <= port <= 65535:
        raise _invalid(name, raw, "a TCP port from 1 to 65535")
    return port


def _positive_int(name: str, raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise _invalid(name, raw, "a positive whole number") from None
    if value <= 0:
        raise _invalid(name, raw, "a positive whole number")
    return value


def _retries(name: str, raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise _invalid(name, raw, "a whole number of retries from 0 to 10") from None
    if not 0 <= value <= 10:
        raise _invalid(name, raw, "a whole number of retries from 0 to 10")
    return value


def _float(name: str, raw: str, accepted: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise _invalid(name, raw, accepted) from None
    if not math.isfinite(value):
        raise _invalid(name, raw, accepted)
    return value


def _positive_float(name: str, raw: str) -> float:
    accepted = "a positive number of seconds"
    value = _float(name, raw, accepted)
    if value <= 0:
        raise _invalid(name, raw, accepted)
    return value


def _non_negative_float(name: str, raw: str) -> float:
    accepted = "a number of seconds, 0 or more"
    value = _float(name, raw, accepted)
    if value < 0:
        raise _invalid(name, raw, accepted)
    return value


def _model_list(name: str, raw: str) -> tuple[str, ...]:
    models = tuple(part.strip() for part in raw.split(",") if part.strip())
    if not models:
        raise _invalid(name, raw, "a comma-separated list of model names")
    return models


def parse_buckets(name: str, raw: str) -> tuple[float, ...]:
    """Parse comma-separated histogram bucket bounds, in seconds, ascending."""
    accepted = "comma-separated positive numbers of seconds in ascending order"
    try:
        buckets = tuple(float(part) for part in raw.split(","))
    except ValueError:
        raise _invalid(name, raw, accepted) from None
    if not buckets or any(not math.isfinite(b) or b <= 0 for b in buckets):
        raise _invalid(name, raw, accepted)
    if any(a >= b for a, b in itertools.pairwise(buckets)):
        raise _invalid(name, raw, accepted)
    return buckets


def _log_level(name: str, raw: str) -> str:
    return _choice(name, raw, raw.upper(), LOG_LEVELS)


def _log_format(name: str, raw: str) -> str:
    return _choice(name, raw, raw.lower(), LOG_FORMATS)


def _choice(name: str, raw: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise _invalid(name, raw, f"one of {', '.join(choices)}")
    return value


def log_level_number(settings: Settings) -> int:
    """Return the ``logging`` level number of the configured log level."""
    level: int = logging.getLevelName(settings.log_level)
    return level
