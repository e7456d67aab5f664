"""Send chat completions upstream and record what each one cost and took."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass
from types import TracebackType
from typing import Any

import httpx2
import openai

from llmwatch.errors import ApiError, ConfigError
from llmwatch.metrics import Metrics
from llmwatch.pricing import PriceTable, Usage, base_model_name
from llmwatch.upstream import (
    ChatRequest,
    RateLimits,
    UpstreamClient,
    UpstreamStream,
    usage_from,
)

logger = logging.getLogger(__name__)


@dataclass
class AskResult:
    """Result of one request: the answer text, its tokens, cost and timings."""

    model: str
    answer: str
    latency_s: float
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int
    reasoning_tokens: int
    cost_usd: float | None
    finish_reason: str | None = None
    upstream_model: str | None = None
    request_id: str | None = None
    upstream_attempts: int = 1
    time_to_first_token_s: float | None = None
    usage_missing: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Return the result as the JSON body of an /ask response."""
        return asdict(self)


class CallTracker:
    """Check models, call the upstream and record metrics for every outcome.

    The service, the batch runner and the library API all go through one
    tracker, so a call is counted the same way wherever it is made.
    """

    def __init__(
        self,
        upstream: UpstreamClient | None,
        metrics: Metrics,
        prices: PriceTable,
        *,
        default_model: str,
        extra_models: Sequence[str] = (),
    ) -> None:
        self.upstream = upstream
        self.metrics = metrics
        self.prices = prices
        self.allowed_models = frozenset(prices.models) | frozenset(extra_models)
        self._warned: set[tuple[str, str]] = set()
        self.default_model = self.check_default_model(default_model)
        default_label = base_model_name(self.default_model)
        metrics.init_model(
            default_label, priced=prices.price_of(default_label) is not None
        )

    def check_default_model(self, model: str) -> str:
        """Return ``model`` if it is served, else raise ConfigError."""
        if self.served_name(model) is None:
            raise ConfigError(
                f"invalid OPENAI_MODEL={model!r}: it is not in the price table; "
                f"choose one of {', '.join(sorted(self.allowed_models))} or add it "
                "to LLMWATCH_EXTRA_MODELS"
            )
        return model

    def served_name(self, model: str) -> str | None:
        """Return the metric label of a served model, or None if not served.

        A dated snapshot is served when its base name is, and is labelled
        with the base name; no other prefix matching is done.
        """
        if model in self.allowed_models:
            return base_model_name(model)
        base = base_model_name(model)
        if base != model and base in self.allowed_models:
            return base
        return None

    def resolve_model(self, requested: str | None) -> tuple[str, str]:
        """Return the name to send upstream and the label for metrics.

        Raises ApiError (400) before any upstream call when the model is not
        served, so that clients cannot grow the metrics' label sets.
        """
        name = requested or self.default_model
        label = self.served_name(name)
        if label is None:
            raise ApiError(
                400,
                "invalid_request",
                f"Model {name!r} is not served. Allowed models: "
                f"{', '.join(sorted(self.allowed_models))}. To add one, give it "
                "a price in LLMWATCH_PRICES_FILE or list it in "
                "LLMWATCH_EXTRA_MODELS.",
                field="model",
            )
        return name, label

    def _require_upstream(self) -> UpstreamClient:
        if self.upstream is None:
            raise RuntimeError("this tracker has no upstream client; use record()")
        return self.upstream

    async def ask(self, request: ChatRequest) -> AskResult:
        """Send one non-streamed completion and record its outcome."""
        upstream = self._require_upstream()
        label = self.served_name(request.model) or request.model
        started = time.perf_counter()
        self.metrics.in_flight.inc()
        try:
            reply = await upstream.complete(request)
        except ApiError as exc:
            self.record_failure(label, exc, time.perf_counter() - started)
            raise
        except asyncio.CancelledError:
            self.record_failure(label, _disconnected(), time.perf_counter() - started)
            raise
        finally:
            self.metrics.in_flight.dec()
        latency = time.perf_counter() - started

        completion = reply.completion
        if not completion.choices:
            error = ApiError(
                502,
                "upstream_error",
                "The upstream answered with no choices; nothing was billed.",
            )
            self.record_failure(label, error, latency)
            raise error
        choice = completion.choices[0]
        try:
            usage = usage_from(completion.usage)
        except ValueError as exc:
            error = _impossible_usage(exc)
            self.record_failure(label, error, latency)
            raise error from exc
        return self.record(
            request.model,
            usage,
            latency,
            answer=choice.message.content or "",
            finish_reason=choice.finish_reason,
            upstream_model=completion.model,
            request_id=reply.request_id,
            retries=reply.retries,
            rate_limits=reply.rate_limits,
        )

    def stream(self, request: ChatRequest) -> StreamCall:
        """Return a streamed call: ``async with tracker.stream(r) as call``."""
        return StreamCall(self, request)

    def record(
        self,
        model: str,
        usage: Usage | None,
        latency_s: float,
        *,
        answer: str = "",
        finish_reason: str | None = None,
        upstream_model: str | None = None,
        request_id: str | None = None,
        retries: int = 0,
        rate_limits: RateLimits | None = None,
        time_to_first_token_s: float | None = None,
    ) -> AskResult:
        """Record one successful call and return its result with its cost.

        Also the entry point for calls made without llmwatch's client: pass
        the model, the usage and the latency measured elsewhere. ``model`` may
        be a snapshot name; metrics count it under its base name.
        """
        label = self.served_name(model) or base_model_name(model)
        metrics = self.metrics
        usage_missing = usage is None
        if usage is None:
            logger.log(
                self._repeat_level("usage_missing", label),
                "upstream sent no token usage for model %s (request id %s); "
                "recording zero tokens; llm_usage_missing_total counts repeats",
                label,
                request_id,
            )
            metrics.usage_missing.labels(label).inc()
            usage = Usage()
        # A snapshot with its own entry in the price table keeps its price;
        # other snapshots are priced as their base model.
        cost = self.prices.cost(model, usage)

        metrics.requests.labels(label).inc()
        metrics.tokens.labels(label, "prompt").inc(usage.prompt_tokens)
        metrics.tokens.labels(label, "completion").inc(usage.completion_tokens)
        metrics.cached_tokens.labels(label).inc(usage.cached_tokens)
        metrics.reasoning_tokens.labels(label).inc(usage.reasoning_tokens)
        metrics.latency.labels(label).observe(latency_s)
        if time_to_first_token_s is not None:
            metrics.ttft.labels(label).observe(time_to_first_token_s)
        if retries:
            metrics.retries.labels(label).inc(retries)
        if rate_limits is not None:
            self._record_rate_limits(label, rate_limits)
        if cost is None:
            logger.log(
                self._repeat_level("unpriced", label),
                "model %s has no price in the price table, so its cost is unknown; "
                "add it to LLMWATCH_PRICES_FILE. llm_unpriced_requests_total "
                "counts repeats",
                label,
            )
            metrics.unpriced.labels(label).inc()
        else:
            metrics.cost.labels(label).inc(cost)

        logger.info(
            "llm call model=%s status=ok latency_s=%.3f prompt_tokens=%d "
            "completion_tokens=%d cost_usd=%s request_id=%s",
            label,
            latency_s,
            usage.prompt_tokens,
            usage.completion_tokens,
            "unknown" if cost is None else f"{cost:.8f}",
            request_id,
        )
        return AskResult(
            model=label,
            answer=answer,
            latency_s=latency_s,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            cached_prompt_tokens=usage.cached_tokens,
            reasoning_tokens=usage.reasoning_tokens,
            cost_usd=cost,
            finish_reason=finish_reason,
            upstream_model=upstream_model,
            request_id=request_id,
            upstream_attempts=retries + 1,
            time_to_first_token_s=time_to_first_token_s,
            usage_missing=usage_missing,
        )

    def _repeat_level(self, problem: str, model: str) -> int:
        """Return WARNING the first time a model shows a problem, DEBUG after."""
        if (problem, model) in self._warned:
            return logging.DEBUG
        self._warned.add((problem, model))
        return logging.WARNING

    def record_failure(
        self, model: str, error: ApiError, latency_s: float | None = None
    ) -> None:
        """Count one failed request once, and log it."""
        if error.counted:
            return
        error.counted = True
        self.metrics.requests.labels(model).inc()
        self.metrics.record_error(model, error.error_type)
        if error.upstream_retries:
            self.metrics.retries.labels(model).inc(error.upstream_retries)
        if error.upstream_headers:
            self._record_rate_limits(
                model, RateLimits.from_headers(error.upstream_headers)
            )
        level = (
            logging.INFO if error.error_type == "invalid_request" else logging.WARNING
        )
        logger.log(
            level,
            "llm call model=%s status=%d error=%s latency_s=%s: %s",
            model,
            error.status,
            error.error_type,
            "-" if latency_s is None else f"{latency_s:.3f}",
            error.message,
        )

    def _record_rate_limits(self, model: str, limits: RateLimits) -> None:
        for resource, value in limits.remaining.items():
            self.metrics.ratelimit_remaining.labels(model, resource).set(value)
        for resource, value in limits.limit.items():
            self.metrics.ratelimit_limit.labels(model, resource).set(value)


def _impossible_usage(exc: ValueError) -> ApiError:
    return ApiError(
        502,
        "upstream_error",
        f"The upstream reported impossible token usage: {exc}. The call counts "
        "as failed, and none of its tokens or cost are recorded.",
    )


def _disconnected() -> ApiError:
    return ApiError(
        499, "client_disconnected", "The client disconnected before the answer."
    )


class StreamCall:
    """A streamed completion: iterate for content deltas, then read ``result``.

    Leaving the ``async with`` block early (the client went away, or the
    task was cancelled) closes the upstream stream and counts the request as
    ``client_disconnected``.
    """

    def __init__(self, tracker: CallTracker, request: ChatRequest) -> None:
        self.tracker = tracker
        self.request = request
        self.label = tracker.served_name(request.model) or request.model
        self.result: AskResult | None = None
        self._stream: UpstreamStream | None = None
        self._started = 0.0

    async def __aenter__(self) -> StreamCall:
        upstream = self.tracker._require_upstream()
        self._started = time.perf_counter()
        self.tracker.metrics.in_flight.inc()
        try:
            self._stream = await upstream.open_stream(self.request)
        except ApiError as exc:
            self.tracker.metrics.in_flight.dec()
            self.tracker.record_failure(self.label, exc, self._elapsed())
            raise
        except asyncio.CancelledError:
            self.tracker.metrics.in_flight.dec()
            self.tracker.record_failure(self.label, _disconnected(), self._elapsed())
            raise
        except Exception as exc:
            self.tracker.metrics.in_flight.dec()
            error = ApiError(500, "internal_error", f"Streaming failed: {exc!r}.")
            self.tracker.record_failure(self.label, error, self._elapsed())
            raise error from exc
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.tracker.metrics.in_flight.dec()
        if self._stream is not None:
            await self._stream.close()
        if exc is None or self.result is not None:
            return
        if isinstance(exc, ApiError):
            self.tracker.record_failure(self.label, exc, self._elapsed())
        elif isinstance(exc, asyncio.CancelledError | ConnectionError):
            self.tracker.record_failure(self.label, _disconnected(), self._elapsed())
        else:
            error = ApiError(500, "internal_error", f"Streaming failed: {exc!r}.")
            self.tracker.record_failure(self.label, error, self._elapsed())

    def _elapsed(self) -> float:
        return time.perf_counter() - self._started

    async def __aiter__(self) -> AsyncIterator[str]:
        if self._stream is None:
            raise RuntimeError("use 'async with tracker.stream(request) as call'")
        parts: list[str] = []
        ttft: float | None = None
        finish_reason: str | None = None
        upstream_model: str | None = None
        usage = None
        try:
            async for chunk in self._stream:
                upstream_model = chunk.model or upstream_model
                if chunk.usage is not None:
                    usage = chunk.usage
                for choice in chunk.choices:
                    if choice.finish_reason is not None:
                        finish_reason = choice.finish_reason
                    content = choice.delta.content if choice.delta else None
                    if content:
                        if ttft is None:
                            ttft = self._elapsed()
                        parts.append(content)
                        yield content
        except ApiError:
            raise
        except (httpx2.TimeoutException, openai.APITimeoutError) as exc:
            # openai 3.x raises APITimeoutError for a read timeout mid-stream.
            raise ApiError(
                504,
                "timeout",
                "The upstream stream stalled past OPENAI_TIMEOUT; raise it or retry.",
            ) from exc
        except Exception as exc:
            raise ApiError(
                502,
                "upstream_error",
                f"The upstream stream broke off: {exc or type(exc).__name__}.",
            ) from exc

        try:
            checked_usage = usage_from(usage)
        except ValueError as exc:
            raise _impossible_usage(exc) from exc
        self.result = self.tracker.record(
            self.request.model,
            checked_usage,
            self._elapsed(),
            answer="".join(parts),
            finish_reason=finish_reason,
            upstream_model=upstream_model,
            request_id=self._stream.request_id,
            retries=self._stream.retries,
            rate_limits=self._stream.rate_limits,
            time_to_first_token_s=ttft,
        )
