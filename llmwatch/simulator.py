"""Simulated OpenAI-compatible upstream for running without an API key and for tests.

``create_simulator_app`` builds an aiohttp application that serves
``POST /v1/chat/completions``, ``GET /v1/models`` and ``GET /v1/models/{model}`` in
the shapes of the OpenAI API, so the real ``openai`` client can talk to it. It
accepts any bearer key, or none.

Answers are deterministic: the same messages give the same text. They are 20
tokens long unless a directive or ``max_tokens`` sets another length, and Chinese
when the last user message contains CJK characters. Tokens are counted by the
rule of ``count_tokens``: a run of ASCII letters is 1 token, every other
character that is not whitespace is 1, and whitespace is free. Each message adds
3 tokens to the prompt, and the prompt adds 3 more.

Reasoning models (the o-series and the gpt-5 family) report twice the answer's
tokens as reasoning tokens, on top of the answer. A prompt of at least 1024
tokens whose exact messages this app answered before reports
``(prompt_tokens // 128) * 128`` cached tokens.

Tests choose faults and timing per request with directives in the last user
message (they count as prompt tokens like any other text):

- ``#fault=rate_limit``: 429 with ``retry-after: 1`` and 0 remaining requests.
- ``#fault=server_error``: 500. ``#fault=unavailable``: 503.
- ``#fault=hang``: send nothing until the client disconnects or the app shuts
  down, then close the connection.
- ``#fault=malformed``: 200 with ``application/json`` content that is not JSON,
  or for a stream an event whose data is cut-off JSON.
- ``#fault=drop``: close the connection before the response, or after 3 chunks
  of a stream.
- ``#fault=no_usage``: a normal answer without usage.
- ``#times=N``: apply the fault only to the first N requests with these exact
  messages, then answer normally.
- ``#delay=S``: wait S seconds before the first token, in place of ``ttft_s``.
- ``#answer_tokens=N``: answer with exactly N tokens (0 to 100000) before
  ``max_tokens`` or ``max_completion_tokens`` cuts the answer.

The header ``x-simulator-fault`` takes the same values as ``#fault``. An invalid
directive value gets a 400 that names the directive and its accepted values.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from llmwatch.simlimits import RateLimitWindow
from llmwatch.simrequest import ChatRequest, OpenAIError, parse_chat_request
from llmwatch.simresponse import (
    REQUEST_ID,
    STARTED,
    Answer,
    Timing,
    dropped_response,
    malformed_response,
    pause,
    send_completion,
    send_stream,
    set_common_headers,
)
from llmwatch.simtext import (
    DEFAULT_ANSWER_TOKENS,
    DirectiveError,
    Directives,
    build_answer,
    contains_cjk,
    count_prompt_tokens,
    count_tokens,
    last_user_text,
    messages_digest,
    parse_directives,
    parse_fault,
)

__all__ = [
    "FAULT_HEADER",
    "MODEL_SNAPSHOTS",
    "REASONING_MODELS",
    "SimulatorConfig",
    "count_tokens",
    "create_simulator_app",
]

logger = logging.getLogger(__name__)

FAULT_HEADER = "x-simulator-fault"

# Base model names and the dated snapshot that the API reports for each.
MODEL_SNAPSHOTS: dict[str, str] = {
    "gpt-4o": "gpt-4o-2024-08-06",
    "gpt-4o-mini": "gpt-4o-mini-2024-07-18",
    "gpt-4.1": "gpt-4.1-2025-04-14",
    "gpt-4.1-mini": "gpt-4.1-mini-2025-04-14",
    "gpt-4.1-nano": "gpt-4.1-nano-2025-04-14",
    "o1": "o1-2024-12-17",
    "o3": "o3-2025-04-16",
    "o3-mini": "o3-mini-2025-01-31",
    "o4-mini": "o4-mini-2025-04-16",
    "gpt-5": "gpt-5-2025-08-07",
    "gpt-5-mini": "gpt-5-mini-2025-08-07",
    "gpt-5-nano": "gpt-5-nano-2025-08-07",
}
REASONING_MODELS = frozenset(
    {"o1", "o3", "o3-mini", "o4-mini", "gpt-5", "gpt-5-mini", "gpt-5-nano"}
)
# Older snapshots still served besides the current one, each with its base.
OLDER_SNAPSHOTS: dict[str, str] = {"gpt-4o-2024-05-13": "gpt-4o"}
_BASE_NAMES = {snapshot: base for base, snapshot in MODEL_SNAPSHOTS.items()}
_BASE_NAMES.update(OLDER_SNAPSHOTS)

REASONING_TOKENS_PER_ANSWER_TOKEN = 2
CACHE_MIN_PROMPT_TOKENS = 1024
CACHE_INCREMENT_TOKENS = 128
# Prompts remembered for caching and for #times, oldest forgotten first.
_MAX_REMEMBERED_PROMPTS = 10_000
# aiohttp's default of 1 MiB would reject long prompts that OpenAI accepts.
_MAX_BODY_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True)
class SimulatorConfig:
    """Latency model and rate limits of a simulated upstream.

    A non-streamed answer arrives after ``ttft_s + n_tokens * token_delay_s``.
    A stream sends its first token after ``ttft_s`` and each next one
    ``token_delay_s`` later. The limits appear in the x-ratelimit headers and
    are enforced with 429 responses per fixed 60 s window.
    """

    ttft_s: float = 0.2
    token_delay_s: float = 0.01
    requests_per_minute: int = 10_000
    tokens_per_minute: int = 2_000_000

    def __post_init__(self) -> None:
        for name in ("ttft_s", "token_delay_s"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(
                    f"SimulatorConfig.{name} must be a number of seconds of at "
                    f"least 0, got {value!r}."
                )
        for name in ("requests_per_minute", "tokens_per_minute"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(
                    f"SimulatorConfig.{name} must be at least 1, got {value!r}."
                )


class _SimulatorState:
    """Everything one simulator app remembers between requests."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.window = RateLimitWindow(
            config.requests_per_minute, config.tokens_per_minute
        )
        # Set when the app shuts down, so that waiting requests end at once.
        self.shutdown = asyncio.Event()
        self._served: OrderedDict[bytes, None] = OrderedDict()
        self._fault_requests: OrderedDict[bytes, int] = OrderedDict()

    def was_served(self, digest: bytes) -> bool:
        return digest in self._served

    def remember_served(self, digest: bytes) -> None:
        self._served[digest] = None
        self._served.move_to_end(digest)
        if len(self._served) > _MAX_REMEMBERED_PROMPTS:
            self._served.popitem(last=False)

    def count_fault_request(self, digest: bytes) -> int:
        """Count a request with a fault and return how many came with these messages."""
        count = self._fault_requests.pop(digest, 0) + 1
        self._fault_requests[digest] = count
        if len(self._fault_requests) > _MAX_REMEMBERED_PROMPTS:
            self._fault_requests.popitem(last=False)
        return count


_STATE = web.AppKey("llmwatch_simulator_state", _SimulatorState)


def _resolve_model(name: str) -> str:
    """Return the dated snapshot for a base name or snapshot, else raise 404."""
    if name in MODEL_SNAPSHOTS:
        return MODEL_SNAPSHOTS[name]
    if name in _BASE_NAMES:
        return name
    raise OpenAIError(
        404,
        f"The model `{name}` does not exist or you do not have access to it.",
        code="model_not_found",
    )


def _model_object(name: str) -> dict[str, Any]:
    """Describe a model as GET /v1/models does, created on its snapshot's date."""
    snapshot = MODEL_SNAPSHOTS.get(name, name)
    created = datetime.strptime(snapshot[-10:], "%Y-%m-%d").replace(tzinfo=UTC)
    return {
        "id": name,
        "object": "model",
        "created": int(created.timestamp()),
        "owned_by": "system",
    }


def _read_directives(request: web.Request, chat: ChatRequest) -> Directives:
    """Combine the prompt's directives with the fault header, or raise 400."""
    try:
        directives = parse_directives(last_user_text(chat.messages))
    except DirectiveError as error:
        raise OpenAIError(
            400, str(error), param="messages", code="invalid_value"
        ) from None

    header = request.headers.get(FAULT_HEADER)
    if header is not None:
        try:
            fault = parse_fault(header.strip(), f"the {FAULT_HEADER} header")
        except DirectiveError as error:
            raise OpenAIError(400, str(error), code="invalid_value") from None
        if directives.fault not in (None, fault):
            raise OpenAIError(
                400,
                f"The {FAULT_HEADER} header selects {fault!r} but the last user "
                f"message selects #fault={directives.fault}. Select one fault.",
                code="invalid_value",
            )
        directives = Directives(
            fault=fault,
            times=directives.times,
            delay_s=directives.delay_s,
            answer_tokens=directives.answer_tokens,
        )

    if directives.times is not None and directives.fault is None:
        raise OpenAIError(
            400,
            f"#times={directives.times} applies to a fault, but none is selected. "
            f"Add #fault=... to the last user message or send the {FAULT_HEADER} "
            "header.",
            param="messages",
            code="invalid_value",
        )
    return directives


def _cache_key(snapshot: str, digest: bytes) -> bytes:
    return _BASE_NAMES[snapshot].encode() + b"\0" + digest


def _plan_answer(
    state: _SimulatorState,
    chat: ChatRequest,
    snapshot: str,
    directives: Directives,
    digest: bytes,
) -> Answer:
    """Build the answer's tokens and usage, cut at max_tokens."""
    length = directives.answer_tokens
    if length is None:
        length = DEFAULT_ANSWER_TOKENS
    chinese = contains_cjk(last_user_text(chat.messages))
    # A cut answer is the start of the uncut one, as a real model would stop.
    pieces = build_answer(digest, length, chinese=chinese)[: chat.max_tokens]
    finish_reason = "length" if len(pieces) < length else "stop"

    prompt_tokens = count_prompt_tokens(chat.messages)
    cached_tokens = 0
    # Each model has a prompt cache of its own, as OpenAI's are.
    cached = state.was_served(_cache_key(snapshot, digest))
    if prompt_tokens >= CACHE_MIN_PROMPT_TOKENS and cached:
        cached_tokens = prompt_tokens // CACHE_INCREMENT_TOKENS * CACHE_INCREMENT_TOKENS
    # NOTE: OpenAI counts reasoning tokens against max_completion_tokens. Here
    # the limit cuts only the visible answer, and reasoning comes on top.
    reasoning_tokens = 0
    if _BASE_NAMES[snapshot] in REASONING_MODELS:
        reasoning_tokens = REASONING_TOKENS_PER_ANSWER_TOKEN * len(pieces)
    completion_tokens = len(pieces) + reasoning_tokens

    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": reasoning_tokens,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }
    return Answer(pieces=pieces, finish_reason=finish_reason, usage=usage)


def _rate_limit_error(
    window: RateLimitWindow, limit: str, retry_after_s: int, headers: dict[str, str]
) -> OpenAIError:
    per_minute, unit = window.requests_limit, "requests per min (RPM)"
    if limit == "tokens":
        per_minute, unit = window.tokens_limit, "tokens per min (TPM)"
    return OpenAIError(
        429,
        f"Rate limit reached for {unit}: Limit {per_minute}. Please try again in "
        f"{retry_after_s}s.",
        error_type=limit,
        code="rate_limit_exceeded",
        headers={**headers, "retry-after": str(retry_after_s)},
    )


def _fault_error(window: RateLimitWindow, fault: str) -> OpenAIError | None:
    """Return the error response that a fault selects, if it selects one."""
    if fault == "rate_limit":
        return _rate_limit_error(window, "requests", 1, window.headers(exhausted=True))
    if fault == "server_error":
        return OpenAIError(
            500,
            "The server had an error while processing your request. Sorry about that!",
            error_type="server_error",
            headers=window.headers(),
        )
    if fault == "unavailable":
        return OpenAIError(
            503,
            "The server is overloaded or not ready yet.",
            error_type="server_error",
            headers=window.headers(),
        )
    return None


async def _read_json(request: web.Request) -> Any:
    try:
        return json.loads(await request.read())
    except ValueError:
        raise OpenAIError(
            400,
            "We could not parse the JSON body of your request. The API expects a "
            "JSON payload, but what was sent was not valid JSON.",
        ) from None


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """Handle POST /v1/chat/completions like the OpenAI API."""
    state = request.app[_STATE]
    chat = parse_chat_request(await _read_json(request))
    snapshot = _resolve_model(chat.model)
    directives = _read_directives(request, chat)
    digest = messages_digest(chat.messages)

    fault = directives.fault
    if (
        fault is not None
        and directives.times is not None
        and state.count_fault_request(digest) > directives.times
    ):
        fault = None
    answer = _plan_answer(state, chat, snapshot, directives, digest)
    logger.debug(
        "Chat completion %s: model %s, stream %s, %d prompt tokens, "
        "%d completion tokens, fault %s",
        request[REQUEST_ID],
        snapshot,
        chat.stream,
        answer.usage["prompt_tokens"],
        answer.usage["completion_tokens"],
        fault,
    )

    # Like OpenAI, the window counts a request's tokens when it is admitted.
    exceeded = state.window.admit(answer.total_tokens)
    if exceeded is not None:
        retry_after_s = max(1, math.ceil(state.window.seconds_to_reset()))
        raise _rate_limit_error(
            state.window, exceeded, retry_after_s, state.window.headers()
        )
    error = None if fault is None else _fault_error(state.window, fault)
    if error is not None:
        raise error
    if fault == "hang":
        await pause(request, math.inf, state.shutdown)
        logger.debug("Hanging request %s ended", request[REQUEST_ID])
        return dropped_response(request)

    state.remember_served(_cache_key(snapshot, digest))
    headers = state.window.headers()
    if fault == "malformed":
        return malformed_response(headers, stream=chat.stream)
    ttft_s = state.config.ttft_s if directives.delay_s is None else directives.delay_s
    timing = Timing(ttft_s, state.config.token_delay_s, state.shutdown)
    send = send_stream if chat.stream else send_completion
    return await send(
        request,
        snapshot,
        answer,
        timing,
        headers,
        # A non-streamed body always has a usage field, null for no_usage.
        include_usage=(chat.include_usage or not chat.stream) and fault != "no_usage",
        drop=fault == "drop",
    )


async def list_models(request: web.Request) -> web.Response:
    """Handle GET /v1/models: every base name and snapshot, in OpenAI's list shape."""
    names = [*MODEL_SNAPSHOTS, *MODEL_SNAPSHOTS.values(), *OLDER_SNAPSHOTS]
    return web.json_response(
        {"object": "list", "data": [_model_object(name) for name in names]}
    )


async def retrieve_model(request: web.Request) -> web.Response:
    """Handle GET /v1/models/{model}."""
    name = request.match_info["model"]
    if name not in MODEL_SNAPSHOTS and name not in _BASE_NAMES:
        raise OpenAIError(
            404,
            f"The model '{name}' does not exist",
            param="model",
            code="model_not_found",
        )
    return web.json_response(_model_object(name))


@web.middleware
async def _openai_errors(
    request: web.Request,
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> web.StreamResponse:
    """Give every response a request id, and every error OpenAI's body shape."""
    request[REQUEST_ID] = "req_" + secrets.token_hex(16)
    request[STARTED] = time.monotonic()
    try:
        response = await handler(request)
    except OpenAIError as error:
        logger.debug(
            "Request %s failed with %d: %s",
            request[REQUEST_ID],
            error.status,
            error.message,
        )
        response = web.json_response(
            error.body(), status=error.status, headers=error.headers
        )
    except web.HTTPException as error:
        message = error.text or error.reason
        if error.status in (404, 405):
            message = f"Invalid URL ({request.method} {request.path})"
        logger.debug(
            "Request %s failed with %d: %s", request[REQUEST_ID], error.status, message
        )
        response = web.json_response(
            OpenAIError(error.status, message).body(), status=error.status
        )
    if not response.prepared:
        set_common_headers(request, response)
    return response


async def _release_waiting_requests(app: web.Application) -> None:
    app[_STATE].shutdown.set()


def create_simulator_app(config: SimulatorConfig | None = None) -> web.Application:
    """Build the simulated upstream as an aiohttp application.

    Serve it on loopback and point the OpenAI client at its ``/v1``::

        app = create_simulator_app(SimulatorConfig(ttft_s=0, token_delay_s=0))
        server = await aiohttp_server(app)
        client = openai.AsyncOpenAI(
            api_key="any", base_url=str(server.make_url("/v1"))
        )

    Each app has its own rate-limit window, prompt cache and #times counters.
    """
    app = web.Application(middlewares=[_openai_errors], client_max_size=_MAX_BODY_BYTES)
    app[_STATE] = _SimulatorState(config or SimulatorConfig())
    app.on_shutdown.append(_release_waiting_requests)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model}", retrieve_model)
    return app
