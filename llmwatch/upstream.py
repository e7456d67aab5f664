"""The OpenAI client wrapper: one async client per app, errors mapped to ours."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import openai
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from llmwatch.errors import ApiError
from llmwatch.pricing import Usage

logger = logging.getLogger(__name__)

# The simulated upstream takes any key, but the OpenAI client requires one.
SIMULATOR_API_KEY = "simulated-upstream"
# Sent to an upstream given by OPENAI_BASE_URL when OPENAI_API_KEY is unset.
NO_API_KEY = "no-api-key"
RETRY_COUNT_HEADER = "x-stainless-retry-count"


# The o-series (o1, o3, o4-mini, ...) and the gpt-5 family, with any suffix.
_REASONING_MODEL = re.compile(r"^(o\d+|gpt-5)(-|$)")


def is_reasoning_model(model: str) -> bool:
    """Return True for OpenAI's reasoning models, which bill reasoning tokens."""
    return _REASONING_MODEL.match(model) is not None


@dataclass
class ChatRequest:
    """One chat completion to send upstream."""

    model: str
    messages: list[dict[str, Any]]
    temperature: float | None = None
    max_tokens: int | None = None

    def create_arguments(self) -> dict[str, Any]:
        """Return the keyword arguments of ``chat.completions.create``."""
        arguments: dict[str, Any] = {"model": self.model, "messages": self.messages}
        if self.temperature is not None:
            arguments["temperature"] = self.temperature
        if self.max_tokens is not None:
            # OpenAI's reasoning models reject max_tokens and take
            # max_completion_tokens; other OpenAI-compatible servers (older
            # vLLM and Ollama releases) know only max_tokens.
            if is_reasoning_model(self.model):
                arguments["max_completion_tokens"] = self.max_tokens
            else:
                arguments["max_tokens"] = self.max_tokens
        return arguments


@dataclass
class RateLimits:
    """The upstream's x-ratelimit-* headers of one response."""

    remaining: dict[str, int] = field(default_factory=dict)
    limit: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> RateLimits:
        """Read the request and token windows, skipping absent or bad values."""
        limits = cls()
        for resource in ("requests", "tokens"):
            for kind, target in (
                ("remaining", limits.remaining),
                ("limit", limits.limit),
            ):
                raw = headers.get(f"x-ratelimit-{kind}-{resource}")
                if raw is not None and raw.strip().isdigit():
                    target[resource] = int(raw)
        return limits


@dataclass
class UpstreamReply:
    """Upstream response to one non-streamed completion, with its headers."""

    completion: ChatCompletion
    request_id: str | None
    retries: int
    rate_limits: RateLimits


@dataclass
class UpstreamStream:
    """An open streamed completion and the headers that came before it."""

    chunks: openai.AsyncStream[ChatCompletionChunk]
    request_id: str | None
    retries: int
    rate_limits: RateLimits

    async def __aiter__(self) -> AsyncIterator[ChatCompletionChunk]:
        async for chunk in self.chunks:
            yield chunk

    async def close(self) -> None:
        """Close the upstream connection, also when the stream is unfinished."""
        await self.chunks.close()


def usage_from(usage: Any) -> Usage | None:
    """Convert an OpenAI usage object; None when the upstream sent none."""
    if usage is None:
        return None
    prompt_details = getattr(usage, "prompt_tokens_details", None)
    completion_details = getattr(usage, "completion_tokens_details", None)
    return Usage(
        prompt_tokens=usage.prompt_tokens or 0,
        completion_tokens=usage.completion_tokens or 0,
        cached_tokens=getattr(prompt_details, "cached_tokens", None) or 0,
        reasoning_tokens=getattr(completion_details, "reasoning_tokens", None) or 0,
    )


class UpstreamClient:
    """Send chat completions with the OpenAI SDK's async client over aiohttp."""

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str | None,
        timeout: float,
        max_retries: int,
    ) -> None:
        self.base_url = base_url
        self._client = openai.AsyncOpenAI(
            api_key=api_key,
            base_url=base_url,
            timeout=timeout,
            max_retries=max_retries,
            http_client=openai.DefaultAioHttpClient(timeout=timeout),
        )

    async def close(self) -> None:
        """Close the client's connection pool."""
        await self._client.close()

    async def complete(self, request: ChatRequest) -> UpstreamReply:
        """Send one completion and wait for the whole answer."""
        try:
            raw = await self._client.chat.completions.with_raw_response.create(
                **request.create_arguments()
            )
            completion = raw.parse()
        except openai.OpenAIError as exc:
            raise upstream_error(exc) from exc
        except UnicodeEncodeError as exc:
            raise unencodable_request(exc) from exc
        except ValueError as exc:
            # The SDK raises ValueError (a JSONDecodeError) for a body that is
            # not JSON, although the status was 200.
            raise ApiError(
                502,
                "upstream_error",
                f"The upstream answered with a malformed body: {exc}.",
            ) from exc
        if not isinstance(completion, ChatCompletion):
            raise ApiError(
                502, "upstream_error", "The upstream answered with a malformed body."
            )
        return UpstreamReply(
            completion=completion,
            request_id=raw.headers.get("x-request-id"),
            retries=raw.retries_taken,
            rate_limits=RateLimits.from_headers(raw.headers),
        )

    async def open_stream(self, request: ChatRequest) -> UpstreamStream:
        """Start a streamed completion that ends with a usage chunk."""
        try:
            raw = await self._client.chat.completions.with_raw_response.create(
                **request.create_arguments(),
                stream=True,
                stream_options={"include_usage": True},
            )
            chunks = raw.parse()
        except openai.OpenAIError as exc:
            raise upstream_error(exc) from exc
        except UnicodeEncodeError as exc:
            raise unencodable_request(exc) from exc
        return UpstreamStream(
            chunks=chunks,
            request_id=raw.headers.get("x-request-id"),
            retries=raw.retries_taken,
            rate_limits=RateLimits.from_headers(raw.headers),
        )


def unencodable_request(exc: UnicodeEncodeError) -> ApiError:
    """Reject text that has no UTF-8 form, such as a lone surrogate."""
    return ApiError(
        400,
        "invalid_request",
        f"The request text cannot be encoded as UTF-8: {exc.reason} at position "
        f"{exc.start}. Remove lone UTF-16 surrogates such as \\ud800.",
        field="messages",
    )


def upstream_error(exc: openai.OpenAIError) -> ApiError:
    """Map an OpenAI SDK error to llmwatch's HTTP status and error type."""
    error = _map_error(exc)
    if isinstance(exc, openai.APIStatusError):
        error.upstream_headers = dict(exc.response.headers)
    if isinstance(exc, openai.APIError):
        # The SDK numbers each attempt in this header of the request it sent,
        # so the last request shows how many retries came before the failure.
        retry_count = exc.request.headers.get(RETRY_COUNT_HEADER, "0")
        error.upstream_retries = int(retry_count) if retry_count.isdigit() else 0
    return error


def _connection_failure(exc: BaseException) -> aiohttp.ClientConnectionError | None:
    """Return the aiohttp connection error behind ``exc`` that is no timeout.

    NOTE: the aiohttp transport vendored in openai 3.x maps every
    aiohttp.ClientConnectionError to httpx2.ConnectTimeout, a refused
    connection or a server that hung up included, so the SDK raises
    APITimeoutError for them. Only the cause chain tells them apart.
    """
    cause = exc.__cause__
    while cause is not None:
        if isinstance(cause, aiohttp.ClientConnectionError) and not isinstance(
            cause, TimeoutError
        ):
            return cause
        cause = cause.__cause__
    return None


def _map_error(exc: openai.OpenAIError) -> ApiError:
    failure = _connection_failure(exc)
    if isinstance(exc, openai.APITimeoutError) and failure is None:
        return ApiError(
            504,
            "timeout",
            "The upstream did not answer in time; raise OPENAI_TIMEOUT or retry.",
        )
    if isinstance(exc, openai.APIConnectionError):
        return ApiError(
            502,
            "connection_error",
            f"Cannot reach the upstream: {str(failure or exc).rstrip('.')}. Check "
            "OPENAI_BASE_URL and the network.",
        )
    if isinstance(exc, openai.RateLimitError):
        headers = {}
        retry_after = exc.response.headers.get("retry-after")
        if retry_after:
            headers["Retry-After"] = retry_after
        return ApiError(
            429,
            "rate_limited",
            "The upstream's rate limit was reached; retry after the Retry-After delay.",
            headers=headers,
        )
    if isinstance(exc, openai.APIStatusError):
        if exc.status_code >= 500:
            return ApiError(
                502,
                "upstream_error",
                f"The upstream failed with HTTP {exc.status_code}; retry later.",
            )
        # Any other 4xx is a request the upstream found invalid (a bad key
        # included); pass its status and message on.
        return ApiError(
            exc.status_code if exc.status_code != 401 else 502,
            "invalid_request" if exc.status_code != 401 else "upstream_error",
            _upstream_message(exc),
        )
    return ApiError(502, "upstream_error", f"The upstream call failed: {exc}.")


def _upstream_message(exc: openai.APIStatusError) -> str:
    if exc.status_code == 401:
        return "The upstream rejected the API key (HTTP 401); check OPENAI_API_KEY."
    body = exc.body
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return f"The upstream rejected the request: {body['message']}"
    return f"The upstream rejected the request with HTTP {exc.status_code}."
