"""Prometheus metrics for LLM calls, each set in a registry of its own."""

from __future__ import annotations

import platform
from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from llmwatch import __version__

# LLM calls range from a fast cached answer to a long reasoning run, so the
# buckets reach from 50 ms to past the default 30 s timeout and up to 10 min.
DEFAULT_LATENCY_BUCKETS: tuple[float, ...] = (
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    30.0,
    45.0,
    60.0,
    120.0,
    300.0,
    600.0,
)
TTFT_BUCKETS: tuple[float, ...] = (
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.0,
    5.0,
    10.0,
    30.0,
    60.0,
)

# The fixed set of values for the `type` label of llm_errors_total.
ERROR_TYPES: tuple[str, ...] = (
    "invalid_request",
    "rate_limited",
    "upstream_error",
    "connection_error",
    "timeout",
    "client_disconnected",
    "internal_error",
)
# The `model` label for requests rejected before a served model is known.
UNKNOWN_MODEL = "unknown"
RATELIMIT_RESOURCES: tuple[str, ...] = ("requests", "tokens")


class Metrics:
    """The metric families of one llmwatch app or batch run.

    Every instance owns a fresh ``CollectorRegistry``, so two apps (or an app
    and a batch run) in one process never share or collide on a series.
    """

    def __init__(
        self,
        latency_buckets: Sequence[float] = DEFAULT_LATENCY_BUCKETS,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        reg = self.registry
        self.requests = Counter(
            "llm_requests",
            "LLM requests handled, successful or not.",
            ["model"],
            registry=reg,
        )
        self.errors = Counter(
            "llm_errors",
            "Failed LLM requests, by error type; each request counts once.",
            ["model", "type"],
            registry=reg,
        )
        self.tokens = Counter(
            "llm_tokens",
            "Tokens billed, by type: prompt (cached included) or completion "
            "(reasoning included).",
            ["model", "type"],
            registry=reg,
        )
        self.cached_tokens = Counter(
            "llm_cached_prompt_tokens",
            "Prompt tokens served from the upstream's prompt cache; a subset of "
            'llm_tokens_total{type="prompt"}.',
            ["model"],
            registry=reg,
        )
        self.reasoning_tokens = Counter(
            "llm_reasoning_tokens",
            'Reasoning tokens; a subset of llm_tokens_total{type="completion"}.',
            ["model"],
            registry=reg,
        )
        self.latency = Histogram(
            "llm_request_latency_seconds",
            "Time from sending a request upstream to its last byte, in seconds.",
            ["model"],
            buckets=tuple(latency_buckets),
            registry=reg,
        )
        self.ttft = Histogram(
            "llm_time_to_first_token_seconds",
            "Time from sending a streamed request to its first content token.",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=reg,
        )
        self.cost = Counter(
            "llm_cost_usd",
            "Cost of the tokens used, in US dollars, from the price table.",
            ["model"],
            registry=reg,
        )
        self.in_flight = Gauge(
            "llm_requests_in_flight",
            "LLM requests waiting on the upstream now.",
            registry=reg,
        )
        self.usage_missing = Counter(
            "llm_usage_missing",
            "Answers whose upstream sent no token usage; recorded as zero tokens.",
            ["model"],
            registry=reg,
        )
        self.unpriced = Counter(
            "llm_unpriced_requests",
            "Answers for a model with no price in the table; their cost is unknown.",
            ["model"],
            registry=reg,
        )
        self.retries = Counter(
            "llm_upstream_retries",
            "Upstream attempts retried by the OpenAI client after a failure.",
            ["model"],
            registry=reg,
        )
        self.ratelimit_remaining = Gauge(
            "llm_ratelimit_remaining",
            "Requests or tokens left in the upstream's rate-limit window, from its "
            "x-ratelimit-remaining-* headers.",
            ["model", "resource"],
            registry=reg,
        )
        self.ratelimit_limit = Gauge(
            "llm_ratelimit_limit",
            "Size of the upstream's rate-limit window, from its x-ratelimit-limit-* "
            "headers.",
            ["model", "resource"],
            registry=reg,
        )
        self.build = Info(
            "llmwatch_build",
            "The llmwatch version and the Python that runs it.",
            registry=reg,
        )
        self.build.info(
            {"version": __version__, "python_version": platform.python_version()}
        )

    def init_model(self, model: str, *, priced: bool = True) -> None:
        """Create a model's zero-valued series so rates work from the first scrape.

        An unpriced model gets no cost series, because its cost is unknown, not $0.
        """
        self.requests.labels(model)
        if priced:
            self.cost.labels(model)
        for token_type in ("prompt", "completion"):
            self.tokens.labels(model, token_type)
        for error_type in ERROR_TYPES:
            self.errors.labels(model, error_type)

    def record_error(self, model: str, error_type: str) -> None:
        """Count one failed request of a known error type."""
        if error_type not in ERROR_TYPES:
            raise ValueError(f"unknown error type {error_type!r}")
        self.errors.labels(model, error_type).inc()
