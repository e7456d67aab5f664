"""Failures of /ask: JSON bodies, status codes, counting and secrets in logs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

import pytest
from aiohttp import web
from conftest import (
    TEST_API_KEY,
    AppClient,
    MakeClient,
    MakeSimulator,
    Samples,
    sample,
    scrape,
    total,
)
from external import free_port

MINI = {"model": "gpt-4o-mini"}
# Requests rejected before a served model is known.
UNKNOWN_INVALID = {"model": "unknown", "type": "invalid_request"}


async def ask_error(
    client: AppClient, body: Any = None, **kwargs: Any
) -> tuple[int, dict[str, Any], Samples]:
    """POST /ask, expect a JSON error body, and scrape the metrics after it."""
    if body is not None:
        kwargs["json"] = body
    response = await client.post("/ask", **kwargs)
    assert response.content_type == "application/json"
    payload = await response.json()
    assert set(payload) == {"error"}
    error: dict[str, Any] = payload["error"]
    assert isinstance(error["type"], str)
    assert isinstance(error["message"], str)
    return response.status, error, await scrape(client)


async def assert_still_serving(client: AppClient, samples_before: Samples) -> None:
    """Check that a normal request succeeds and adds no error."""
    response = await client.post("/ask", json={"prompt": "Hello"})
    samples = await scrape(client)

    assert response.status == 200
    assert total(samples, "llm_errors_total") == total(
        samples_before, "llm_errors_total"
    )
    assert total(samples, "llm_requests_total") == (
        total(samples_before, "llm_requests_total") + 1
    )
    assert sample(samples, "llm_requests_in_flight") == 0


@pytest.mark.parametrize(
    ("fault", "status", "error_type"),
    [
        pytest.param("rate_limit", 429, "rate_limited", id="429"),
        pytest.param("server_error", 502, "upstream_error", id="500"),
        pytest.param("unavailable", 502, "upstream_error", id="503"),
        pytest.param("malformed", 502, "upstream_error", id="malformed"),
        pytest.param("drop", 502, "connection_error", id="drop"),
    ],
)
async def test_upstream_fault(
    make_client: MakeClient, fault: str, status: int, error_type: str
) -> None:
    client = await make_client()

    got_status, error, samples = await ask_error(
        client, {"prompt": f"Hello #fault={fault}"}
    )

    assert got_status == status
    assert error["type"] == error_type
    assert sample(samples, "llm_errors_total", type=error_type, **MINI) == 1
    assert total(samples, "llm_errors_total") == 1
    assert sample(samples, "llm_requests_total", **MINI) == 1
    assert total(samples, "llm_requests_total") == 1
    assert sample(samples, "llm_tokens_total", type="prompt", **MINI) == 0
    await assert_still_serving(client, samples)


async def test_rate_limit_passes_retry_after(make_client: MakeClient) -> None:
    client = await make_client()

    response = await client.post("/ask", json={"prompt": "Hello #fault=rate_limit"})
    samples = await scrape(client)

    assert response.status == 429
    assert response.headers["Retry-After"] == "1"
    # The simulator's 429 reports an exhausted request window.
    labels = {"resource": "requests", **MINI}
    assert sample(samples, "llm_ratelimit_remaining", **labels) == 0
    assert sample(samples, "llm_ratelimit_limit", **labels) == 10_000


async def test_connection_refused(make_client: MakeClient) -> None:
    client = await make_client(base_url=f"http://127.0.0.1:{free_port()}/v1")

    status, error, samples = await ask_error(client, {"prompt": "Hello"})
    second_status, _, second = await ask_error(client, {"prompt": "Hello"})
    health = await client.get("/healthz")

    assert status == 502
    assert error["type"] == "connection_error"
    assert "OPENAI_BASE_URL" in error["message"]
    assert sample(samples, "llm_errors_total", type="connection_error", **MINI) == 1
    assert total(samples, "llm_errors_total") == 1
    assert total(samples, "llm_requests_total") == 1
    assert sample(samples, "llm_requests_in_flight") == 0
    # Nothing listens there, so the next request fails the same way.
    assert second_status == 502
    assert total(second, "llm_errors_total") == 2
    assert health.status == 200


async def test_upstream_timeout(make_client: MakeClient) -> None:
    client = await make_client(timeout=0.3)

    status, error, samples = await ask_error(client, {"prompt": "Hello #fault=hang"})

    assert status == 504
    assert error["type"] == "timeout"
    assert "OPENAI_TIMEOUT" in error["message"]
    assert sample(samples, "llm_errors_total", type="timeout", **MINI) == 1
    assert total(samples, "llm_errors_total") == 1
    assert total(samples, "llm_requests_total") == 1
    await assert_still_serving(client, samples)


async def test_retry_then_success(make_client: MakeClient) -> None:
    client = await make_client(max_retries=2)

    response = await client.post(
        "/ask", json={"prompt": "Hello #fault=server_error #times=1"}
    )
    body = await response.json()
    samples = await scrape(client)

    assert response.status == 200
    assert body["upstream_attempts"] == 2
    assert sample(samples, "llm_upstream_retries_total", **MINI) == 1
    assert sample(samples, "llm_requests_total", **MINI) == 1
    assert total(samples, "llm_errors_total") == 0


async def test_retries_counted_on_failure(make_client: MakeClient) -> None:
    client = await make_client(max_retries=2)

    status, error, samples = await ask_error(
        client, {"prompt": "Hello #fault=server_error"}
    )

    assert status == 502
    assert error["type"] == "upstream_error"
    assert sample(samples, "llm_upstream_retries_total", **MINI) == 2
    assert sample(samples, "llm_errors_total", type="upstream_error", **MINI) == 1
    assert sample(samples, "llm_requests_total", **MINI) == 1


async def test_invalid_json(make_client: MakeClient) -> None:
    client = await make_client()

    status, error, samples = await ask_error(
        client, data=b'{"prompt": ', headers={"Content-Type": "application/json"}
    )

    assert status == 400
    assert error["type"] == "invalid_request"
    assert error["field"] == "body"
    assert "body" in error["message"]
    assert "JSON" in error["message"]
    assert sample(samples, "llm_errors_total", **UNKNOWN_INVALID) == 1
    assert total(samples, "llm_errors_total") == 1
    assert total(samples, "llm_requests_total") == 1
    await assert_still_serving(client, samples)


async def test_body_not_utf8(make_client: MakeClient) -> None:
    client = await make_client()

    status, error, _ = await ask_error(
        client,
        data='{"prompt": "\u00e9"}'.encode("latin-1"),
        headers={"Content-Type": "application/json"},
    )

    assert status == 400
    assert error["field"] == "body"
    assert "UTF-8" in error["message"]


@pytest.mark.parametrize(
    ("data", "mentioned"),
    [
        pytest.param(
            b'{"prompt": "Hi", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
            "nested too deeply",
            id="deep-nesting",
        ),
        pytest.param(
            b'{"prompt": "\\ud800"}', "lone UTF-16 surrogate", id="lone-surrogate"
        ),
        pytest.param(b'\xef\xbb\xbf{"prompt": "Hi"}', "Unexpected UTF-8 BOM", id="bom"),
    ],
)
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_body_not_acceptable_json(
    make_client: MakeClient, data: bytes, mentioned: str, stream: bool
) -> None:
    client = await make_client()
    if stream and data.startswith(b"{"):
        data = data.replace(b'{"prompt"', b'{"stream": true, "prompt"', 1)

    status, error, samples = await ask_error(
        client, data=data, headers={"Content-Type": "application/json"}
    )

    assert status == 400
    assert error["field"] == "body"
    assert mentioned in error["message"]
    assert sample(samples, "llm_errors_total", **UNKNOWN_INVALID) == 1
    assert total(samples, "llm_errors_total") == 1
    assert total(samples, "llm_requests_total") == 1
    await assert_still_serving(client, samples)


MESSAGE = {"role": "user", "content": "Hi"}


@pytest.mark.parametrize(
    ("body", "field", "mentioned"),
    [
        pytest.param({"prompt": 5}, "prompt", "prompt", id="prompt-number"),
        pytest.param({"prompt": ""}, "prompt", "prompt", id="prompt-empty"),
        pytest.param({"messages": "Hi"}, "messages", "messages", id="messages-str"),
        pytest.param({"messages": []}, "messages", "messages", id="messages-empty"),
        pytest.param(
            {"messages": [{"role": "wizard", "content": "Hi"}]},
            "messages[0].role",
            "role",
            id="bad-role",
        ),
        pytest.param(
            {"messages": [{"role": "user"}]},
            "messages[0].content",
            "content",
            id="no-content",
        ),
        pytest.param(
            {"messages": [{**MESSAGE, "mood": "calm"}]},
            "messages[0].mood",
            "mood",
            id="message-unknown-field",
        ),
        pytest.param(
            {"messages": [MESSAGE, {"role": "user", "content": [{"type": "text"}]}]},
            "messages[1].content",
            '"text" string',
            id="text-part-without-text",
        ),
        pytest.param(
            {"messages": [MESSAGE], "prompt": "Hi"}, "prompt", "prompt", id="both"
        ),
        pytest.param({}, "messages", "prompt", id="neither"),
        pytest.param({"prompt": "Hi", "mood": "calm"}, "mood", "mood", id="unknown"),
        pytest.param(
            {"prompt": "Hi", "temperature": "hot"},
            "temperature",
            "temperature",
            id="temperature-str",
        ),
        pytest.param(
            {"prompt": "Hi", "temperature": "0.7"},
            "temperature",
            "temperature",
            id="temperature-numeric-str",
        ),
        pytest.param(
            {"prompt": "Hi", "temperature": 3},
            "temperature",
            "temperature",
            id="temperature-range",
        ),
        pytest.param(
            {"prompt": "Hi", "max_tokens": 1.5},
            "max_tokens",
            "max_tokens",
            id="max-tokens-float",
        ),
        pytest.param(
            {"prompt": "Hi", "max_tokens": "5"},
            "max_tokens",
            "max_tokens",
            id="max-tokens-str",
        ),
        pytest.param(
            {"prompt": "Hi", "max_tokens": 0},
            "max_tokens",
            "max_tokens",
            id="max-tokens-zero",
        ),
        pytest.param(
            {"prompt": "Hi", "max_tokens": True},
            "max_tokens",
            "max_tokens",
            id="max-tokens-bool",
        ),
        pytest.param({"prompt": "Hi", "model": 4}, "model", "model", id="model-int"),
        pytest.param(
            {"prompt": "Hi", "stream": "yes"}, "stream", "stream", id="stream-str"
        ),
        pytest.param({"prompt": "Hi", "stream": 1}, "stream", "stream", id="stream-1"),
        pytest.param(["Hi"], "body", "Expected a JSON object", id="not-object"),
    ],
)
async def test_invalid_field(
    make_client: MakeClient,
    make_simulator: MakeSimulator,
    body: Any,
    field: str,
    mentioned: str,
) -> None:
    calls: list[str] = []
    client = await make_client(base_url=await make_simulator(calls=calls))

    status, error, samples = await ask_error(client, body)

    assert status == 422
    assert error["type"] == "invalid_request"
    assert error["field"] == field
    assert mentioned in error["message"]
    assert calls == []
    assert sample(samples, "llm_errors_total", **UNKNOWN_INVALID) == 1
    assert total(samples, "llm_errors_total") == 1
    assert total(samples, "llm_requests_total") == 1
    await assert_still_serving(client, samples)


async def test_temperature_not_finite(make_client: MakeClient) -> None:
    client = await make_client()

    status, error, _ = await ask_error(
        client,
        data=b'{"prompt": "Hi", "temperature": NaN}',
        headers={"Content-Type": "application/json"},
    )

    assert status == 422
    assert error["field"] == "temperature"


async def test_content_type_not_json(make_client: MakeClient) -> None:
    client = await make_client()

    status, error, samples = await ask_error(
        client, data=b"prompt=Hello", headers={"Content-Type": "text/plain"}
    )

    assert status == 415
    assert error["type"] == "invalid_request"
    assert "text/plain" in error["message"]
    assert "application/json" in error["message"]
    assert total(samples, "llm_errors_total") == 1
    assert total(samples, "llm_requests_total") == 1
    await assert_still_serving(client, samples)


async def test_body_over_limit(make_client: MakeClient) -> None:
    client = await make_client(max_body_bytes=100)
    headers = {"Content-Type": "application/json"}
    # 28 ideographs of 3 bytes + 2 letters, in 14 bytes of JSON: 100 bytes.
    at_limit = json.dumps({"prompt": "模" * 28 + "ab"}, ensure_ascii=False).encode()
    # 29 ideographs in 14 bytes of JSON: 101 bytes, but only 43 characters.
    over_limit = json.dumps({"prompt": "模" * 29}, ensure_ascii=False).encode()

    accepted = await client.post("/ask", data=at_limit, headers=headers)
    status, error, samples = await ask_error(client, data=over_limit, headers=headers)

    assert len(at_limit) == 100
    assert len(over_limit) == 101
    assert accepted.status == 200
    assert status == 413
    assert error["type"] == "invalid_request"
    assert "100 bytes" in error["message"]
    assert "LLMWATCH_MAX_BODY_BYTES" in error["message"]
    assert sample(samples, "llm_errors_total", **UNKNOWN_INVALID) == 1
    assert total(samples, "llm_errors_total") == 1
    assert total(samples, "llm_requests_total") == 2
    await assert_still_serving(client, samples)


async def test_unknown_route_not_counted(make_client: MakeClient) -> None:
    client = await make_client()

    missing = await client.get("/nowhere")
    wrong_method = await client.get("/ask")
    samples = await scrape(client)

    assert missing.status == 404
    assert (await missing.json())["error"]["type"] == "invalid_request"
    assert wrong_method.status == 405
    assert "POST" in (await wrong_method.json())["error"]["message"]
    # Only POST requests to /ask are LLM requests.
    assert total(samples, "llm_requests_total") == 0
    assert total(samples, "llm_errors_total") == 0


async def test_api_key_never_leaks(
    make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    client = await make_client()
    refused = await make_client(base_url=f"http://127.0.0.1:{free_port()}/v1")
    bodies = [
        {"prompt": "Hello"},
        {"prompt": "Hello", "stream": True},
        {"prompt": "Hello #fault=rate_limit"},
        {"prompt": "Hello #fault=server_error"},
        {"prompt": "Hello #fault=malformed"},
        {"prompt": "Hello #fault=drop", "stream": True},
        {"prompt": "Hello #times=x"},
        {"prompt": "Hello", "model": "nope"},
        {"prompt": 5},
    ]

    texts = []
    with caplog.at_level(logging.DEBUG):
        for body in bodies:
            texts.append(await (await client.post("/ask", json=body)).text())
        texts.append(await (await refused.post("/ask", json=bodies[0])).text())
        texts.append(await (await client.get("/healthz")).text())
        texts.append(await (await client.get("/metrics")).text())

    assert len(caplog.records) > len(bodies)
    for text in texts:
        assert TEST_API_KEY not in text
    for record in caplog.records:
        assert TEST_API_KEY not in record.getMessage()
    assert TEST_API_KEY not in caplog.text


async def test_prompt_not_logged_at_info(
    make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    client = await make_client()
    secret = "ostrich"

    with caplog.at_level(logging.DEBUG):
        for body in (
            {"prompt": f"Hello {secret}"},
            {"prompt": f"Hello {secret}", "stream": True},
            {"prompt": f"Hello {secret} #fault=server_error"},
            {"prompt": f"Hello {secret}", "model": "nope"},
            {"messages": [{"role": "user", "content": f"{secret}", "x": 1}]},
        ):
            await (await client.post("/ask", json=body)).read()

    info_records = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert info_records
    for record in info_records:
        assert secret not in record.getMessage()


async def test_client_disconnect_plain(make_client: MakeClient) -> None:
    client = await make_client()

    task = asyncio.create_task(client.post("/ask", json={"prompt": "Hi #delay=5"}))
    deadline = time.monotonic() + 5
    while sample(await scrape(client), "llm_requests_in_flight") == 0:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    samples = await scrape(client)
    while sample(samples, "llm_requests_in_flight") != 0:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
        samples = await scrape(client)

    labels = {"type": "client_disconnected", **MINI}
    assert sample(samples, "llm_errors_total", **labels) == 1
    assert total(samples, "llm_errors_total") == 1
    assert total(samples, "llm_requests_total") == 1
    await assert_still_serving(client, samples)


def impossible_completion(usage: dict[str, Any]) -> dict[str, Any]:
    """A chat completion body whose usage no real upstream would send."""
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hi"},
                "finish_reason": "stop",
            }
        ],
        "usage": usage,
    }


async def fixed_upstream(aiohttp_server: Any, body: dict[str, Any]) -> str:
    """Serve ``body`` for every chat completion; return the base URL."""

    async def complete(request: web.Request) -> web.Response:
        return web.json_response(body)

    upstream = web.Application()
    upstream.router.add_post("/v1/chat/completions", complete)
    server = await aiohttp_server(upstream)
    return str(server.make_url("/v1"))


@pytest.mark.parametrize(
    "usage",
    [
        pytest.param(
            {"prompt_tokens": -5, "completion_tokens": 1, "total_tokens": -4},
            id="negative",
        ),
        pytest.param(
            {
                "prompt_tokens": 10,
                "completion_tokens": 1,
                "total_tokens": 11,
                "prompt_tokens_details": {"cached_tokens": 5000},
            },
            id="cached-over-prompt",
        ),
        pytest.param(
            {"prompt_tokens": 10**30, "completion_tokens": 1, "total_tokens": 1},
            id="absurd",
        ),
    ],
)
async def test_impossible_usage_is_upstream_error(
    make_client: MakeClient, aiohttp_server: Any, usage: dict[str, Any]
) -> None:
    body = impossible_completion(usage)
    client = await make_client(base_url=await fixed_upstream(aiohttp_server, body))

    status, error, samples = await ask_error(client, {"prompt": "Hi"})

    assert status == 502
    assert error["type"] == "upstream_error"
    assert "impossible token usage" in error["message"]
    assert sample(samples, "llm_errors_total", type="upstream_error", **MINI) == 1
    assert total(samples, "llm_errors_total") == 1
    assert total(samples, "llm_requests_total") == 1
    assert total(samples, "llm_tokens_total") == 0
    assert total(samples, "llm_cached_prompt_tokens_total") == 0


async def test_no_choices_is_upstream_error(
    make_client: MakeClient, aiohttp_server: Any
) -> None:
    body = impossible_completion(
        {"prompt_tokens": 7, "completion_tokens": 0, "total_tokens": 7}
    )
    body["choices"] = []
    client = await make_client(base_url=await fixed_upstream(aiohttp_server, body))

    status, error, samples = await ask_error(client, {"prompt": "Hi"})

    assert status == 502
    assert error["type"] == "upstream_error"
    assert "no choices" in error["message"]
    assert sample(samples, "llm_errors_total", type="upstream_error", **MINI) == 1
    assert total(samples, "llm_requests_total") == 1
