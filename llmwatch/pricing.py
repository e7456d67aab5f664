"""The price table and the cost of a call."""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from llmwatch.errors import ConfigError

logger = logging.getLogger(__name__)

PRICE_FIELDS = ("input", "cached_input", "output")
# An estimate with a wide margin: no current model takes or writes more than
# a few million tokens in one call. A larger count comes from a broken
# upstream, and recording it would corrupt the cost counters for good.
MAX_TOKENS_PER_CALL = 1_000_000_000
# A dated snapshot is a base name plus -YYYY-MM-DD (gpt-4o-mini-2024-07-18) or
# the older -MMDD form (gpt-4-0613).
_SNAPSHOT_SUFFIX = re.compile(
    r"-(\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])|(0[1-9]|1[0-2])(0[1-9]|[12]\d|3[01]))$"
)


@dataclass(frozen=True)
class ModelPrice:
    """US dollars per ``per_tokens`` tokens of each kind."""

    input: Decimal
    cached_input: Decimal
    output: Decimal


@dataclass(frozen=True)
class Usage:
    """Token counts of one call, as the upstream reports them.

    ``cached_tokens`` is part of ``prompt_tokens`` and ``reasoning_tokens`` is
    part of ``completion_tokens``, as in OpenAI's usage object.
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0

    def __post_init__(self) -> None:
        for name in (
            "prompt_tokens",
            "completion_tokens",
            "cached_tokens",
            "reasoning_tokens",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}={value!r} is not a token count")
            if value > MAX_TOKENS_PER_CALL:
                raise ValueError(
                    f"{name}={value} is over {MAX_TOKENS_PER_CALL:,} tokens for "
                    "one call"
                )
        if self.cached_tokens > self.prompt_tokens:
            raise ValueError(
                f"cached_tokens={self.cached_tokens} exceeds "
                f"prompt_tokens={self.prompt_tokens}"
            )
        if self.reasoning_tokens > self.completion_tokens:
            raise ValueError(
                f"reasoning_tokens={self.reasoning_tokens} exceeds "
                f"completion_tokens={self.completion_tokens}"
            )


def base_model_name(name: str) -> str:
    """Strip a snapshot's date suffix: gpt-4o-mini-2024-07-18 -> gpt-4o-mini."""
    return _SNAPSHOT_SUFFIX.sub("", name)


def default_prices_path() -> Path:
    """Return the path of the price table shipped inside the package."""
    return Path(str(resources.files("llmwatch") / "data" / "prices.yaml"))


class PriceTable:
    """Per-model token prices loaded from a YAML file."""

    def __init__(
        self,
        models: dict[str, ModelPrice],
        *,
        per_tokens: int = 1_000_000,
        source: str = "",
        checked: str = "",
    ) -> None:
        self.models = models
        self.per_tokens = per_tokens
        self.source = source
        self.checked = checked

    @classmethod
    def load(cls, path: Path | None = None) -> PriceTable:
        """Read and check a price table file; the shipped one by default."""
        path = path or default_prices_path()
        try:
            document = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(
                f"cannot read the price table {path}: {exc.strerror}; "
                "set LLMWATCH_PRICES_FILE to a readable YAML file"
            ) from exc
        except yaml.YAMLError as exc:
            # PyYAML's message spans several lines; the CLI prints one.
            reason = " ".join(str(exc).split())
            raise ConfigError(
                f"price table {path} is not valid YAML: {reason}"
            ) from exc
        return cls.from_document(document, str(path))

    @classmethod
    def from_document(cls, document: Any, origin: str = "<document>") -> PriceTable:
        """Build a table from parsed YAML, naming the first invalid entry."""
        if not isinstance(document, dict) or not isinstance(
            document.get("models"), dict
        ):
            raise ConfigError(
                f"price table {origin} has no 'models' mapping of model names to prices"
            )
        per_tokens = document.get("per_tokens", 1_000_000)
        if not isinstance(per_tokens, int) or per_tokens <= 0:
            raise ConfigError(
                f"price table {origin}: per_tokens={per_tokens!r} must be a "
                "positive integer"
            )
        models = {}
        for name, entry in document["models"].items():
            models[str(name)] = _parse_price(str(name), entry, origin)
        return cls(
            models,
            per_tokens=per_tokens,
            source=str(document.get("source", "")),
            checked=str(document.get("checked", "")),
        )

    def price_of(self, model: str) -> ModelPrice | None:
        """Return a model's price, looking snapshots up under their base name."""
        price = self.models.get(model)
        if price is None:
            price = self.models.get(base_model_name(model))
        return price

    def cost(self, model: str, usage: Usage) -> float | None:
        """Return the cost in US dollars, or None when the model has no price.

        Cached tokens are billed at the cached rate and the rest of the prompt
        at the input rate; reasoning tokens are already in completion_tokens.
        """
        price = self.price_of(model)
        if price is None:
            return None
        uncached = usage.prompt_tokens - usage.cached_tokens
        total = (
            uncached * price.input
            + usage.cached_tokens * price.cached_input
            + usage.completion_tokens * price.output
        )
        return float(total / self.per_tokens)


def _parse_price(name: str, entry: Any, origin: str) -> ModelPrice:
    if not isinstance(entry, dict):
        raise ConfigError(
            f"price table {origin}: model {name!r} needs a mapping with "
            f"{', '.join(PRICE_FIELDS)}"
        )
    values = {}
    for field in PRICE_FIELDS:
        value = entry.get(field)
        if field == "cached_input" and value is None:
            # Models without prompt caching bill every prompt token as input.
            value = entry.get("input")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(
                f"price table {origin}: {name}.{field}={value!r} must be a number "
                "of US dollars"
            )
        if not math.isfinite(value) or value < 0:
            raise ConfigError(
                f"price table {origin}: {name}.{field}={value!r} must be a finite "
                "number, 0 or more"
            )
        values[field] = Decimal(str(value))
    unknown = set(entry) - set(PRICE_FIELDS)
    if unknown:
        raise ConfigError(
            f"price table {origin}: model {name!r} has unknown fields "
            f"{sorted(unknown)}; accepted: {', '.join(PRICE_FIELDS)}"
        )
    return ModelPrice(**values)
