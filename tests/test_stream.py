"""POST /ask with "stream": true: server-sent events relayed as they come."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from aiohttp import ClientResponse
from conftest import (
    AppClient,
    Event,
    MakeClient,
    MakeSimulator,
    Samples,
    parse_event,
    parse_events,
    sample,
    scrape,
)

from llmwatch.simulator import count_tokens


async def read_event(response: ClientResponse) -> Event:
    """Read the next event of a stream that is still open."""
    frame = await response.content.readuntil(b"\n\n")
    return parse_event(frame.decode())


async def wait_for_samples(
    client: AppClient, name: str, value: float, timeout_s: float = 5.0, **labels: str
) -> Samples:
    """Scrape until a sample reaches ``value``, or return the last scrape."""
    deadline = time.monotonic() + timeout_s
    while True:
        samples = await scrape(client)
        if sample(samples, name, **labels) == value or time.monotonic() > deadline:
            return samples
        await asyncio.sleep(0.05)


async def test_stream_events(make_client: MakeClient) -> None:
    client = await make_client()

    response = await client.post("/ask", json={"prompt": "Hello", "stream": True})
    events = parse_events(await response.text())

    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    assert response.headers["Cache-Control"].startswith("no-cache")
    assert response.headers["X-Accel-Buffering"] == "no"
    names = [name for name, _ in events]
    assert names == ["delta"] * 20 + ["summary"]
    summary = events[-1][1]
    assert summary["answer"] == "".join(data["content"] for _, data in events[:-1])
    assert summary["model"] == "gpt-4o-mini"
    assert summary["upstream_model"] == "gpt-4o-mini-2024-07-18"
    assert summary["request_id"].startswith("req_")
    assert summary["finish_reason"] == "stop"
    assert summary["prompt_tokens"] == 7
    assert summary["completion_tokens"] == 20
    assert summary["time_to_first_token_s"] > 0
    assert summary["time_to_first_token_s"] <= summary["latency_s"]
    # 7 x $0.15/1M + 20 x $0.60/1M = 0.00001305
    assert summary["cost_usd"] == pytest.approx(0.00001305, rel=1e-9)


@pytest.mark.parametrize(
    "request_body",
    [
        pytest.param({"prompt": "Hello"}, id="prompt"),
        pytest.param({"prompt": "用三點解釋 RAG"}, id="cjk"),
        pytest.param({"prompt": "Hello", "model": "o4-mini"}, id="reasoning"),
        pytest.param({"prompt": "Hello", "max_tokens": 4}, id="cut"),
    ],
)
async def test_stream_summary_equals_plain_answer(
    make_client: MakeClient, request_body: dict[str, Any]
) -> None:
    client = await make_client()

    plain = await (await client.post("/ask", json=request_body)).json()
    response = await client.post("/ask", json={**request_body, "stream": True})
    summary = parse_events(await response.text())[-1][1]

    for field in (
        "model",
        "answer",
        "prompt_tokens",
        "completion_tokens",
        "cached_prompt_tokens",
        "reasoning_tokens",
        "cost_usd",
        "finish_reason",
        "upstream_model",
    ):
        assert summary[field] == plain[field], field
    assert summary["time_to_first_token_s"] is not None
    assert plain["time_to_first_token_s"] is None


async def test_stream_frames_arrive_as_produced(
    make_client: MakeClient, make_simulator: MakeSimulator
) -> None:
    token_delay_s = 0.02
    base_url = await make_simulator(token_delay_s=token_delay_s)
    client = await make_client(base_url=base_url)

    response = await client.post("/ask", json={"prompt": "Hello", "stream": True})
    first = await read_event(response)
    first_at = time.monotonic()
    rest = parse_events((await response.read()).decode())
    end_at = time.monotonic()

    assert first[0] == "delta"
    assert rest[-1][0] == "summary"
    assert len(rest) == 20
    # The other 19 tokens come token_delay_s apart after the first; a buffered
    # stream would deliver all frames at once.
    assert end_at - first_at > 19 * token_delay_s / 2


async def test_stream_ttft_metric(make_client: MakeClient) -> None:
    client = await make_client()

    await (await client.post("/ask", json={"prompt": "Hello", "stream": True})).read()
    await (await client.post("/ask", json={"prompt": "Hello"})).read()
    samples = await scrape(client)

    labels = {"model": "gpt-4o-mini"}
    assert sample(samples, "llm_time_to_first_token_seconds_count", **labels) == 1
    assert sample(samples, "llm_request_latency_seconds_count", **labels) == 2
    assert sample(samples, "llm_requests_total", **labels) == 2
    assert sample(samples, "llm_tokens_total", type="completion", **labels) == 40


async def test_stream_drop_sends_error_event(make_client: MakeClient) -> None:
    client = await make_client()

    response = await client.post(
        "/ask", json={"prompt": "Hello #fault=drop", "stream": True}
    )
    events = parse_events(await response.text())
    after = await client.post("/ask", json={"prompt": "Hello"})
    samples = await scrape(client)

    assert response.status == 200
    # The simulator closes the connection after 3 chunks.
    assert [name for name, _ in events] == ["delta"] * 3 + ["error"]
    error = events[-1][1]
    assert error["type"] == "upstream_error"
    assert error["message"]
    labels = {"model": "gpt-4o-mini"}
    assert sample(samples, "llm_errors_total", type="upstream_error", **labels) == 1
    assert sum(v for (n, _), v in samples.items() if n == "llm_errors_total") == 1
    assert sample(samples, "llm_requests_total", **labels) == 2
    assert sample(samples, "llm_requests_in_flight") == 0
    assert after.status == 200


async def test_stream_upstream_error_before_events(make_client: MakeClient) -> None:
    client = await make_client()

    response = await client.post(
        "/ask", json={"prompt": "Hello #fault=rate_limit", "stream": True}
    )
    body = await response.json()
    samples = await scrape(client)

    assert response.status == 429
    assert response.headers["Retry-After"] == "1"
    assert body["error"]["type"] == "rate_limited"
    labels = {"model": "gpt-4o-mini"}
    assert sample(samples, "llm_errors_total", type="rate_limited", **labels) == 1
    assert sample(samples, "llm_requests_total", **labels) == 1
    assert sample(samples, "llm_requests_in_flight") == 0


async def test_stream_usage_missing(make_client: MakeClient) -> None:
    client = await make_client()

    response = await client.post(
        "/ask", json={"prompt": "Hello #fault=no_usage", "stream": True}
    )
    events = parse_events(await response.text())
    samples = await scrape(client)

    summary = events[-1][1]
    assert events[-1][0] == "summary"
    assert summary["usage_missing"] is True
    assert summary["prompt_tokens"] == 0
    assert summary["completion_tokens"] == 0
    assert count_tokens(summary["answer"]) == 20
    assert sample(samples, "llm_usage_missing_total", model="gpt-4o-mini") == 1


async def test_stream_client_disconnect(
    make_client: MakeClient, make_simulator: MakeSimulator
) -> None:
    # 20 tokens 0.2 s apart: the stream would last about 4 s.
    base_url = await make_simulator(token_delay_s=0.2)
    client = await make_client(base_url=base_url)

    response = await client.post("/ask", json={"prompt": "Hello", "stream": True})
    first = await read_event(response)
    during = await scrape(client)
    response.close()
    samples = await wait_for_samples(
        client,
        "llm_errors_total",
        1,
        model="gpt-4o-mini",
        type="client_disconnected",
    )
    await asyncio.sleep(0.3)
    later = await scrape(client)

    assert first[0] == "delta"
    assert sample(during, "llm_requests_in_flight") == 1
    labels = {"model": "gpt-4o-mini"}
    assert (
        sample(samples, "llm_errors_total", type="client_disconnected", **labels) == 1
    )
    assert sample(samples, "llm_requests_in_flight") == 0
    assert sample(later, "llm_requests_total", **labels) == 1
    assert sum(v for (n, _), v in later.items() if n == "llm_errors_total") == 1
    assert sample(later, "llm_tokens_total", type="completion", **labels) == 0


async def test_stream_stall_sends_timeout_event(
    make_client: MakeClient, make_simulator: MakeSimulator
) -> None:
    # The second token comes 2 s after the first, past the 0.3 s timeout.
    base_url = await make_simulator(token_delay_s=2.0)
    client = await make_client(base_url=base_url, timeout=0.3)

    response = await client.post("/ask", json={"prompt": "Hello", "stream": True})
    events = parse_events(await response.text())
    samples = await scrape(client)

    assert [name for name, _ in events] == ["delta", "error"]
    assert events[-1][1]["type"] == "timeout"
    assert "OPENAI_TIMEOUT" in events[-1][1]["message"]
    labels = {"model": "gpt-4o-mini"}
    assert sample(samples, "llm_errors_total", type="timeout", **labels) == 1
    assert sample(samples, "llm_requests_total", **labels) == 1
    assert sample(samples, "llm_requests_in_flight") == 0
