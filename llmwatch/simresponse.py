"""Responses of the simulated upstream: bodies, streams and dropped connections."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
import string
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

logger = logging.getLogger(__name__)

REQUEST_ID = web.RequestKey("llmwatch_simulator_request_id", str)
STARTED = web.RequestKey("llmwatch_simulator_started", float)

DROP_AFTER_CHUNKS = 3
# How often a waiting request checks whether its client has disconnected.
_POLL_INTERVAL_S = 0.05
_API_VERSION = "2020-10-01"
_ID_ALPHABET = string.ascii_letters + string.digits


@dataclass(frozen=True)
class Answer:
    """A planned answer: its tokens, why it ended, and the usage to report."""

    pieces: list[str]
    finish_reason: str
    usage: dict[str, Any]

    @property
    def total_tokens(self) -> int:
        total: int = self.usage["total_tokens"]
        return total


@dataclass(frozen=True)
class Timing:
    """When to send tokens, and the event that ends every wait at shutdown."""

    ttft_s: float
    token_delay_s: float
    shutdown: asyncio.Event


def set_common_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Set the request id, processing time and API version headers."""
    elapsed_ms = (time.monotonic() - request[STARTED]) * 1000
    response.headers["x-request-id"] = request[REQUEST_ID]
    response.headers["openai-processing-ms"] = str(round(elapsed_ms))
    response.headers["openai-version"] = _API_VERSION


def _completion_id() -> str:
    return "chatcmpl-" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(29))


def _system_fingerprint(snapshot: str) -> str:
    return "fp_" + hashlib.sha256(snapshot.encode()).hexdigest()[:10]


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def pause(request: web.Request, seconds: float, shutdown: asyncio.Event) -> bool:
    """Wait ``seconds``, or less if the client disconnects or ``shutdown`` is set.

    Returns True only if the whole time passed with the client still connected.
    Polling is needed because aiohttp cancels handlers on disconnect only when
    the server runs with handler_cancellation=True.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not (shutdown.is_set() or _client_gone(request)):
        remaining = deadline - loop.time()
        if remaining <= 0:
            return True
        try:
            async with asyncio.timeout(min(remaining, _POLL_INTERVAL_S)):
                await shutdown.wait()
        except TimeoutError:
            pass
    return False


def _abort(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()


def dropped_response(request: web.Request) -> web.Response:
    """Close the connection at once and return a response that cannot be sent.

    aiohttp fails to send the response, takes that as a client disconnect, and
    only writes it to the access log. Status 499 is nginx's code for that case.
    """
    _abort(request)
    return web.Response(status=499)


def malformed_response(headers: dict[str, str], *, stream: bool) -> web.Response:
    """Return a 200 response whose JSON is cut off, so that it does not parse.

    A non-streamed response is application/json. A stream is an event stream
    whose first event carries the cut-off JSON, because a client reading a
    stream finds no events at all in an application/json body and reports no
    error.
    """
    start = '{"id": "' + _completion_id() + '", "object": "chat.completion'
    if not stream:
        return web.Response(
            text=start + '", ', content_type="application/json", headers=headers
        )
    body = "data: " + start + '.chunk", \n\ndata: [DONE]\n\n'
    return web.Response(text=body, content_type="text/event-stream", headers=headers)


def _chunk(
    base: dict[str, Any], delta: dict[str, Any], finish_reason: str | None
) -> dict[str, Any]:
    choice = {
        "index": 0,
        "delta": delta,
        "logprobs": None,
        "finish_reason": finish_reason,
    }
    return {**base, "choices": [choice]}


async def _send_event(response: web.StreamResponse, data: dict[str, Any]) -> None:
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    await response.write(f"data: {payload}\n\n".encode())


async def send_stream(
    request: web.Request,
    snapshot: str,
    answer: Answer,
    timing: Timing,
    headers: dict[str, str],
    *,
    include_usage: bool,
    drop: bool,
) -> web.StreamResponse:
    """Send the answer as server-sent events, one chunk per token.

    The first chunk carries the role, then come a chunk with the finish reason,
    a usage chunk with no choices if ``include_usage``, and ``data: [DONE]``.
    With ``drop``, the connection closes after the first 3 chunks instead.
    """
    response = web.StreamResponse(headers=headers)
    response.content_type = "text/event-stream"
    response.headers["cache-control"] = "no-cache"
    set_common_headers(request, response)

    base: dict[str, Any] = {
        "id": _completion_id(),
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": snapshot,
        "service_tier": "default",
        "system_fingerprint": _system_fingerprint(snapshot),
    }
    if include_usage:
        # With include_usage, OpenAI adds "usage": null to every earlier chunk.
        base["usage"] = None
    # An empty answer still sends one chunk, which carries the role.
    pieces = answer.pieces or [""]

    try:
        await response.prepare(request)
        if not await pause(request, timing.ttft_s, timing.shutdown):
            _abort(request)
            return response
        for index, piece in enumerate(pieces):
            if index > 0 and not await pause(
                request, timing.token_delay_s, timing.shutdown
            ):
                _abort(request)
                return response
            delta: dict[str, Any] = {"content": piece}
            if index == 0:
                delta = {"role": "assistant", "content": piece, "refusal": None}
            await _send_event(response, _chunk(base, delta, None))
            sent = index + 1
            if drop and sent in (DROP_AFTER_CHUNKS, len(pieces)):
                logger.debug("Dropping stream %s after %d chunks", base["id"], sent)
                _abort(request)
                return response

        await _send_event(response, _chunk(base, {}, answer.finish_reason))
        if include_usage:
            await _send_event(response, {**base, "choices": [], "usage": answer.usage})
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
    except ConnectionError:
        logger.debug("Client of stream %s disconnected", base["id"])
    return response


async def send_completion(
    request: web.Request,
    snapshot: str,
    answer: Answer,
    timing: Timing,
    headers: dict[str, str],
    *,
    include_usage: bool,
    drop: bool,
) -> web.StreamResponse:
    """Wait for the whole answer's generation time, then send it as one body.

    Without ``include_usage`` the body's usage is null. With ``drop``, the
    connection closes after the wait instead.
    """
    wait_s = timing.ttft_s + len(answer.pieces) * timing.token_delay_s
    if not await pause(request, wait_s, timing.shutdown) or drop:
        return dropped_response(request)

    message: dict[str, Any] = {
        "role": "assistant",
        "content": "".join(answer.pieces),
        "refusal": None,
        "annotations": [],
    }
    choice = {
        "index": 0,
        "message": message,
        "logprobs": None,
        "finish_reason": answer.finish_reason,
    }
    body = {
        "id": _completion_id(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": snapshot,
        "choices": [choice],
        "usage": answer.usage if include_usage else None,
        "service_tier": "default",
        "system_fingerprint": _system_fingerprint(snapshot),
    }
    return web.json_response(body, headers=headers)
