"""GET /metrics: metric names, labels and values after known requests."""

from __future__ import annotations

import asyncio
import platform
import time
from typing import Any

import pytest
from conftest import (
    AppClient,
    MakeClient,
    parse_events,
    sample,
    scrape,
    total,
)
from external import find_binary
from prometheus_client.parser import text_string_to_metric_families

from llmwatch import __version__
from llmwatch.config import load_settings

MINI = {"model": "gpt-4o-mini"}

# Family name (as the parser reports it, without _total) and type.
FAMILIES = {
    "llm_requests": "counter",
    "llm_errors": "counter",
    "llm_tokens": "counter",
    "llm_cached_prompt_tokens": "counter",
    "llm_reasoning_tokens": "counter",
    "llm_request_latency_seconds": "histogram",
    "llm_time_to_first_token_seconds": "histogram",
    "llm_cost_usd": "counter",
    "llm_requests_in_flight": "gauge",
    "llm_usage_missing": "counter",
    "llm_unpriced_requests": "counter",
    "llm_upstream_retries": "counter",
    "llm_ratelimit_remaining": "gauge",
    "llm_ratelimit_limit": "gauge",
    "llmwatch_build_info": "gauge",
}
# Sample name and the names of its labels.
SAMPLE_LABELS = {
    "llm_requests_total": {"model"},
    "llm_errors_total": {"model", "type"},
    "llm_tokens_total": {"model", "type"},
    "llm_cached_prompt_tokens_total": {"model"},
    "llm_reasoning_tokens_total": {"model"},
    "llm_request_latency_seconds_bucket": {"model", "le"},
    "llm_request_latency_seconds_count": {"model"},
    "llm_request_latency_seconds_sum": {"model"},
    "llm_time_to_first_token_seconds_bucket": {"model", "le"},
    "llm_time_to_first_token_seconds_count": {"model"},
    "llm_time_to_first_token_seconds_sum": {"model"},
    "llm_cost_usd_total": {"model"},
    "llm_requests_in_flight": set(),
    "llm_usage_missing_total": {"model"},
    "llm_ratelimit_remaining": {"model", "resource"},
    "llm_ratelimit_limit": {"model", "resource"},
    "llmwatch_build_info": {"version", "python_version"},
}


async def exercise(client: AppClient) -> None:
    """Send requests that set most families; test_errors covers the retries."""
    for body in (
        {"prompt": "Hello"},
        {"prompt": "Hello", "stream": True},
        {"prompt": "Hello", "model": "o4-mini"},
        {"prompt": "Hello #fault=no_usage"},
        {"prompt": "Hello #fault=server_error"},
    ):
        await (await client.post("/ask", json=body)).read()


async def test_metrics_family_names(make_client: MakeClient) -> None:
    client = await make_client()
    await exercise(client)

    text = await (await client.get("/metrics")).text()
    families = {f.name: f.type for f in text_string_to_metric_families(text)}

    named = {name: kind for name, kind in families.items() if name in FAMILIES}
    assert named == FAMILIES
    # prometheus_client adds a _created gauge for each counter and histogram.
    for name, kind in families.items():
        if name in FAMILIES:
            continue
        assert name.endswith("_created"), name
        assert kind == "gauge"
        assert FAMILIES.get(name.removesuffix("_created")) in ("counter", "histogram")


async def test_metrics_sample_labels(make_client: MakeClient) -> None:
    client = await make_client()
    await exercise(client)

    samples = await scrape(client)
    labels_by_name: dict[str, set[str]] = {}
    for name, labels in samples:
        if not name.endswith("_created"):
            labels_by_name.setdefault(name, set()).update(key for key, _ in labels)

    assert labels_by_name == SAMPLE_LABELS
    token_types = {
        value
        for name, labels in samples
        if name == "llm_tokens_total"
        for key, value in labels
        if key == "type"
    }
    assert token_types == {"prompt", "completion"}


async def test_metrics_names_do_not_collide(make_client: MakeClient) -> None:
    client = await make_client()
    await exercise(client)

    text = await (await client.get("/metrics")).text()
    families = list(text_string_to_metric_families(text))
    owner: dict[str, str] = {}
    for family in families:
        for name in {family.name} | {s.name for s in family.samples}:
            assert owner.setdefault(name, family.name) == family.name, name
    names = {family.name for family in families}

    for name in names:
        assert f"{name}_total" not in names - {name}
        assert name.removesuffix("_total") not in names - {name}


async def test_metrics_values_match_requests(make_client: MakeClient) -> None:
    client = await make_client()
    bodies: list[dict[str, Any]] = [
        {"prompt": "Hello"},
        {"messages": [{"role": "user", "content": "What is RAG?"}], "max_tokens": 5},
        {"prompt": "用三點解釋 RAG", "stream": True},
    ]

    latencies: list[float] = []
    for body in bodies:
        response = await client.post("/ask", json=body)
        if body.get("stream"):
            name, summary = parse_events(await response.text())[-1]
            assert name == "summary"
            latencies.append(summary["latency_s"])
        else:
            latencies.append((await response.json())["latency_s"])
    samples = await scrape(client)

    assert sample(samples, "llm_requests_total", **MINI) == 3
    # Prompt tokens: 7 + (4 + 3 + 3 = 10) + 12 = 29.
    assert sample(samples, "llm_tokens_total", type="prompt", **MINI) == 29
    # Completion tokens: 20 + 5 + 20 = 45.
    assert sample(samples, "llm_tokens_total", type="completion", **MINI) == 45
    # 29 x $0.15/1M + 45 x $0.60/1M = 0.00000435 + 0.000027 = 0.00003135
    assert sample(samples, "llm_cost_usd_total", **MINI) == pytest.approx(
        0.00003135, rel=1e-9
    )
    assert sample(samples, "llm_request_latency_seconds_count", **MINI) == 3
    assert sample(samples, "llm_request_latency_seconds_sum", **MINI) == (
        pytest.approx(sum(latencies), rel=1e-9)
    )
    assert sample(samples, "llm_time_to_first_token_seconds_count", **MINI) == 1
    assert total(samples, "llm_errors_total") == 0
    assert sample(samples, "llm_requests_in_flight") == 0


async def test_metrics_zero_series_for_default_model(client: AppClient) -> None:
    samples = await scrape(client)

    assert ("llm_requests_total", frozenset(MINI.items())) in samples
    assert ("llm_cost_usd_total", frozenset(MINI.items())) in samples
    for error_type in ("rate_limited", "upstream_error", "timeout"):
        key = ("llm_errors_total", frozenset({*MINI.items(), ("type", error_type)}))
        assert samples[key] == 0


async def test_latency_buckets_default(client: AppClient) -> None:
    await (await client.post("/ask", json={"prompt": "Hello"})).read()

    samples = await scrape(client)
    bounds = sorted(
        float(dict(labels)["le"])
        for name, labels in samples
        if name == "llm_request_latency_seconds_bucket"
    )

    assert bounds[0] == 0.05
    assert bounds[-1] == float("inf")
    assert bounds[-2] >= 300


@pytest.mark.parametrize(
    ("buckets", "expected"),
    [
        pytest.param((0.1, 1.0, 10.0), ["0.1", "1.0", "10.0", "+Inf"], id="setting"),
        pytest.param(
            load_settings({"LLMWATCH_LATENCY_BUCKETS": "0.5,2,8"}).latency_buckets,
            ["0.5", "2.0", "8.0", "+Inf"],
            id="environment",
        ),
    ],
)
async def test_latency_buckets_configured(
    make_client: MakeClient, buckets: tuple[float, ...], expected: list[str]
) -> None:
    client = await make_client(latency_buckets=buckets)
    await (await client.post("/ask", json={"prompt": "Hello"})).read()

    samples = await scrape(client)
    bounds = [
        dict(labels)["le"]
        for name, labels in samples
        if name == "llm_request_latency_seconds_bucket"
    ]

    assert sorted(bounds, key=float) == expected


async def test_ratelimit_gauges(client: AppClient) -> None:
    await (await client.post("/ask", json={"prompt": "Hello"})).read()

    samples = await scrape(client)

    requests = {"resource": "requests", **MINI}
    tokens = {"resource": "tokens", **MINI}
    assert sample(samples, "llm_ratelimit_limit", **requests) == 10_000
    assert sample(samples, "llm_ratelimit_remaining", **requests) == 9_999
    assert sample(samples, "llm_ratelimit_limit", **tokens) == 2_000_000
    # The simulator counts 7 prompt + 20 completion tokens against the window.
    assert sample(samples, "llm_ratelimit_remaining", **tokens) == 1_999_973


async def test_in_flight_gauge(client: AppClient) -> None:
    task = asyncio.create_task(client.post("/ask", json={"prompt": "Hi #delay=0.5"}))
    deadline = time.monotonic() + 5
    during = await scrape(client)
    while sample(during, "llm_requests_in_flight") == 0:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
        during = await scrape(client)
    response = await task
    after = await scrape(client)

    assert sample(during, "llm_requests_in_flight") == 1
    assert response.status == 200
    assert sample(after, "llm_requests_in_flight") == 0


async def test_build_info(client: AppClient) -> None:
    samples = await scrape(client)

    labels = {"version": __version__, "python_version": platform.python_version()}
    assert sample(samples, "llmwatch_build_info", **labels) == 1


async def test_apps_have_own_registries(make_client: MakeClient) -> None:
    first = await make_client()
    second = await make_client()

    await (await first.post("/ask", json={"prompt": "Hello"})).read()
    first_samples = await scrape(first)
    second_samples = await scrape(second)

    assert sample(first_samples, "llm_requests_total", **MINI) == 1
    assert sample(second_samples, "llm_requests_total", **MINI) == 0
    assert sample(second_samples, "llm_tokens_total", type="prompt", **MINI) == 0
    assert sample(second_samples, "llm_ratelimit_remaining", **MINI) == 0


async def test_promtool_accepts_exposition(make_client: MakeClient) -> None:
    promtool = find_binary("promtool")
    client = await make_client()
    await exercise(client)
    text = await (await client.get("/metrics")).text()

    process = await asyncio.create_subprocess_exec(
        promtool,
        "check",
        "metrics",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await process.communicate(text.encode())

    assert process.returncode == 0, stderr.decode()
    assert stdout.decode() == ""
    assert stderr.decode() == ""
