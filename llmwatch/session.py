"""The library API of push mode: a session that sends, records and pushes calls."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any

from aiohttp import web
from marshmallow import ValidationError
from openai.types import CompletionUsage
from prometheus_client import CollectorRegistry

from llmwatch.app import open_upstream
from llmwatch.calls import AskResult, CallTracker
from llmwatch.config import Settings, load_settings
from llmwatch.errors import ApiError
from llmwatch.metrics import ERROR_TYPES, UNKNOWN_MODEL, Metrics
from llmwatch.pricing import PriceTable, Usage
from llmwatch.push import (
    DEFAULT_PUSH_RETRIES,
    DEFAULT_PUSH_TIMEOUT_S,
    Pusher,
    PushTarget,
    RunMetrics,
    check_push_options,
)
from llmwatch.schemas import AskRequestSchema, invalid_request
from llmwatch.upstream import ChatRequest, UpstreamClient, usage_from

logger = logging.getLogger(__name__)

PASSWORD_ENV = "LLMWATCH_PUSHGATEWAY_PASSWORD"
# The HTTP status logged with a failure recorded by error type alone, as the
# service would respond with it.
_ERROR_STATUS = {
    "invalid_request": 400,
    "rate_limited": 429,
    "upstream_error": 502,
    "connection_error": 502,
    "timeout": 504,
    "client_disconnected": 499,
    "internal_error": 500,
}


class BatchSession:
    """Track the LLM calls of one batch run and push their metrics when it ends.

    The session owns a fresh metrics registry with the service's families
    and the ``llm_batch_*`` ones. ``ask`` sends a request as ``POST /ask``
    does, with the same validation and errors. ``record`` and
    ``record_failure`` count calls made with another client. Leaving the
    block pushes the registry once, also when an exception leaves it. Such a
    run, or one marked with ``mark_failed``, is a failed run: it keeps the
    previous ``llm_batch_last_success_timestamp_seconds`` instead of setting
    it to now. Without ``pushgateway`` nothing is pushed, and the metrics
    stay readable in ``registry``.

    Without an API key in ``settings`` (or OPENAI_API_KEY), requests go to the
    built-in simulated upstream, as with ``llmwatch serve``.

    Example::

        async with BatchSession(
            job="nightly-eval", pushgateway="http://localhost:9091"
        ) as session:
            result = await session.ask("Summarize this ticket: ...")
            print(result.answer, result.cost_usd)

    Raises ConfigError for an invalid setting or push option.
    """

    def __init__(
        self,
        *,
        job: str | None = None,
        pushgateway: str | None = None,
        grouping_key: Mapping[str, str] | None = None,
        settings: Settings | None = None,
        push_interval: float | None = None,
        push_timeout: float = DEFAULT_PUSH_TIMEOUT_S,
        push_retries: int = DEFAULT_PUSH_RETRIES,
        push_user: str | None = None,
        push_password: str | None = None,
    ) -> None:
        check_push_options(job, pushgateway, push_interval)
        self.settings = settings if settings is not None else load_settings()
        self.metrics = Metrics(self.settings.latency_buckets)
        self.run = RunMetrics(self.metrics.registry)
        self._tracker = CallTracker(
            None,
            self.metrics,
            PriceTable.load(self.settings.prices_file),
            default_model=self.settings.model,
            extra_models=self.settings.extra_models,
        )

        self.pusher = _make_pusher(
            self.run,
            job=job,
            pushgateway=pushgateway,
            grouping_key=grouping_key or {},
            push_timeout=push_timeout,
            push_retries=push_retries,
            push_user=push_user,
            push_password=push_password,
        )
        self.push_interval = push_interval

        self.succeeded = 0
        self.failed = 0
        self.skipped = 0
        self._run_failed = False
        self._entered = False
        self._started = time.monotonic()
        self._upstream: UpstreamClient | None = None
        self._simulator: web.AppRunner | None = None
        self._interval_task: asyncio.Task[None] | None = None

    @property
    def registry(self) -> CollectorRegistry:
        """The run's ``CollectorRegistry``: every family that gets pushed."""
        return self.metrics.registry

    @property
    def run_failed(self) -> bool:
        """True once the run counts as failed and leaves the last success as is."""
        return self._run_failed

    @property
    def elapsed_s(self) -> float:
        """Seconds since the session was entered."""
        return time.monotonic() - self._started

    async def __aenter__(self) -> BatchSession:
        if self._entered:
            raise RuntimeError("a BatchSession can be entered only once")
        self._entered = True
        self._upstream, self._simulator = await open_upstream(self.settings)
        self._tracker.upstream = self._upstream
        self._started = time.monotonic()
        if self.push_interval is not None:
            self._interval_task = asyncio.create_task(
                self._push_periodically(self.push_interval)
            )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc is not None:
            self._run_failed = True
        try:
            if self._interval_task is not None:
                self._interval_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._interval_task
            if self._upstream is not None:
                await self._upstream.close()
            if self._simulator is not None:
                await self._simulator.cleanup()
        finally:
            await self._push_final()

    async def ask(
        self,
        prompt: str | None = None,
        *,
        messages: list[dict[str, Any]] | None = None,
        model: str | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
    ) -> AskResult:
        """Send one request as ``POST /ask`` does and record its outcome.

        Give either ``prompt`` (one user message) or ``messages`` (OpenAI chat
        format). Raises ApiError, whose ``error_type``, ``status`` and
        ``message`` are those /ask would respond with. The failure is counted
        before it is raised.
        """
        tracker = self._require_entered()
        arguments = {
            "prompt": prompt,
            "messages": messages,
            "model": model,
            "temperature": temperature,
            "max_tokens": max_tokens,
        }
        body = {name: value for name, value in arguments.items() if value is not None}
        try:
            data = AskRequestSchema().load(body)
        except ValidationError as exc:
            raise self._fail_unknown_model(invalid_request(exc.messages)) from None
        try:
            upstream_name, label = tracker.resolve_model(data.get("model"))
        except ApiError as exc:
            raise self._fail_unknown_model(exc) from None

        chat = ChatRequest(
            model=upstream_name,
            messages=data.get("messages")
            or [{"role": "user", "content": data["prompt"]}],
            temperature=data.get("temperature"),
            max_tokens=data.get("max_tokens"),
        )
        try:
            result = await tracker.ask(chat)
        except (ApiError, asyncio.CancelledError):
            self._count("failed")
            raise
        except Exception as exc:
            error = ApiError(
                500, "internal_error", f"The call failed unexpectedly: {exc!r}."
            )
            tracker.record_failure(label, error)
            self._count("failed")
            raise error from exc
        self._count("succeeded")
        return result

    def record(
        self,
        model: str,
        usage: Usage | CompletionUsage | None,
        latency_s: float,
        *,
        time_to_first_token_s: float | None = None,
        request_id: str | None = None,
    ) -> AskResult:
        """Record one successful call made without llmwatch's client.

        ``usage`` is a ``Usage`` or the ``usage`` of an OpenAI chat completion;
        None records zero tokens and counts ``llm_usage_missing_total``.
        ``latency_s`` is the call's duration in seconds, measured by the
        caller. A dated snapshot is labelled with its base model name. Returns
        the result with its cost; raises ValueError for negative or
        inconsistent numbers.
        """
        tracker = self._require_entered()
        if not model.strip():
            raise ValueError("invalid model '': expected a model name")
        _check_timings(latency_s, time_to_first_token_s)
        # Usage checks its own counts, so an OpenAI usage object with
        # negative or inconsistent counts raises ValueError here.
        counts = (
            usage if isinstance(usage, Usage) or usage is None else usage_from(usage)
        )
        result = tracker.record(
            model,
            counts,
            latency_s,
            request_id=request_id,
            time_to_first_token_s=time_to_first_token_s,
        )
        self._count("succeeded")
        return result

    def record_failure(
        self,
        model: str | None,
        error_type: str,
        latency_s: float | None = None,
        *,
        message: str | None = None,
    ) -> None:
        """Record one failed call, made elsewhere or rejected before it was sent.

        ``error_type`` is one of ``llmwatch.metrics.ERROR_TYPES``; ``model``
        None counts the failure under the model label ``unknown``.
        """
        tracker = self._require_entered()
        if latency_s is not None:
            _check_timings(latency_s, None)
        if error_type not in ERROR_TYPES:
            raise ValueError(
                f"unknown error type {error_type!r}; expected one of "
                f"{', '.join(ERROR_TYPES)}"
            )
        label = UNKNOWN_MODEL
        if model is not None:
            label = tracker.served_name(model) or model
        error = ApiError(
            _ERROR_STATUS[error_type],
            error_type,
            message or f"A call to {label} failed with {error_type}.",
        )
        tracker.record_failure(label, error, latency_s)
        self._count("failed")

    def skip(self, count: int = 1) -> None:
        """Count items this run does not send, such as those done by an earlier run."""
        if count < 0:
            raise ValueError(f"cannot skip {count} items; expected 0 or more")
        self.run.items.labels("skipped").inc(count)
        self.skipped += count

    def mark_failed(self) -> None:
        """Count this run as failed although no exception leaves the block."""
        self._run_failed = True

    async def push(self) -> bool:
        """Push the metrics now, in a worker thread; return whether it worked.

        Leaving the block pushes anyway, so this is for progress in between.
        The push takes at most ``push_timeout``, and a gateway failure is
        logged, not raised.
        """
        if self.pusher is None:
            return False
        self.run.duration.set(self.elapsed_s)
        return await asyncio.to_thread(self.pusher.push_blocking, carry_over=True)

    async def _push_periodically(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            await self.push()

    async def _push_final(self) -> None:
        self.run.duration.set(self.elapsed_s)
        if not self._run_failed:
            self.run.mark_success(time.time())
        if self.pusher is not None:
            await asyncio.to_thread(
                self.pusher.push_blocking, carry_over=self._run_failed
            )

    def _require_entered(self) -> CallTracker:
        if not self._entered:
            raise RuntimeError("use 'async with BatchSession(...) as session'")
        return self._tracker

    def _count(self, outcome: str) -> None:
        self.run.items.labels(outcome).inc()
        if outcome == "succeeded":
            self.succeeded += 1
        else:
            self.failed += 1

    def _fail_unknown_model(self, error: ApiError) -> ApiError:
        """Count a request rejected before its model was known, as /ask does."""
        self._tracker.record_failure(UNKNOWN_MODEL, error)
        self._count("failed")
        return error


def _check_timings(latency_s: float, time_to_first_token_s: float | None) -> None:
    if not math.isfinite(latency_s) or latency_s < 0:
        raise ValueError(f"invalid latency_s={latency_s!r}: expected seconds >= 0")
    if time_to_first_token_s is not None and not (
        0 <= time_to_first_token_s <= latency_s
    ):
        raise ValueError(
            f"invalid time_to_first_token_s={time_to_first_token_s!r}: expected "
            f"0 to latency_s ({latency_s})"
        )


def _make_pusher(
    run: RunMetrics,
    *,
    job: str | None,
    pushgateway: str | None,
    grouping_key: Mapping[str, str],
    push_timeout: float,
    push_retries: int,
    push_user: str | None,
    push_password: str | None,
) -> Pusher | None:
    if pushgateway is None or job is None:
        return None
    if push_user is not None and push_password is None:
        push_password = os.environ.get(PASSWORD_ENV) or None
    target = PushTarget(
        url=pushgateway,
        job=job,
        grouping_key=dict(grouping_key),
        timeout_s=push_timeout,
        retries=push_retries,
        username=push_user,
        password=push_password,
    )
    return Pusher(target, run)
