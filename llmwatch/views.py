"""HTTP handlers: /ask, /metrics and /healthz, and the JSON error middleware."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, NoReturn

import marshmallow
from aiohttp import web
from aiohttp.typedefs import Handler
from aiohttp_apigami import docs, request_schema, response_schema
from prometheus_client.exposition import choose_encoder

from llmwatch import __version__
from llmwatch.calls import AskResult, CallTracker
from llmwatch.config import Settings
from llmwatch.errors import ApiError
from llmwatch.metrics import UNKNOWN_MODEL, Metrics
from llmwatch.schemas import (
    AskRequestSchema,
    AskResponseSchema,
    ErrorSchema,
    HealthSchema,
    JsonBodyError,
    decode_json,
    invalid_request,
)
from llmwatch.upstream import ChatRequest

logger = logging.getLogger(__name__)

SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
TRACKER = web.AppKey("tracker", CallTracker)
UPSTREAM_URL = web.AppKey("upstream_url", str)
# The validated body of /ask, which aiohttp-apigami's validation middleware
# stores under this key, given to it as request_data_name.
REQUEST_DATA = web.RequestKey("data", dict)
# POST requests to these paths are LLM requests: each failure is counted.
TRACKED_PATHS = frozenset({"/ask"})
MODEL_LABEL = web.RequestKey("llmwatch.model_label", str)

# text/event-stream must reach the client frame by frame: no caching, and
# X-Accel-Buffering turns off nginx's response buffering.
SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache, no-transform",
    "X-Accel-Buffering": "no",
    "Connection": "keep-alive",
}


def dumps(value: Any) -> str:
    """Serialize JSON keeping non-ASCII text (CJK) as UTF-8, not escapes."""
    return json.dumps(value, ensure_ascii=False)


def sse_event(event: str, data: dict[str, Any]) -> bytes:
    """Format one server-sent event."""
    return f"event: {event}\ndata: {dumps(data)}\n\n".encode()


@docs(
    tags=["llm"],
    summary="Ask a model",
    description=(
        "Send a chat completion upstream and answer with the text, its latency, "
        "token counts and cost in US dollars. With stream=true the answer comes "
        "as server-sent events: 'delta' events with content, then one 'summary' "
        "event with the same fields as the JSON answer, or an 'error' event."
    ),
    responses={
        200: {"description": "The answer.", "schema": AskResponseSchema},
        400: {"description": "Invalid request or model.", "schema": ErrorSchema},
        413: {"description": "Body over the limit.", "schema": ErrorSchema},
        415: {"description": "Body is not JSON.", "schema": ErrorSchema},
        422: {"description": "Invalid field.", "schema": ErrorSchema},
        429: {"description": "Upstream rate limit.", "schema": ErrorSchema},
        502: {"description": "Upstream failed.", "schema": ErrorSchema},
        504: {"description": "Upstream timed out.", "schema": ErrorSchema},
    },
)
@request_schema(AskRequestSchema)
@response_schema(AskResponseSchema, 200)
async def ask(request: web.Request) -> web.StreamResponse:
    """Answer one question through the upstream."""
    data: dict[str, Any] = request[REQUEST_DATA]
    tracker = request.app[TRACKER]
    model, label = tracker.resolve_model(data.get("model"))
    request[MODEL_LABEL] = label

    messages = data.get("messages") or [{"role": "user", "content": data["prompt"]}]
    chat = ChatRequest(
        model=model,
        messages=messages,
        temperature=data.get("temperature"),
        max_tokens=data.get("max_tokens"),
    )
    if data["stream"]:
        return await stream_answer(request, tracker, chat)
    result = await tracker.ask(chat)
    return web.json_response(result.to_dict(), dumps=dumps)


async def stream_answer(
    request: web.Request, tracker: CallTracker, chat: ChatRequest
) -> web.StreamResponse:
    """Relay content deltas as server-sent events, then a summary event."""
    response = web.StreamResponse(headers=SSE_HEADERS)
    try:
        async with tracker.stream(chat) as call:
            await response.prepare(request)
            try:
                async for delta in call:
                    await response.write(sse_event("delta", {"content": delta}))
            except ApiError as exc:
                tracker.record_failure(call.label, exc)
                await response.write(sse_event("error", exc.to_dict()["error"]))
            else:
                result: AskResult | None = call.result
                if result is not None:
                    await response.write(sse_event("summary", result.to_dict()))
        await response.write_eof()
    except ConnectionResetError:
        # The client went away; the tracker has counted it and closed the
        # upstream stream.
        logger.debug("client disconnected from a stream of %s", chat.model)
    return response


@docs(
    tags=["monitoring"],
    summary="Prometheus metrics",
    description="The Prometheus exposition of every LLM request so far.",
)
async def metrics(request: web.Request) -> web.Response:
    """Expose the app's registry in the format the scraper accepts."""
    registry = request.app[METRICS].registry
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    return web.Response(body=encoder(registry), headers={"Content-Type": content_type})


@docs(
    tags=["monitoring"],
    summary="Liveness",
    description="Returns 200 while the service runs, naming its upstream.",
)
@response_schema(HealthSchema, 200)
async def healthz(request: web.Request) -> web.Response:
    """Report that the service runs and which upstream it calls."""
    settings = request.app[SETTINGS]
    return web.json_response(
        {
            "status": "ok",
            "upstream": upstream_kind(settings),
            "base_url": request.app.get(UPSTREAM_URL),
            "version": __version__,
        }
    )


def upstream_kind(settings: Settings) -> str:
    """Name the upstream in use: simulated, openai or openai-compatible."""
    if settings.simulated:
        return "simulated"
    return "openai-compatible" if settings.base_url else "openai"


def validation_error(
    error: marshmallow.ValidationError,
    req: web.Request,
    schema: marshmallow.Schema,
    *args: Any,
    error_status_code: int | None = None,
    error_headers: dict[str, str] | None = None,
) -> NoReturn:
    """Turn a schema error into an ApiError naming the first invalid field."""
    messages: Any = error.messages
    if isinstance(messages, dict) and set(messages) <= {"json", "querystring"}:
        # webargs nests errors under the request location; drop that level.
        nested: Any = next(iter(messages.values()), {})
        messages = nested if isinstance(nested, dict) else {"body": nested}
    raise invalid_request(messages, "See /api/docs for the fields of /ask.")


def _is_llm_request(request: web.Request) -> bool:
    return request.method == "POST" and request.path in TRACKED_PATHS


@web.middleware
async def json_body_middleware(
    request: web.Request, handler: Handler
) -> web.StreamResponse:
    """Reject a POST body that is not JSON with a message saying why."""
    if not _is_llm_request(request):
        return await handler(request)
    if request.content_type != "application/json":
        raise ApiError(
            415,
            "invalid_request",
            f"Content-Type {request.content_type!r} is not supported; send a JSON "
            "body with 'Content-Type: application/json'.",
            field="Content-Type",
        )
    try:
        decode_json(await request.read())
    except JsonBodyError as exc:
        raise ApiError(
            400,
            "invalid_request",
            f"The request body is invalid: {exc}. Send one UTF-8 JSON object.",
            field="body",
        ) from None
    return await handler(request)


@web.middleware
async def error_middleware(
    request: web.Request, handler: Handler
) -> web.StreamResponse:
    """Answer every failure as JSON and count failed LLM requests once."""
    try:
        return await handler(request)
    except ApiError as exc:
        error = exc
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        error = _from_http_exception(request, exc)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        logger.exception("unhandled error on %s %s", request.method, request.path)
        error = ApiError(
            500,
            "internal_error",
            "llmwatch failed to handle the request; see its log for the traceback.",
        )
    if _is_llm_request(request):
        model = request.get(MODEL_LABEL, UNKNOWN_MODEL)
        request.app[TRACKER].record_failure(model, error)
    return web.json_response(
        error.to_dict(), status=error.status, headers=error.headers, dumps=dumps
    )


def _from_http_exception(request: web.Request, exc: web.HTTPException) -> ApiError:
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        limit = request.app[SETTINGS].max_body_bytes
        return ApiError(
            413,
            "invalid_request",
            f"The request body is larger than {limit} bytes; send less or raise "
            "LLMWATCH_MAX_BODY_BYTES.",
            field="body",
        )
    if isinstance(exc, web.HTTPNotFound):
        return ApiError(404, "invalid_request", f"No route {request.path}.")
    if isinstance(exc, web.HTTPMethodNotAllowed):
        return ApiError(
            405,
            "invalid_request",
            f"{request.method} is not allowed on {request.path}; use "
            f"{', '.join(sorted(exc.allowed_methods))}.",
        )
    return ApiError(exc.status, "invalid_request", exc.reason)
